"""Run settings: a run config (an ml_collections file) turned into the frozen objects a job runs with.

Config sections mirror the dataclasses they become, so there is no table of
renamed keys: `ppo` holds PPOConfig's fields (its `actor` and `critic` are
OptimConfig fields), `cm` is CMConfig, `optim` (reward job) is OptimConfig,
`rollout` is SamplingConfig plus `suppress_stop_tokens`. The one translation:
PPO takes its logprobs at the sampling temperature.

Model configs need the models' own config.json; `coarse_models` derives the
four roles from the base and the reward model.
"""

from __future__ import annotations

import dataclasses

from c2f_jax import cm, optim, ppo, rollout, sharding
from c2f_jax.config import SEQ_CLS, MistralConfig


class SettingsError(ValueError):
    """A config value that does not make a runnable job."""


def _plain(section) -> dict:
    """A config section as keyword arguments: lists become tuples (dataclasses stay hashable)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in dict(section).items()}


def _fields(cls, section, where: str, **fixed) -> object:
    known = {f.name for f in dataclasses.fields(cls)}
    kw = _plain(section)
    unknown = sorted(set(kw) - known)
    if unknown:
        raise SettingsError(f"{where}.{unknown[0]}: not a {cls.__name__} field (known: {', '.join(sorted(known))})")
    return cls(**{**kw, **fixed})


def mesh_shape(config) -> dict:
    """{'data', 'fsdp', 'tensor'} sizes (c2f_jax.sharding.make_mesh's arguments)."""
    return {axis: int(config.mesh[axis]) for axis in ("data", "fsdp", "tensor")}


@dataclasses.dataclass(frozen=True)
class Coarse:
    """Everything the Coarse Actor loop needs besides the models and data."""

    ppo: ppo.PPOConfig
    cm: cm.CMConfig
    sampling: rollout.SamplingConfig  # suppress_token_ids filled in by `coarse` from the tokenizer
    prompt_buckets: tuple[int, ...]
    batch_size: int
    minibatch_size: int


def coarse(config, stop_token_ids: tuple[int, ...] = ()) -> Coarse:
    """The Coarse Actor's settings; `stop_token_ids` are suppressed when rollout.suppress_stop_tokens."""
    r = _plain(config.rollout)
    suppress = tuple(sorted(stop_token_ids)) if r.pop("suppress_stop_tokens") else ()
    sampling = _fields(rollout.SamplingConfig, r, "rollout", suppress_token_ids=suppress)
    p = _plain(config.ppo)
    actor = _fields(optim.OptimConfig, p.pop("actor"), "ppo.actor")
    critic = _fields(optim.OptimConfig, p.pop("critic"), "ppo.critic")
    pc = _fields(ppo.PPOConfig, p, "ppo", actor=actor, critic=critic, temperature=sampling.temperature)
    batch, mesh = int(config.data.batch_size), mesh_shape(config)
    sharding.batch_size_check(mesh, batch, "data.batch_size")
    minibatch = ppo.minibatch_size(batch, pc.minibatches, ("data.batch_size", "ppo.minibatches"))
    sharding.batch_size_check(mesh, minibatch, "PPO minibatch (data.batch_size / ppo.minibatches)")
    return Coarse(ppo=pc, cm=_fields(cm.CMConfig, config.cm, "cm"), sampling=sampling,
                  prompt_buckets=tuple(config.data.prompt_buckets), batch_size=batch, minibatch_size=minibatch)


@dataclasses.dataclass(frozen=True)
class Roles:
    """The four model configs of a coarse run: actor and reference share the LM definition, critic and
    reward model the backbone with a scalar head."""

    actor: MistralConfig
    reference: MistralConfig
    critic: MistralConfig
    reward: MistralConfig


def runtime(config) -> dict:
    """How the trained models run: MistralConfig's param_dtype, compute_dtype and remat from `model`."""
    m = config.model
    return dict(param_dtype=m.param_dtype, compute_dtype=m.compute_dtype, remat=m.remat)


def coarse_models(config, base: MistralConfig, reward: MistralConfig | None = None) -> Roles:
    """Roles from the base's and the reward model's architectures (the reward model's defaults to the
    base's with a scalar head, as when planning memory without files)."""
    actor = base.replace(**runtime(config))
    reward = reward or actor.replace(architecture=SEQ_CLS, num_labels=1)
    return Roles(actor=actor, reference=actor.replace(param_dtype=config.model.reference_dtype),
                 critic=reward.replace(**runtime(config)),
                 reward=reward.replace(param_dtype=config.reward_model.dtype,
                                       compute_dtype=config.model.compute_dtype))


@dataclasses.dataclass(frozen=True)
class Reward:
    """The reward job's settings."""

    optim: optim.OptimConfig
    seq_buckets: tuple[int, ...]
    batch_size: int


def reward(config) -> Reward:
    batch = int(config.data.batch_size)
    sharding.batch_size_check(mesh_shape(config), batch, "data.batch_size")
    return Reward(optim=_fields(optim.OptimConfig, config.optim, "optim"),
                  seq_buckets=tuple(config.data.seq_buckets), batch_size=batch)
