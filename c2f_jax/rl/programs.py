"""The compiled programs of a run on a mesh, each with explicit in/out shardings and donation.

Built once per run from the live (already placed) params, so every program
agrees with where its inputs are and leaves its outputs where the next one
wants them. A program compiles once per input shape (prompt bucket x response
bucket), never per batch.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
from jax.sharding import Mesh

from c2f_jax.model import sharding
from c2f_jax.model.model import MistralConfig, Params
from c2f_jax.rl import optim, ppo, reward, rollout
from c2f_jax.runtime import backend


def _jit(mesh, fn, in_shardings, out_shardings, donate=(), **static):
    fn = functools.partial(fn, **static)
    hints_mesh = mesh if backend.of_mesh(mesh).sharding_hints else None

    def traced_under_mesh(*args):  # so shard_as hints inside the model resolve against this mesh
        with sharding.tracing_on(hints_mesh):
            return fn(*args)

    return jax.jit(traced_under_mesh, in_shardings=in_shardings, out_shardings=out_shardings, donate_argnums=donate)


@dataclasses.dataclass
class CoarsePrograms:
    """to_rollout (train -> rollout layout; `copy_programs` are its compiled parts), generate(length) -> the sampling program for that
    response bucket, score (reward model), iteration (experience and PPO update, `ppo.iteration`, with the
    KL coefficient as its last argument)."""

    to_rollout: object
    copy_programs: dict
    generate: object
    score: object
    iteration: object


def coarse_programs(
    mesh: Mesh,
    *,
    actor_config: MistralConfig,
    ref_config: MistralConfig,
    critic_config: MistralConfig,
    rm_config: MistralConfig,
    pc: ppo.PPOConfig,
    sampling: rollout.SamplingConfig,
    eos_token_ids: tuple,
    pad_id: int,
    actor_state: optim.TrainState,
    critic_state: optim.TrainState,
    reference: Params,
    rm_params: Params,
) -> CoarsePrograms:
    batch2, batch1, repl = sharding.batch_sharding(mesh, 2), sharding.batch_sharding(mesh, 1), sharding.replicated(mesh)
    actor_sh = sharding.like_params(mesh, actor_state, actor_state.params)
    critic_sh = sharding.like_params(mesh, critic_state, critic_state.params)
    ref_sh = sharding.param_shardings(mesh, reference)
    rm_sh = sharding.param_shardings(mesh, rm_params)
    layout = rollout.rollout_layout(actor_config, backend.of_mesh(mesh))
    rollout_shapes = jax.eval_shape(lambda p: rollout.rollout_params(layout, p), actor_state.params)
    rollout_sh = sharding.param_shardings(mesh, rollout_shapes, "rollout")

    to_rollout, copy_programs = _rollout_copy(mesh, layout, actor_config, actor_sh.params, rollout_sh)

    @functools.lru_cache(maxsize=None)
    def generate(length: int):
        return _jit(
            mesh,
            rollout.sample,
            (rollout_sh, batch2, batch2, repl),
            rollout.Rollout(batch2, batch2, batch2),
            config=layout,
            max_new_tokens=length,
            sampling=sampling,
            eos_token_ids=eos_token_ids,
            pad_id=pad_id,
        )

    exp_sh = ppo.Experience(*([batch2] * 9), batch1)
    return CoarsePrograms(
        to_rollout=to_rollout,
        copy_programs=copy_programs,
        generate=generate,
        score=_jit(mesh, reward.score_sequences, (rm_sh, batch2, batch2), batch1, config=rm_config),
        iteration=_jit(
            mesh,
            ppo.iteration,
            (actor_sh, critic_sh, ref_sh, batch2, batch2, batch2, batch1, repl, repl),
            (actor_sh, critic_sh, exp_sh, repl),
            donate=(0, 1),
            actor_config=actor_config,
            ref_config=ref_config,
            critic_config=critic_config,
            ppo=pc,
        ),
    )


def _rollout_copy(mesh, layout: MistralConfig, config: MistralConfig, train_sh: Params, rollout_sh: Params):
    """(to_rollout, {name: (program, its arguments from the params)}). to_rollout: params in the train layout ->
    the rollout copy, `rollout.rollout_params(layout, params)` in compute dtype, built by one program for the
    weights outside the layers and one program for a layer, called for each.

    Each program casts and slices in the sharded train layout, so the gather moves compute-dtype bytes, and
    gathers one layer at a time: as one program, XLA:TPU gathers every weight into a temporary before copying
    it into its output, holding a second whole copy (README, "Measurements behind the code's choices").
    """
    cast = lambda tree, sh: jax.tree.map(
        lambda a, s: jax.lax.with_sharding_constraint(a.astype(config.compute_dtype), s), tree, sh
    )
    rest = [k for k in train_sh if not k.startswith("layers")]
    rest_sh = {k: train_sh[k] for k in rest}
    copy_rest = _jit(
        mesh, lambda p: rollout.rollout_params(layout, cast(p, rest_sh)), (rest_sh,), {k: rollout_sh[k] for k in rest}
    )
    if config.scan_layers:  # layer i of the stacked weights, i a traced index: one program for every layer

        def one_layer(stacked, i):
            one = jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, i, 1), stacked)
            return rollout.rollout_params(layout, {"layers": cast(one, train_sh["layers"])})["layers_0"]

        layer_sh = (train_sh["layers"], sharding.replicated(mesh))
        layer = lambda params, i: (params["layers"], np.int32(i))
    else:

        def one_layer(weights):
            return rollout.rollout_params(layout, {"layers_0": cast(weights, train_sh["layers_0"])})["layers_0"]

        layer_sh = (train_sh["layers_0"],)
        layer = lambda params, i: (params[f"layers_{i}"],)
    copy_layer = _jit(mesh, one_layer, layer_sh, rollout_sh["layers_0"])

    rest_of = lambda params: ({k: params[k] for k in rest},)

    def to_rollout(params: Params) -> Params:
        copy = copy_rest(*rest_of(params))
        for i in range(config.num_hidden_layers):
            copy[f"layers_{i}"] = copy_layer(*layer(params, i))
        return copy

    return to_rollout, {"copy_rest": (copy_rest, rest_of), "copy_layer": (copy_layer, lambda params: layer(params, 0))}


@dataclasses.dataclass
class RewardPrograms:
    train: object
    margins: object


def reward_programs(
    mesh: Mesh, *, config: MistralConfig, optim_config: optim.OptimConfig, state: optim.TrainState
) -> RewardPrograms:
    batch = {
        k: sharding.batch_sharding(mesh, 2) for k in ("chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask")
    }
    state_sh, repl = sharding.like_params(mesh, state, state.params), sharding.replicated(mesh)
    return RewardPrograms(
        train=_jit(
            mesh,
            reward.train,
            (state_sh, batch),
            (state_sh, repl),
            donate=(0,),
            config=config,
            optim_config=optim_config,
        ),
        margins=_jit(mesh, reward.margins, (state_sh.params, batch), sharding.batch_sharding(mesh, 1), config=config),
    )
