"""Continuous Maximization: when to raise the Coarse Actor's output-length limit.

The limit steps through static length buckets and never shrinks. After each PPO
iteration the controller sees that iteration's mean reward and critic loss. Over
a window of recent iterations at the current bucket it forms

    trend = (mean of the window's second half - mean of its first half) / (std of the window + eps)
            how far the reward level moved, relative to its spread;
    cv    = std(critic loss) / mean(critic loss), the critic loss's fluctuation;

and advances with probability p = sigmoid(bias - w_drop * max(0, -trend)
- w_rise * max(0, trend) - w_critic * cv), i.e. when p passes `threshold` and
at least `min_steps` iterations have run at this bucket. A falling reward
(the policy degrading at this length) weighs most; a still-rising one weighs
a little (there is more to learn at this length); a jumpy critic means the value
estimates are not settled. The paper gives the idea but no coefficients; ours
are chosen so that a flat reward with a critic loss varying by ~10% gives
p ~ 0.9 and a critic loss varying by ~80%, or a reward falling by about one
spread across the window, gives p < 0.5 (see README).

The state is a plain JSON-able dict, saved in every checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

MODES = ("logistic", "fixed")


class CMError(ValueError):
    """A Continuous Maximization setting that cannot work."""


@dataclasses.dataclass(frozen=True)
class CMConfig:
    buckets: tuple[int, ...] = (128, 256, 512, 768, 1024)
    mode: str = "logistic"
    window: int = 8
    min_steps: int = 8
    threshold: float = 0.5
    bias: float = 3.0
    w_drop: float = 2.0
    w_rise: float = 0.5
    w_critic: float = 4.0

    def __post_init__(self):
        if self.mode not in MODES:
            raise CMError(f"mode={self.mode!r}; expected one of {MODES}")
        if not self.buckets or list(self.buckets) != sorted(set(self.buckets)) or self.buckets[0] < 1:
            raise CMError(f"buckets={self.buckets} must be positive and strictly increasing")
        if self.window < 2:
            raise CMError(f"window={self.window} must be >= 2")
        if not 0 < self.threshold < 1:
            raise CMError(f"threshold={self.threshold} must be in (0, 1)")
        if self.min_steps < 0:
            raise CMError(f"min_steps={self.min_steps} must be >= 0")
        if not math.isfinite(self.bias):
            raise CMError(f"bias={self.bias} must be a finite number")
        for name in ("w_drop", "w_rise", "w_critic"):
            if not math.isfinite(getattr(self, name)) or getattr(self, name) < 0:
                raise CMError(f"{name}={getattr(self, name)} must be a finite number >= 0")


def init_state() -> dict:
    return {"bucket": 0, "steps_at_bucket": 0, "rewards": [], "critic_losses": [], "p_advance": 0.0}


def length_limit(config: CMConfig, state: dict) -> int:
    """The response length (a bucket) the next rollout samples."""
    return config.buckets[state["bucket"]]


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def _std(xs: Sequence[float]) -> float:
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs))


def p_advance(config: CMConfig, rewards: Sequence[float], critic_losses: Sequence[float]) -> float:
    """The logistic advance probability for one window of reward means and critic losses."""
    half = len(rewards) // 2
    trend = (_mean(rewards[half:]) - _mean(rewards[:half])) / (_std(rewards) + 1e-6)
    cv = _std(critic_losses) / (abs(_mean(critic_losses)) + 1e-8)
    z = config.bias - config.w_drop * max(0.0, -trend) - config.w_rise * max(0.0, trend) - config.w_critic * cv
    # exp of a large |z| overflows a float: take the logistic from the side where the exponent is <= 0.
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


def update(config: CMConfig, state: dict, reward_mean: float, critic_loss: float) -> dict:
    """The state after one PPO iteration. A non-finite metric is treated as maximal instability (hold)."""
    state = {**state, "steps_at_bucket": state["steps_at_bucket"] + 1}
    if not (math.isfinite(reward_mean) and math.isfinite(critic_loss)):
        return {**state, "rewards": [], "critic_losses": [], "p_advance": 0.0}
    rewards = (state["rewards"] + [float(reward_mean)])[-config.window :]
    losses = (state["critic_losses"] + [float(critic_loss)])[-config.window :]
    state.update(rewards=rewards, critic_losses=losses)
    if config.mode == "fixed" or len(rewards) < config.window:
        return {**state, "p_advance": 0.0}
    p = p_advance(config, rewards, losses)
    state["p_advance"] = p
    last = len(config.buckets) - 1
    if p > config.threshold and state["steps_at_bucket"] >= config.min_steps and state["bucket"] < last:
        # A new length changes the reward and loss scales: judge it on its own window.
        state.update(bucket=state["bucket"] + 1, steps_at_bucket=0, rewards=[], critic_losses=[])
    return state
