"""Device mesh, logical axis names and the two layouts (train, rollout).

Mesh axes: ('data', 'fsdp', 'tensor'). Every param dimension has a logical name
(derived from where it sits in the param tree) and one rules table per layout
maps names to mesh axes:

  train    params, gradients and optimizer moments sharded over `fsdp` on the
           model dimension (ZeRO-3-like; XLA all-gathers a layer's weights when
           it runs), heads/mlp/vocab over `tensor`; batch over data x fsdp.
  rollout  tensor parallelism only (heads, kv heads, mlp, vocab over `tensor`),
           weights replicated over data and fsdp, batch over data x fsdp: decoding
           never all-gathers FSDP shards per token. The actor moves from the train
           to the rollout layout once per iteration, in a compiled reshard.

A dimension that does not divide by its mesh axes stays replicated (a tiny model
with 2 kv heads on tensor=4, say) rather than failing.
"""

from __future__ import annotations

import contextlib
import contextvars

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

Params = dict

AXES = ("data", "fsdp", "tensor")
BATCH = ("data", "fsdp")

# Logical name of each dimension, by param name (without the leading stacked-layer axis).
PARAM_AXES = {
    "embed": ("vocab", "model"),
    "lm_head": ("model", "vocab"),
    "score": ("model", None),
    "scale": ("norm",),
    "q": ("model", "heads", "head_dim"),
    "k": ("model", "kv_heads", "head_dim"),
    "v": ("model", "kv_heads", "head_dim"),
    "o": ("heads", "head_dim", "model"),
    "gate": ("model", "mlp"),
    "up": ("model", "mlp"),
    "down": ("mlp", "model"),
    "down_t": ("model", "mlp"),
}
RULES = {
    "train": {"model": "fsdp", "heads": "tensor", "kv_heads": "tensor", "mlp": "tensor", "vocab": "tensor"},
    "rollout": {"heads": "tensor", "kv_heads": "tensor", "mlp": "tensor", "vocab": "tensor"},
}


class ShardingError(ValueError):
    """A mesh that does not fit the devices or the batch."""


_TRACE_MESH: contextvars.ContextVar = contextvars.ContextVar("c2f_trace_mesh", default=None)


@contextlib.contextmanager
def tracing_on(mesh: Mesh | None):
    """Within this context, shard_as hints resolve against `mesh` (used while a program is traced); None turns
    them off (`backend.Backend.sharding_hints`)."""
    token = _TRACE_MESH.set(mesh)
    try:
        yield
    finally:
        _TRACE_MESH.reset(token)


def shard_as(x: jax.Array, *axes) -> jax.Array:
    """Constrains an activation's layout inside a program traced under `tracing_on(mesh)`.

    axes name mesh axes per dimension (a tuple for several, None for replicated);
    a dimension that does not divide stays replicated. Without a mesh (plain
    single-device calls) it is the identity. Without these hints GSPMD may resolve
    the batch-vs-weight conflict of FSDP by replicating the batch.
    """
    mesh = _TRACE_MESH.get()
    if mesh is None:
        return x
    spec = []
    for size, ax in zip(x.shape, axes):
        names = ax if isinstance(ax, tuple) else (ax,) if ax else ()
        n = int(np.prod([mesh.shape[a] for a in names])) if names else 1
        spec.append(ax if names and n > 1 and size % n == 0 else None)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(*spec)))


def check_mesh(data: int, fsdp: int, tensor: int, devices: int | None = None) -> None:
    """A ShardingError unless the axis sizes are positive integers that fit the devices (all of them when
    several processes share the mesh; on one host a smaller mesh takes the first ones)."""
    for axis, size in zip(AXES, (data, fsdp, tensor)):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ShardingError(f"mesh.{axis}={size!r} must be an integer >= 1")
    devices = jax.device_count() if devices is None else devices
    n = data * fsdp * tensor
    if n > devices or (jax.process_count() > 1 and n != devices):
        raise ShardingError(
            f"mesh data={data} x fsdp={fsdp} x tensor={tensor} = {n} devices, but {devices} are available"
        )


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh over all devices of all hosts (or the given ones).

    On a single host a smaller mesh takes the first devices (a 1x1x1 tiny run on a
    GPU box, or on fake CPU devices in tests). Axis types are passed explicitly
    (Auto: GSPMD propagation), since newer JAX defaults differ.
    """
    devices = jax.devices() if devices is None else devices
    check_mesh(data, fsdp, tensor, len(devices))
    n = data * fsdp * tensor
    if jax.process_count() == 1 and n < len(devices):
        devices = devices[:n]
    return jax.make_mesh((data, fsdp, tensor), AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=devices)


def logical_axes(path, leaf) -> tuple:
    """Logical names of a param's dimensions from its tree path; a leading stacked-layer axis is 'layers'."""
    name = str(getattr(path[-1], "key", path[-1]))
    base = PARAM_AXES.get(name)
    if base is None:
        raise ShardingError(f"param {'/'.join(str(getattr(p, 'key', p)) for p in path)} has no logical axes")
    extra = leaf.ndim - len(base)
    return ("layers",) * extra + base


def spec_for(shape, names, rules: dict, mesh: Mesh) -> P:
    """PartitionSpec for one array; a dimension not divisible by its mesh axis stays replicated."""
    spec, used = [], set()
    for size, name in zip(shape, names):
        axis = rules.get(name)
        if axis is None or axis in used or size % mesh.shape[axis]:
            spec.append(None)
        else:
            spec.append(axis)
            used.add(axis)
    return P(*spec)


def param_shardings(mesh: Mesh, params: Params, layout: str = "train") -> Params:
    """A tree like params of NamedShardings in the given layout ('train' or 'rollout')."""
    rules = RULES[layout]
    return jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(mesh, spec_for(x.shape, logical_axes(path, x), rules, mesh)), params
    )


def like_params(mesh: Mesh, tree, params: Params, layout: str = "train"):
    """Shardings for a tree that embeds params-shaped subtrees (optimizer moments, train states).

    A leaf whose path ends with a param's path and has its shape gets that param's
    sharding; everything else (step counters, scalars) is replicated.
    """
    by_path = {}
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        by_path[tuple(str(getattr(p, "key", p)) for p in path)] = (x.shape, logical_axes(path, x))
    rules, replicated = RULES[layout], NamedSharding(mesh, P())

    def pick(path, x):
        keys = tuple(str(getattr(p, "key", getattr(p, "name", p))) for p in path)
        for n in range(len(keys), 0, -1):
            hit = by_path.get(keys[-n:])
            if hit is not None and hit[0] == tuple(x.shape):
                return NamedSharding(mesh, spec_for(x.shape, hit[1], rules, mesh))
        return replicated

    return jax.tree_util.tree_map_with_path(pick, tree)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Leading (batch) axis over data x fsdp, the rest replicated."""
    return NamedSharding(mesh, P(BATCH, *([None] * (ndim - 1))))


def batch_size_check(mesh, batch: int, what: str = "batch") -> None:
    """A batch dimension must split over data x fsdp, or every device would hold (and compute) all of it.
    `mesh`: a Mesh, or its axis sizes as a mapping (before devices are touched)."""
    shape = getattr(mesh, "shape", mesh)
    n = shape["data"] * shape["fsdp"]
    if batch < 1:
        raise ShardingError(f"{what}={batch} must be >= 1")
    if batch % n:
        raise ShardingError(f"{what} size {batch} does not split over data x fsdp = {n} devices")


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def place(tree, shardings):
    """device_put a tree onto a tree of shardings (a single sharding applies to every leaf)."""
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda x: jax.device_put(x, shardings), tree)
    return jax.tree.map(jax.device_put, tree, shardings)


def to_host(x) -> np.ndarray:
    """A (possibly multi-host sharded) array as one NumPy array on every host."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def shard_shapes(x: jax.Array) -> set:
    """Shapes of the shards this process holds (for checking that params really are split)."""
    return {tuple(s.data.shape) for s in x.addressable_shards}


def host_slice(batch_size: int) -> slice:
    """The rows of a global batch this host feeds (data is sharded per host along the batch)."""
    per = batch_size // jax.process_count()
    return slice(jax.process_index() * per, (jax.process_index() + 1) * per)


def global_batch(mesh: Mesh, host_rows: np.ndarray) -> jax.Array:
    """A global [B, ...] array from this host's rows, batch-sharded over data x fsdp."""
    sharding = batch_sharding(mesh, host_rows.ndim)
    if jax.process_count() == 1:
        return jax.device_put(host_rows, sharding)
    return jax.make_array_from_process_local_data(sharding, host_rows)
