"""Train state and the guarded optimizer step shared by the reward model, actor and critic.

Master weights stay in their param dtype (float32 by default): at lr 5e-7 an
AdamW update is ~1e-7 relative, below bfloat16's resolution (~4e-3), so bf16
master weights would not move at all.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from c2f_jax.model.model import Params


class OptimError(ValueError):
    """An optimizer setting out of range."""


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup to lr, then constant or, with decay_steps > 0, falling linearly to 0 over that
    many updates (and 0 after), and global-norm clipping (hashable: a jit static). Steps count optimizer
    updates: a PPO iteration makes epochs x minibatches of them."""

    lr: float
    warmup_steps: int = 0
    decay_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8

    def __post_init__(self):
        bad = next(
            (
                f"{k}={v!r} must be {rule}"
                for k, v, ok, rule in (
                    ("lr", self.lr, self.lr > 0, "> 0"),
                    ("warmup_steps", self.warmup_steps, self.warmup_steps >= 0, ">= 0"),
                    ("decay_steps", self.decay_steps, self.decay_steps >= 0, ">= 0 (0: a constant lr after warmup)"),
                    ("weight_decay", self.weight_decay, self.weight_decay >= 0, ">= 0"),
                    ("max_grad_norm", self.max_grad_norm, self.max_grad_norm > 0, "> 0"),
                    ("b1", self.b1, 0 <= self.b1 < 1, "in [0, 1)"),
                    ("b2", self.b2, 0 <= self.b2 < 1, "in [0, 1)"),
                    ("eps", self.eps, self.eps > 0, "> 0"),
                )
                if not ok
            ),
            None,
        )
        if bad:
            raise OptimError(bad)

    def schedule(self):
        """The lr at each update: a float when constant, else an optax schedule."""
        warmup = optax.linear_schedule(0.0, self.lr, self.warmup_steps) if self.warmup_steps else None
        if not self.decay_steps:
            return warmup or self.lr
        decay = optax.linear_schedule(self.lr, 0.0, self.decay_steps)
        return optax.join_schedules([warmup, decay], [self.warmup_steps]) if warmup else decay

    def make(self) -> optax.GradientTransformation:
        schedule = self.schedule()
        return optax.chain(
            optax.clip_by_global_norm(self.max_grad_norm),
            optax.adamw(schedule, b1=self.b1, b2=self.b2, eps=self.eps, weight_decay=self.weight_decay),
        )


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    """params, optimizer state, int32 step, and int32 count of updates skipped as non-finite."""

    params: Params
    opt_state: Any
    step: jax.Array
    skipped: jax.Array


def create_state(params: Params, optim: OptimConfig) -> TrainState:
    """A fresh state owning a copy of params: updates donate their buffers, which must not
    be shared with another role (the reference starts from the same weights as the actor)."""
    params = jax.tree.map(jnp.copy, params)
    return TrainState(params, optim.make().init(params), jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))


def apply_gradients(state: TrainState, grads: Params, loss: jax.Array, optim: OptimConfig) -> tuple[TrainState, dict]:
    """One optimizer step, or none at all when the loss or any gradient is not finite.

    A NaN/inf batch then leaves params and optimizer moments untouched (counted in
    `skipped`) instead of poisoning the weights. Returns (state, {'grad_norm', 'finite'}).
    """
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = optim.make().update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new = TrainState(
        params=keep(params, state.params),
        opt_state=keep(opt_state, state.opt_state),
        step=state.step + finite.astype(jnp.int32),
        skipped=state.skipped + (~finite).astype(jnp.int32),
    )
    return new, {"grad_norm": grad_norm, "finite": finite}
