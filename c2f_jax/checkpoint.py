"""Orbax checkpoints of a training run: array state (params, optimizer states) plus JSON metadata.

Saves are asynchronous and atomic (Orbax commits a step only when it is complete),
so a run killed at any moment restarts from its last whole checkpoint. Restoring
with a target whose leaves carry shardings places every array on the current
mesh, which may differ from the one that saved it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointError(ValueError):
    """A checkpoint that is missing or does not fit the run."""


class Checkpointer:
    """`WORKDIR/checkpoints/<step>/{state, meta}`, keeping the last `keep`."""

    def __init__(self, workdir: str | os.PathLike, keep: int = 3, async_save: bool = True):
        self.directory = Path(workdir).absolute() / "checkpoints"
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Starts saving `state` (a pytree of arrays) and `meta` (JSON-able) as `step`; returns at once."""
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)))

    def restore(self, step: int | None = None, target: Any = None) -> tuple[Any, dict]:
        """(state, meta) of `step` (default: latest). `target`: a tree of arrays or ShapeDtypeStructs
        (with shardings) to restore onto; None gives the saved structure with host-local arrays."""
        step = self._existing(step)
        if target is not None:
            target = jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), target)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        return restored["state"], restored["meta"]

    def restore_subtree(self, keys: tuple[str, ...], step: int | None = None) -> tuple[Any, dict]:
        """(the saved state's subtree at `keys` as host NumPy arrays, meta) of `step` (default: latest).

        Reads that subtree only: e.g. ("actor", "params") of a coarse run leaves the
        critic and both optimizers' moments (five more models' worth) on disk.
        """
        step = self._existing(step)
        state_dir = self.directory / str(step) / "state"  # the manager's default step naming, as `save` uses it
        try:
            saved = ocp.StandardCheckpointHandler().metadata(state_dir).tree
        except (FileNotFoundError, ValueError) as e:
            raise CheckpointError(f"{state_dir}: unreadable checkpoint state ({e})") from None
        node = saved
        for key in keys:
            if not isinstance(node, dict) or key not in node:
                raise CheckpointError(f"{state_dir}: no {'/'.join(map(str, keys))} in this checkpoint")
            node = node[key]

        def inside(path) -> bool:
            names = tuple(getattr(k, "key", getattr(k, "idx", None)) for k in path)
            return names[:len(keys)] == tuple(keys)

        item = jax.tree_util.tree_map_with_path(
            lambda path, m: jax.ShapeDtypeStruct(m.shape, m.dtype) if inside(path) else ocp.PLACEHOLDER, saved)
        args = jax.tree_util.tree_map_with_path(
            lambda path, m: ocp.RestoreArgs(restore_type=np.ndarray) if inside(path) else ocp.PLACEHOLDER, saved)
        restored = ocp.PyTreeCheckpointHandler().restore(state_dir, args=ocp.args.PyTreeRestore(item=item,
                                                                                               restore_args=args))
        for key in keys:
            restored = restored[key]
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        return restored, meta

    def _existing(self, step: int | None) -> int:
        step = self.latest_step() if step is None else step
        if step is None or step not in self.steps():
            raise CheckpointError(f"{self.directory}: no checkpoint for step {step} (have {self.steps()})")
        return step

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
