"""Causal-LM fine-tuning: next-token cross-entropy on dialogues.

The tiny demo uses it to give its random base model some language before PPO (a
stand-in for Mistral's pretraining), and to make a small "Instruct" model for
merge sweeps. Real runs start from pretrained checkpoints instead.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp

from c2f_jax import data
from c2f_jax.model import model
from c2f_jax.model.model import MistralConfig, Params
from c2f_jax.rl import optim


def lm_loss(config: MistralConfig, params: Params, ids, mask) -> jax.Array:
    """Mean next-token negative log-likelihood over real tokens; ids, mask int32 [B, T] (left-padded)."""
    logits = model.forward(config, params, ids, mask)[:, :-1]  # [B, T-1, V]
    targets, weights = ids[:, 1:], mask[:, 1:] * mask[:, :-1]
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), targets[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1)


@functools.partial(jax.jit, static_argnames=("config", "optim_config"), donate_argnums=(0,))
def train_step(
    state: optim.TrainState, ids, mask, *, config: MistralConfig, optim_config: optim.OptimConfig
) -> tuple[optim.TrainState, jax.Array]:
    loss, grads = jax.value_and_grad(lambda p: lm_loss(config, p, ids, mask))(state.params)
    state, _ = optim.apply_gradients(state, grads, loss, optim_config)
    return state, loss


def optim_config(lr: float, steps: int) -> optim.OptimConfig:
    """AdamW at `lr` after a short warmup (OptimConfig checks the numbers)."""
    return optim.OptimConfig(lr=lr, warmup_steps=min(10, steps))


def fine_tune(
    config: MistralConfig,
    params: Params,
    token_lists: Sequence[Sequence[int]],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    buckets: Sequence[int],
    pad_id: int,
    seed: int = 0,
    progress: str | None = None,
) -> tuple[Params, float]:
    """`steps` AdamW steps over shuffled token lists (left-padded into buckets); returns (params, last loss).
    `progress`: a progress bar with this label."""
    from c2f_jax.runtime import metrics

    oc = optim_config(lr, steps)
    state = optim.create_state(params, oc)
    it = data.BatchIterator(len(token_lists), batch_size, seed)
    loss = jnp.nan
    bar = metrics.progress(steps, 0, progress is not None, desc=progress or "")
    for _ in range(steps):
        ids, mask = data.left_pad([token_lists[i] for i in it.next()], buckets, pad_id, truncate=True)
        state, loss = train_step(state, ids, mask, config=config, optim_config=oc)
        bar.update(1)
    bar.close()
    return state.params, float(loss)
