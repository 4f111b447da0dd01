"""Merge methods beyond linear, one tensor at a time, as mergekit 0.1.5 defines them (its output is the reference:
tests/test_merge_methods.py). Every function takes float arrays of one shape and returns float32.

- `slerp(t, base, other)`: spherical interpolation between the two tensors as vectors, linear where they are
  (anti)parallel; `t` 0 gives `base`.
- `task_vectors(base, models, weights, ...)`: the task-vector family, `base + lambda * merged deltas`:
  task_arithmetic (no sparsification, no sign election), ties (magnitude pruning to `density`, sign election by
  summed mass, normalised by the elected weights), dare_linear and dare_ties (random dropping to `density`,
  rescaled to keep each delta's L1 norm; dare_ties also elects signs). METHODS maps each name to its settings.

The arithmetic is float32 throughout, in mergekit's order; only DARE's random drops differ (our RNG, from a
seed: see `drop_rng`).
"""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np

F32 = np.float32


def slerp(t: float, base: np.ndarray, other: np.ndarray, dot_threshold: float = 0.9995,
          eps: float = 1e-8) -> np.ndarray:
    """float32 [same shape]: the two tensors as vectors at angle theta, sin((1-t) theta) / sin(theta) * base +
    sin(t theta) / sin(theta) * other; where |cos theta| > dot_threshold (near (anti)parallel),
    (1-t) * base + t * other. A tensor of norm <= eps counts as norm 1."""
    a, b, t = base.reshape(-1).astype(F32), other.reshape(-1).astype(F32), F32(t)
    if a.size == 0:
        return ((F32(1) - t) * a + t * b).reshape(base.shape)
    norm_a, norm_b = np.linalg.norm(a), np.linalg.norm(b)
    norm_a, norm_b = (n if n > eps else F32(1) for n in (norm_a, norm_b))
    dot = F32(np.clip(np.sum((a / norm_a) * (b / norm_b), dtype=F32), -1, 1))
    if abs(dot) > dot_threshold:
        coef_a, coef_b = F32(1) - t, t
    else:
        theta = np.arccos(dot)
        coef_a, coef_b = np.sin((F32(1) - t) * theta) / np.sin(theta), np.sin(t * theta) / np.sin(theta)
    return (F32(coef_a) * a + F32(coef_b) * b).reshape(base.shape)


def linear(models: list[np.ndarray], weights: list[float], normalize: bool = True) -> np.ndarray:
    """float32 sum of weight_i * model_i, divided by the weights' sum when normalising (mergekit's linear; the
    Knowledge Residue Merger's two-model case is c2f_jax.merge.merge.lerp)."""
    out = np.zeros(models[0].shape, F32)
    for x, w in zip(models, weights):
        out += x.astype(F32) * F32(w)
    if normalize:
        out /= np.sum(np.asarray(weights, F32), dtype=F32)
    return out


@dataclasses.dataclass(frozen=True)
class TaskVectorMethod:
    sparsify: str | None  # "magnitude", "random" or None
    elect_signs: bool
    normalize: bool  # divide by the (elected) weights' sum
    rescale: bool  # after dropping, scale each delta back to its L1 norm


METHODS = {
    "task_arithmetic": TaskVectorMethod(None, False, False, False),
    "ties": TaskVectorMethod("magnitude", True, True, False),
    "dare_linear": TaskVectorMethod("random", False, False, True),
    "dare_ties": TaskVectorMethod("random", True, False, True),
}


def drop_rng(seed: int, tensor: str, model: int) -> np.random.Generator:
    """DARE's random source for one delta: from the merge's seed, the tensor's name and the model's index, so a
    tensor's drops do not depend on the order tensors are merged in."""
    return np.random.default_rng([seed, zlib.crc32(tensor.encode()), model])


def _rescaled(delta: np.ndarray, mask: np.ndarray, rescale: bool, eps: float = 1e-7) -> np.ndarray:
    masked = delta * mask
    if not rescale:
        return masked
    before, after = np.sum(np.abs(delta), dtype=F32), np.sum(np.abs(masked), dtype=F32)
    if before < eps or after < eps:
        return masked
    return masked * (before / after)


def sparsified(delta: np.ndarray, density: float, how: str, rescale: bool,
               rng: np.random.Generator | None = None) -> np.ndarray:
    """`delta` with all but a `density` share of its entries zeroed: the largest magnitudes ("magnitude", at
    least one entry) or each kept with probability `density` ("random", drawn from `rng`)."""
    if density >= 1:
        return delta
    if how == "magnitude":
        if density <= 0 or delta.size == 0:
            return np.zeros_like(delta)
        keep = max(1, int(density * delta.size))
        mask = np.zeros(delta.size, F32)
        # the `keep` largest magnitudes, as mergekit's argsort picks them (a partition: O(n), not a sort)
        mask[np.argpartition(-np.abs(delta).reshape(-1), keep - 1)[:keep]] = 1
        return _rescaled(delta, mask.reshape(delta.shape), rescale)
    if how == "random":
        return _rescaled(delta, (rng.random(delta.shape, dtype=np.float64) < density).astype(F32), rescale)
    raise ValueError(f"sparsification {how!r}: expected 'magnitude' or 'random'")


def task_vectors(method: str, base: np.ndarray, models: list[np.ndarray], weights: list[float],
                 densities: list[float] | None = None, lam: float = 1.0, normalize: bool | None = None,
                 rngs: list[np.random.Generator] | None = None) -> np.ndarray:
    """float32 `base + lam * merge(models - base)` by METHODS[method]: each delta sparsified to its density,
    scaled by its weight; with sign election only the entries agreeing with the sign of their sum count; the
    sum divided by the (counted) weights when normalising (the method's default unless `normalize` says)."""
    how = METHODS[method]
    densities = densities or [1.0] * len(models)
    base = base.astype(F32)
    deltas = np.empty((len(models), *base.shape), F32)
    for i, m in enumerate(models):
        delta = m.astype(F32) - base
        if how.sparsify:
            delta = sparsified(delta, densities[i], how.sparsify, how.rescale, rngs[i] if rngs else None)
        deltas[i] = delta
    w = np.asarray(weights, F32).reshape(-1, *([1] * base.ndim))
    deltas *= w
    if how.elect_signs:
        majority = np.where(np.sum(deltas, axis=0, dtype=F32) >= 0, F32(1), F32(-1))
        mask = (np.sign(deltas) == majority).astype(F32)
        mixed = np.sum(deltas * mask, axis=0, dtype=F32)
        divisor = np.sum(w * mask, axis=0, dtype=F32)
        divisor[divisor == 0] = 1
    else:
        mixed = np.sum(deltas, axis=0, dtype=F32)
        divisor = np.sum(w, axis=0, dtype=F32)
        divisor = np.where(np.abs(divisor) < 1e-8, F32(1), divisor)
    if how.normalize if normalize is None else normalize:
        mixed = mixed / divisor
    if lam != 1:
        mixed = mixed * F32(lam)
    return base + mixed
