"""Run settings: a run config (an ml_collections file) turned into the frozen objects a job runs with.

Config sections mirror the dataclasses they become, so there is no table of
renamed keys: `ppo` holds PPOConfig's fields (its `actor` and `critic` are
OptimConfig fields), `cm` is CMConfig, `optim` (reward job) is OptimConfig,
`rollout` is SamplingConfig plus `suppress_stop_tokens`. The one translation:
PPO takes its logprobs under the sampler's policy (its temperature and
suppressed tokens).

Model configs need the models' own config.json; `coarse_models` derives the
four roles from the base and the reward model.
"""

from __future__ import annotations

import dataclasses
import math

from c2f_jax.model import sharding
from c2f_jax.model.config import REMAT_POLICIES, SEQ_CLS, ConfigError, MistralConfig, float_dtype
from c2f_jax.rl import cm, optim, ppo, rollout
from c2f_jax.runtime import workdir


class SettingsError(ValueError):
    """A config value that does not make a runnable job."""


def _plain(section) -> dict:
    """A config section as keyword arguments: lists become tuples (dataclasses stay hashable)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in dict(section).items()}


def _fields(cls, section, where: str, **fixed) -> object:
    """cls built from a config section; its own range checks come back naming the config key."""
    known = {f.name for f in dataclasses.fields(cls)}
    kw = _plain(section)
    unknown = sorted(set(kw) - known)
    if unknown:
        raise SettingsError(f"{where}.{unknown[0]}: not a {cls.__name__} field (known: {', '.join(sorted(known))})")
    try:
        return cls(**{**kw, **fixed})
    except (ValueError, TypeError) as e:
        raise SettingsError(f"{where}.{e}") from None


def _at(config, key: str):
    node = config
    for part in key.split("."):
        node = node[part]
    return node


def _number(config, key: str, ok, rule: str, kind=int):
    """The value at `key`, or a SettingsError unless it is a `kind` (bool is no number) with ok(value)."""
    value = _at(config, key)
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int) or not ok(value):
        raise SettingsError(f"{key}={value!r} must be {rule}")
    return value


def _buckets(config, key: str) -> tuple[int, ...]:
    value = tuple(_at(config, key))
    if not value or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in value):
        raise SettingsError(f"{key}={value!r} must be positive integers")
    return value


def _float_dtype(config, key: str) -> None:
    try:
        float_dtype(_at(config, key), key)
    except ConfigError as e:
        raise SettingsError(str(e)) from None


def mesh_shape(config, devices: int | None = None) -> dict:
    """{'data', 'fsdp', 'tensor'} sizes (c2f_jax.model.sharding.make_mesh's arguments), checked against `devices`
    (default: this job's devices; c2f-plan passes a TPU topology's)."""
    shape = {axis: config.mesh[axis] for axis in ("data", "fsdp", "tensor")}
    sharding.check_mesh(**shape, devices=devices)
    return shape


def _finite(config) -> None:
    """A SettingsError naming the first float setting that is NaN or infinite: no key takes one."""
    for key, value in workdir.flatten(config.to_dict()).items():
        values = value if isinstance(value, (list, tuple)) else (value,)
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            raise SettingsError(f"{key}={value!r} must be a finite number")


def _run(config, devices: int | None) -> None:
    """What every job needs of its config: a number of steps, checkpoints, a seed, a mesh, a model to train."""
    _finite(config)
    _number(config, "steps", lambda v: v >= 1, "an integer >= 1")
    _number(config, "checkpoint_every", lambda v: v >= 1, "an integer >= 1")
    if "keep_checkpoints" in config:
        _number(config, "keep_checkpoints", lambda v: v >= 1, "an integer >= 1")
    _number(config, "seed", lambda v: v >= 0, "an integer >= 0")
    for key in ("model.param_dtype", "model.compute_dtype"):
        _float_dtype(config, key)
    if config.model.remat not in REMAT_POLICIES:
        raise SettingsError(f"model.remat={config.model.remat!r}; expected one of {REMAT_POLICIES}")
    mesh_shape(config, devices)


@dataclasses.dataclass(frozen=True)
class Coarse:
    """Everything the Coarse Actor loop needs besides the models and data."""

    ppo: ppo.PPOConfig
    cm: cm.CMConfig
    sampling: rollout.SamplingConfig  # suppress_token_ids filled in by `with_stop_tokens` from the tokenizer
    prompt_buckets: tuple[int, ...]
    batch_size: int
    minibatch_size: int
    suppress_stop_tokens: bool  # rollout.suppress_stop_tokens


def with_stop_tokens(job: Coarse, stop_token_ids: tuple[int, ...]) -> Coarse:
    """The job with the tokenizer's stop tokens suppressed, when rollout.suppress_stop_tokens, both where the
    rollout samples and where PPO scores the same policy (one list, so they cannot differ)."""
    if not job.suppress_stop_tokens:
        return job
    ids = tuple(sorted(stop_token_ids))
    return dataclasses.replace(
        job,
        sampling=dataclasses.replace(job.sampling, suppress_token_ids=ids),
        ppo=dataclasses.replace(job.ppo, suppress_token_ids=ids),
    )


def coarse(config, stop_token_ids: tuple[int, ...] = (), devices: int | None = None) -> Coarse:
    """The Coarse Actor's settings, every one checked (the inline reward job's too, when there is one);
    `stop_token_ids` are suppressed when rollout.suppress_stop_tokens; the mesh must fit `devices`
    (default: this job's)."""
    _run(config, devices)
    for key in ("model.reference_dtype", "reward_model.dtype"):
        _float_dtype(config, key)
    if "pretrain_steps" in config.model:
        _number(config, "model.pretrain_steps", lambda v: v >= 0, "an integer >= 0")
    if not config.reward_model.path:
        if "train" not in config.reward_model:
            raise SettingsError("reward_model.path is empty and there is no reward_model.train: no reward model")
        try:
            reward(inline_reward_config(config), devices)
        except ValueError as e:
            raise SettingsError(f"reward_model.train.{e}") from None
    r = _plain(config.rollout)
    suppress = bool(r.pop("suppress_stop_tokens"))
    sampling = _fields(rollout.SamplingConfig, r, "rollout")
    if sampling.temperature <= 0:
        raise SettingsError(
            f"rollout.temperature={sampling.temperature} must be > 0 (greedy rollouts have no policy ratio for PPO)"
        )
    p = _plain(config.ppo)
    actor = _fields(optim.OptimConfig, p.pop("actor"), "ppo.actor")
    critic = _fields(optim.OptimConfig, p.pop("critic"), "ppo.critic")
    pc = _fields(ppo.PPOConfig, p, "ppo", actor=actor, critic=critic, temperature=sampling.temperature)
    batch = _number(config, "data.batch_size", lambda v: v >= 1, "an integer >= 1")
    mesh = mesh_shape(config, devices)
    sharding.batch_size_check(mesh, batch, "data.batch_size")
    minibatch = ppo.minibatch_size(batch, pc.minibatches, ("data.batch_size", "ppo.minibatches"))
    sharding.batch_size_check(mesh, minibatch, "PPO minibatch (data.batch_size / ppo.minibatches)")
    job = Coarse(
        ppo=pc,
        cm=_fields(cm.CMConfig, config.cm, "cm"),
        sampling=sampling,
        prompt_buckets=_buckets(config, "data.prompt_buckets"),
        batch_size=batch,
        minibatch_size=minibatch,
        suppress_stop_tokens=suppress,
    )
    return with_stop_tokens(job, stop_token_ids)


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
    return Roles(
        actor=actor,
        reference=actor.replace(param_dtype=config.model.reference_dtype),
        critic=reward.replace(**runtime(config)),
        reward=reward.replace(param_dtype=config.reward_model.dtype, compute_dtype=config.model.compute_dtype),
    )


@dataclasses.dataclass(frozen=True)
class Reward:
    """The reward job's settings."""

    optim: optim.OptimConfig
    seq_buckets: tuple[int, ...]
    batch_size: int


def reward(config, devices: int | None = None) -> Reward:
    """The reward job's settings, every one checked (the mesh against `devices`, default this job's)."""
    _run(config, devices)
    _number(config, "eval_every", lambda v: v >= 1, "an integer >= 1")
    _number(config, "data.eval_fraction", lambda v: 0 < v < 1, "in (0, 1)", kind=float)
    batch = _number(config, "data.batch_size", lambda v: v >= 1, "an integer >= 1")
    sharding.batch_size_check(mesh_shape(config, devices), batch, "data.batch_size")
    return Reward(
        optim=_fields(optim.OptimConfig, config.optim, "optim"),
        seq_buckets=_buckets(config, "data.seq_buckets"),
        batch_size=batch,
    )


def inline_reward_config(config):
    """The demo's reward job (reward_model.train) with the coarse run's base, data, mesh and seed."""
    rc = config.reward_model.train.copy_and_resolve_references()
    rc.seed = config.seed
    rc.model.update(base=config.model.base, param_dtype="float32", compute_dtype=config.model.compute_dtype)
    rc.data.update(source=config.data.source, data_dir=config.data.data_dir, split=config.data.split)
    rc.mesh.update(config.mesh)
    return rc
