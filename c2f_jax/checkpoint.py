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
        step = self.latest_step() if step is None else step
        if step is None or step not in self.steps():
            raise CheckpointError(f"{self.directory}: no checkpoint for step {step} (have {self.steps()})")
        if target is not None:
            target = jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), target)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        return restored["state"], restored["meta"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
