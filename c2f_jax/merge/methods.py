"""Merge methods beyond linear, as mergekit 0.1.5 defines them (its output is the reference:
tests/test_merge_methods.py), computed over chunks of a tensor so that memory stays at a few chunks.

A method that needs a whole-tensor quantity first (SLERP's norms and angle, TIES's magnitude threshold, DARE's
L1 sums) reads the tensor in `counting_passes` passes before the pass that makes the output:

    merger = Slerp(t)  # or Linear(...), TaskVectors(...): one per tensor
    for p in range(merger.counting_passes):
        for start, chunks in ...: merger.observe(p, start, chunks)
    for start, chunks in ...: out = merger.merge(start, chunks)  # in index order

`chunks` is one float32 array per input ([base, other] for SLERP, [base, *models] for task vectors), each the
elements [start, start + n) of the flattened tensor. `merge_whole` runs all passes over whole tensors.

- `Slerp`: spherical interpolation between two tensors as vectors, linear where they are (anti)parallel.
- `TaskVectors`: `base + lambda * merged deltas`: task_arithmetic (no sparsification, no sign election), ties
  (magnitude pruning to `density`, sign election by summed mass, normalised by the elected weights), dare_linear
  and dare_ties (random dropping to `density`, rescaled to keep each delta's L1 norm; dare_ties also elects
  signs). METHODS maps each name to its settings.

The element-wise arithmetic is mergekit's, in its order and precision (float32; the task vectors in the recipe's
dtype, see `TaskVectors`), so chunking does not change a bit of it; the sums are float32 per chunk and float64
across chunks. Only DARE's random drops differ from mergekit's (our RNG: see `RandomDrops`), and which of
several magnitudes equal to TIES's cut are kept (see `TopMagnitudes`).
"""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np

F32 = np.float32


def merge_whole(merger, arrays: list[np.ndarray]) -> np.ndarray:
    """float32 [shape of arrays[0]]: `merger` run over whole tensors (every array one chunk)."""
    flat = [a.reshape(-1).astype(F32, copy=False) for a in arrays]
    for p in range(merger.counting_passes):
        merger.observe(p, 0, flat)
    return merger.merge(0, flat).reshape(arrays[0].shape)


def rounding(dtype):
    """x (float32) -> x rounded to nearest even in `dtype`, as float32: the value a torch op on `dtype` tensors
    yields (it computes in float32 and rounds). Identity for float32 or None."""
    dtype = None if dtype is None else np.dtype(dtype)
    if dtype is None or dtype == F32:
        return lambda x: x
    if dtype.name == "bfloat16":  # the top 16 bits, rounded half to even: a third of ml_dtypes' cast there and back

        def to_bfloat16(x):
            x = np.asarray(x, F32)
            bits = x.view(np.uint32)
            bits = bits + (np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1)))
            bits &= np.uint32(0xFFFF0000)
            nan = x != x
            if nan.any():  # a NaN stays a (quiet) NaN: the rounding could carry its payload into inf or 0
                bits[nan] = (x.view(np.uint32)[nan] & np.uint32(0xFFFF0000)) | np.uint32(0x00400000)
            return bits.view(F32)

        return to_bfloat16
    return lambda x: np.asarray(x, F32).astype(dtype).astype(F32)


class Slerp:
    """SLERP from `base` (t = 0) to `other` (t = 1): the two tensors as vectors at angle theta,
    sin((1-t) theta) / sin(theta) * base + sin(t theta) / sin(theta) * other; (1-t) * base + t * other where
    |cos theta| > dot_threshold. A tensor of norm <= eps counts as norm 1. One counting pass: the norms and dot."""

    counting_passes = 1

    def __init__(self, t: float, dot_threshold: float = 0.9995, eps: float = 1e-8):
        self.t, self.dot_threshold, self.eps = F32(t), dot_threshold, eps
        self.sums = np.zeros(3)  # base.base, other.other, base.other
        self.coefficients = None

    def observe(self, p: int, start: int, chunks: list[np.ndarray]) -> None:
        a, b = chunks
        self.sums += (np.dot(a, a), np.dot(b, b), np.dot(a, b))

    def _coefficients(self) -> tuple[np.float32, np.float32]:
        t = self.t
        norm_a, norm_b = (n if n > self.eps else 1.0 for n in np.sqrt(self.sums[:2]))
        dot = F32(np.clip(self.sums[2] / (norm_a * norm_b), -1, 1))
        if abs(dot) > self.dot_threshold:
            return F32(1) - t, t
        theta = np.arccos(dot)
        return F32(np.sin((F32(1) - t) * theta) / np.sin(theta)), F32(np.sin(t * theta) / np.sin(theta))

    def merge(self, start: int, chunks: list[np.ndarray]) -> np.ndarray:
        if self.coefficients is None:
            self.coefficients = self._coefficients()
        a, b = chunks
        coef_a, coef_b = self.coefficients
        out = np.multiply(a, coef_a, dtype=F32)
        out += b * coef_b
        return out


class Linear:
    """mergekit's linear: the sum of weight_i * model_i, divided by the weights' sum when normalising (the
    Knowledge Residue Merger's two-model case is c2f_jax.merge.merge.lerp)."""

    counting_passes = 0

    def __init__(self, weights: list[float], normalize: bool = True):
        self.weights, self.normalize = [F32(w) for w in weights], normalize

    def merge(self, start: int, chunks: list[np.ndarray]) -> np.ndarray:
        out = np.zeros(chunks[0].shape, F32)
        for x, w in zip(chunks, self.weights):
            out += x * w
        if self.normalize:
            out /= np.sum(np.asarray(self.weights, F32), dtype=F32)
        return out


# ----------------------------------------------------------------------------- sparsification of one delta


class Unchanged:
    """A delta kept whole (no sparsification, or density >= 1)."""

    counting_passes = 0

    def apply(self, start: int, delta: np.ndarray) -> np.ndarray:
        return delta


class Dropped:
    """A delta dropped whole (magnitude pruning at density <= 0, or an empty tensor), as mergekit zeroes it."""

    counting_passes = 0

    def apply(self, start: int, delta: np.ndarray) -> np.ndarray:
        return np.zeros_like(delta)


_HIGH_BINS = 1 << 15  # the top 16 bits of |x|'s float32 bit pattern; its sign bit is clear


class TopMagnitudes:
    """TIES's pruning of one delta of `size` entries: keeps its `max(1, int(density * size))` largest
    magnitudes, as mergekit's argsort picks them (of those equal to the cut, torch's unstable sort picks in no
    documented order; ours keeps the first in index order). Found over chunks by a radix select on the float32 bit
    patterns of |delta|, which order as the magnitudes do: pass 0 counts the top 16 bits, pass 1 the low 16
    within the bin where the cut falls; the output pass keeps everything above the cut and, of the entries
    equal to it, the first ones in index order."""

    counting_passes = 2

    def __init__(self, size: int, density: float):
        self.keep = max(1, int(density * size))
        self.high = self.low = None  # the counts, while counting (a merge plans every tensor's merger at once)
        self.bin = self.cut = None
        self.above = 0  # entries in the bins above the cut's
        self.equal_left = 0  # entries equal to the cut still to keep, in index order

    @staticmethod
    def _keys(delta: np.ndarray) -> np.ndarray:
        return np.abs(delta).view(np.uint32)

    @staticmethod
    def _nth_from_top(counts: np.ndarray, n: int) -> tuple[int, int]:
        """(the bin holding the n-th largest entry, how many entries lie in bins above it)."""
        from_top = np.cumsum(counts[::-1])
        j = int(np.searchsorted(from_top, n))
        return len(counts) - 1 - j, int(from_top[j - 1]) if j else 0

    def observe(self, p: int, start: int, delta: np.ndarray) -> None:
        keys = self._keys(delta)
        if p == 0:
            if self.high is None:
                self.high = np.zeros(_HIGH_BINS, np.int64)
            self.high += np.bincount(keys >> 16, minlength=_HIGH_BINS)
            return
        if self.bin is None:
            self.bin, self.above = self._nth_from_top(self.high, self.keep)
            self.high, self.low = None, np.zeros(1 << 16, np.int64)
        in_bin = keys[(keys >> 16) == self.bin]
        self.low += np.bincount(in_bin & 0xFFFF, minlength=1 << 16)

    def apply(self, start: int, delta: np.ndarray) -> np.ndarray:
        if self.cut is None:
            low, greater = self._nth_from_top(self.low, self.keep - self.above)
            self.cut = np.uint32(self.bin << 16 | low)
            self.equal_left = self.keep - self.above - greater
            self.low = None
        keys = self._keys(delta)
        mask = keys > self.cut
        if self.equal_left:
            equal = np.flatnonzero(keys == self.cut)[: self.equal_left]
            mask[equal] = True
            self.equal_left -= len(equal)
        return delta * mask.astype(F32)


class RandomDrops:
    """DARE's dropping of one delta: each entry kept with probability `density` (rounded to a multiple of
    2^-16), the kept ones scaled so that the delta keeps its L1 norm when rescaling (one counting pass: the
    L1 norms before and after the drop).

    The drops are 16-bit draws from PCG64, seeded by (the merge's seed, the tensor's name, the model's index)
    and addressed by element: entry i's draw is the same whatever the chunks, so both passes see the same
    mask, and a tensor's drops do not depend on the order tensors are merged in."""

    STEPS = 1 << 16

    def __init__(self, density: float, rescale: bool, seed: int, tensor: str, model: int, dtype=None):
        self.threshold = round(density * self.STEPS)
        # mergekit drops and rescales a bfloat16 delta in bfloat16, any other in float32, then rounds the result
        bf16 = dtype is not None and np.dtype(dtype).name == "bfloat16"
        self.rounded, self.work = rounding(dtype), rounding(dtype if bf16 else None)
        self.seed = np.random.SeedSequence([seed, zlib.crc32(tensor.encode()), model])
        self.counting_passes = 1 if rescale else 0
        self.l1 = np.zeros(2)  # before and after the drop
        self.scale = None

    def kept(self, start: int, n: int) -> np.ndarray:
        """bool [n]: whether entries [start, start + n) are kept (start a multiple of 4: four draws per 64 bits)."""
        if start % 4:
            raise ValueError(f"a chunk starts at element {start}, not a multiple of 4")
        bits = np.random.PCG64(self.seed)
        bits.advance(start // 4)
        return bits.random_raw(-(-n // 4)).view(np.uint16)[:n] < self.threshold

    def observe(self, p: int, start: int, delta: np.ndarray) -> None:
        masked = delta * self.kept(start, delta.size).astype(F32)
        self.l1 += (np.sum(np.abs(delta), dtype=F32), np.sum(np.abs(masked), dtype=F32))

    def apply(self, start: int, delta: np.ndarray) -> np.ndarray:
        masked = delta * self.kept(start, delta.size).astype(F32)
        if self.counting_passes:
            if self.scale is None:
                before, after = self.work(self.l1.astype(F32))
                self.scale = F32(1) if before < 1e-7 or after < 1e-7 else self.work(before / after)
            if self.scale != 1:
                masked = self.rounded(masked * self.scale)
        return masked


# ----------------------------------------------------------------------------- the task-vector family


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


def sparsifier(
    how: str | None,
    density: float,
    size: int,
    rescale: bool,
    seed: int = 0,
    tensor: str = "",
    model: int = 0,
    dtype=None,
):
    """What keeps which entries of one delta of `size` entries: "magnitude" (TIES), "random" (DARE, drawn
    from seed, tensor and model; rescaled as mergekit does in `dtype`) or None."""
    if how is None or density >= 1:
        return Unchanged()
    if how == "magnitude":
        return Dropped() if density <= 0 or size == 0 else TopMagnitudes(size, density)
    if how == "random":
        return RandomDrops(density, rescale, seed, tensor, model, dtype)
    raise ValueError(f"sparsification {how!r}: expected 'magnitude' or 'random'")


class TaskVectors:
    """`base + lam * merge(models - base)` by METHODS[method] for one tensor of `size` entries: each delta
    sparsified to its density, scaled by its weight; with sign election only the entries agreeing with the
    sign of their sum count; the sum divided by the (counted) weights when normalising (the method's default
    unless `normalize` says; DARE rescales unless `rescale` says). DARE's drops come from `seed` and the
    tensor's name.

    mergekit does this arithmetic in the recipe's `dtype` (its tensors are of that dtype), so with `dtype`
    bfloat16 or float16 every step's result is rounded to it as torch rounds it; sums are float32 first.
    (DARE's drop and rescale run in float32 except for bfloat16, as mergekit's do.)"""

    def __init__(
        self,
        method: str,
        weights: list[float],
        size: int,
        densities: list[float] | None = None,
        lam: float = 1.0,
        normalize: bool | None = None,
        seed: int = 0,
        tensor: str = "",
        dtype=None,
        rescale: bool | None = None,
    ):
        self.how = METHODS[method]
        self.rounded = rounding(dtype)
        self.weights = self.rounded(np.asarray(weights, F32))
        self.lam, self.normalize = lam, self.how.normalize if normalize is None else normalize
        densities = densities or [1.0] * len(weights)
        rescale = self.how.rescale if rescale is None else rescale
        self.sparsifiers = [
            sparsifier(self.how.sparsify, d, size, rescale, seed, tensor, i, dtype) for i, d in enumerate(densities)
        ]
        self.counting_passes = max(s.counting_passes for s in self.sparsifiers)

    def observe(self, p: int, start: int, chunks: list[np.ndarray]) -> None:
        base = chunks[0]
        for s, model in zip(self.sparsifiers, chunks[1:]):
            if p < s.counting_passes:
                s.observe(p, start, self.rounded(model - base))

    def merge(self, start: int, chunks: list[np.ndarray]) -> np.ndarray:
        base, models, r = chunks[0], chunks[1:], self.rounded
        deltas = np.empty((len(models), base.size), F32)
        for i, (s, model) in enumerate(zip(self.sparsifiers, models)):
            deltas[i] = s.apply(start, r(model - base))
        w = self.weights.reshape(-1, 1)
        deltas = r(deltas * w)
        if self.how.elect_signs:
            # sign(delta) == the sign of the sum (+1 where it is >= 0): zeros agree with neither. Boolean
            # operators, not np.where, which is ten times slower on a chunk.
            positive = r(np.sum(deltas, axis=0, dtype=F32)) >= 0
            mask = ((deltas > 0) & positive | (deltas < 0) & ~positive).astype(F32)
            mixed = r(np.sum(deltas * mask, axis=0, dtype=F32))
            divisor = r(np.sum(w * mask, axis=0, dtype=F32))
            divisor += divisor == 0  # 1 where no weight counts (a masked assignment is ten times slower)
        else:
            mixed = r(np.sum(deltas, axis=0, dtype=F32))
            divisor = r(np.sum(w, axis=0, dtype=F32))
            divisor = np.where(np.abs(divisor) < 1e-8, F32(1), divisor)
        if self.normalize:
            mixed = r(mixed / divisor)
        if self.lam != 1:
            mixed = r(mixed * F32(self.lam))
        return r(base + mixed)
