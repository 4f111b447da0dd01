"""Continuous Maximization on synthetic metric streams."""

import json

import numpy as np
import pytest

from c2f_jax.rl import cm
from c2f_jax.rl.cm import CMConfig, CMError

CFG = CMConfig(buckets=(16, 32, 64), window=8, min_steps=8)


def run(config, rewards, losses):
    state, limits = cm.init_state(), []
    for reward, loss in zip(rewards, losses):
        state = cm.update(config, state, reward, loss)
        limits.append(cm.length_limit(config, state))
        state = json.loads(json.dumps(state))  # it is what checkpoints store
    return state, limits


def noise(n, scale, seed=0):
    return np.random.default_rng(seed).normal(0, scale, n)


def test_stable_reward_and_calm_critic_advance_through_every_bucket():
    n = 40
    _, limits = run(CFG, 1.0 + noise(n, 0.05), 0.5 + noise(n, 0.02, 1))
    assert limits[6] == 16 and limits[7] == 32  # after the 8th iteration at a bucket (min_steps), not before
    assert limits[-1] == 64 and limits == sorted(limits)  # never shrinks, stops at the largest


def test_oscillating_critic_loss_holds():
    n = 40
    losses = np.where(np.arange(n) % 2 == 0, 0.1, 1.5)  # cv ~ 0.9
    state, limits = run(CFG, 1.0 + noise(n, 0.05), losses)
    assert set(limits) == {16} and state["p_advance"] < 0.5


def test_falling_reward_holds():
    n = 40
    state, limits = run(CFG, np.linspace(2.0, -2.0, n) + noise(n, 0.05), 0.5 + noise(n, 0.02, 1))
    assert set(limits) == {16} and state["p_advance"] < 0.5


def test_fixed_mode_never_moves():
    _, limits = run(CMConfig(buckets=(16, 32), mode="fixed"), [1.0] * 30, [0.5] * 30)
    assert set(limits) == {16}


def test_non_finite_metrics_hold_and_restart_the_window():
    state = cm.init_state()
    for _ in range(7):
        state = cm.update(CFG, state, 1.0, 0.5)
    state = cm.update(CFG, state, float("nan"), 0.5)
    assert state["rewards"] == [] and cm.length_limit(CFG, state) == 16


@pytest.mark.parametrize(
    "kw",
    [
        dict(buckets=(32, 16)),
        dict(buckets=()),
        dict(mode="linear"),
        dict(window=1),
        dict(threshold=1.5),
        dict(bias=float("nan")),
        dict(w_critic=float("inf")),
        dict(w_drop=-1.0),
    ],
)
def test_bad_settings_are_errors(kw):
    with pytest.raises(CMError):
        CMConfig(**kw)


@pytest.mark.parametrize("bias, expected", [(-1000.0, 0.0), (1000.0, 1.0), (0.0, 0.5)])
def test_the_logistic_holds_at_extreme_settings(bias, expected):
    """An extreme bias gives a probability of 0 or 1 (no overflow): the run holds or advances."""
    config = CMConfig(buckets=(16, 32), window=2, min_steps=0, bias=bias, w_drop=0.0, w_rise=0.0, w_critic=0.0)
    assert cm.p_advance(config, [1.0, 1.0], [0.5, 0.5]) == pytest.approx(expected)
    state, limits = run(config, [1.0] * 4, [0.5] * 4)
    assert limits[-1] == (32 if expected > config.threshold else 16)
