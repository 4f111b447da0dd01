"""Orbax checkpoints of a training run: array state (params, optimizer states) plus JSON metadata.

Saves are asynchronous and atomic (Orbax commits a step only when it is complete),
so a run killed at any moment restarts from its last whole checkpoint. Restoring
with a target whose leaves carry shardings places every array on the current
mesh, which may differ from the one that saved it.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import gc
import inspect
import json
import logging
import os
import re
import shutil
import sys
import traceback
import types
import warnings
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointError(ValueError):
    """A checkpoint that is missing or does not fit the run."""


# A failed save or restore closes Orbax's event loop while TensorStore still completes the other writes or reads
# in flight; each reports back, a traceback apiece: "Event loop is closed" from TensorStore's callback thread (an
# unraisable exception), a write or read task's exception that asyncio or absl logs, a TensorStore future's
# exception that asyncio logs when the future is collected (it carries no traceback, only TensorStore's
# "<STATUS>: Error reading ..." text), or a read coroutine never awaited. They arrive from other threads, before
# the failure reaches the save, wait or restore that raises it as one line (and after: when the futures are
# collected, up to the process's end), and the command ends with that line; so these echoes, and only these
# (Orbax's and TensorStore's), are dropped from the first Checkpointer a process opens to its end.
_ORBAX = os.path.dirname(os.path.dirname(ocp.__file__)) + os.sep  # the orbax package's folder


def _in_orbax(code: types.CodeType) -> bool:
    return code.co_filename.startswith(_ORBAX)


def _from_orbax(tb) -> bool:
    while tb is not None:
        if _in_orbax(tb.tb_frame.f_code):
            return True
        tb = tb.tb_next
    return False


def _echo(record: logging.LogRecord) -> bool:
    if not record.exc_info:
        return False
    _, exc, tb = record.exc_info
    return _from_orbax(tb) or bool(re.match(r"[A-Z_]+: Error (reading|writing) ", str(exc)))


def _closed_loop_callback(unraisable) -> bool:
    """TensorStore's native thread calling `loop.call_soon_threadsafe` on Orbax's closed loop: the traceback
    starts in asyncio (no Python caller) and the unraisable has no object."""
    tb = unraisable.exc_traceback
    return (
        unraisable.object is None
        and isinstance(unraisable.exc_value, RuntimeError)
        and str(unraisable.exc_value) == "Event loop is closed"
        and tb is not None
        and tb.tb_frame.f_code.co_name == "call_soon_threadsafe"
    )


_UNREAD = "_read_array_index_and_device_put"  # Orbax's per-array read coroutine


def _ignore_unread_warning() -> tuple:
    """Filters the warning of a never-awaited `_UNREAD` (one entry however often called); returns the entry.
    Called again where it is needed: any `warnings.catch_warnings` exit (another thread's) can drop it."""
    warnings.filterwarnings("ignore", message=f"coroutine '{_UNREAD}' was never awaited")
    return warnings.filters[0]


_LOGGERS = ("asyncio", "absl")  # where Orbax's threads and asyncio log a failed task


def drop_orbax_echoes() -> Callable[[], None]:
    """Installs the filters of these echoes (sys.unraisablehook, the asyncio and absl loggers, one warning);
    returns the function that removes them again."""
    previous = sys.unraisablehook

    def hook(unraisable) -> None:
        code = getattr(unraisable.object, "cr_code", None)
        if not (
            _closed_loop_callback(unraisable)
            or (code is not None and _in_orbax(code))
            or _from_orbax(unraisable.exc_traceback)
        ):
            previous(unraisable)

    def log_filter(record) -> bool:
        return not _echo(record)

    sys.unraisablehook = hook
    for name in _LOGGERS:
        logging.getLogger(name).addFilter(log_filter)
    added = _ignore_unread_warning()

    def remove() -> None:
        if sys.unraisablehook is hook:
            sys.unraisablehook = previous
        for name in _LOGGERS:
            logging.getLogger(name).removeFilter(log_filter)
        if added in warnings.filters:
            warnings.filters.remove(added)

    return remove


@functools.cache
def _drop_orbax_echoes_from_now_on() -> None:
    """drop_orbax_echoes, once per process, never removed: a Checkpointer closed after (or beside) another's
    failure must not take away the filters that failure's echoes still need."""
    drop_orbax_echoes()


def _finalise_failed_read(error: BaseException) -> None:
    """Finalises what a failed read abandoned (coroutines never awaited) now, with the filter of their warning
    renewed, and once more at exit (`_close_abandoned_reads`) for those still held then."""
    _ignore_unread_warning()
    traceback.clear_frames(error.__traceback__)
    gc.collect()
    atexit.unregister(_close_abandoned_reads)
    atexit.register(_close_abandoned_reads)


def _close_abandoned_reads() -> None:
    """At exit, after the other threads have ended: closes the never-started read coroutines of a failed read
    that something still holds (closing one that never ran raises no warning) and filters the warning of any
    collected later. Without it, an intermittent 'coroutine ... was never awaited' printed at interpreter exit,
    under the command's one error line: the filter set during the read can be dropped by another thread's
    `warnings.catch_warnings` restoring its copy of the filters."""
    _ignore_unread_warning()
    gc.collect()
    for obj in gc.get_objects():
        # type(), not isinstance(): that reads __class__, which some objects compute (and warn from)
        if (
            type(obj) is types.CoroutineType
            and obj.cr_code.co_name == _UNREAD
            and inspect.getcoroutinestate(obj) == inspect.CORO_CREATED
        ):
            obj.close()


# Files every step Checkpointer.save writes holds, relative to the step folder.
STEP_FILES = ("_CHECKPOINT_METADATA", "state/_METADATA", "state/manifest.ocdbt", "meta/metadata")


def step_dirs(workdir: str | os.PathLike) -> dict[int, Path]:
    """The committed step folders of WORKDIR/checkpoints, read without opening a manager (which would create
    the folder); Orbax names an uncommitted step `<step>.orbax-checkpoint-tmp-...`, never a bare number."""
    folder = Path(workdir) / "checkpoints"
    if not folder.is_dir():
        return {}
    return dict(sorted((int(p.name), p) for p in folder.iterdir() if p.name.isdigit() and p.is_dir()))


def check_files(step_dir: Path) -> None:
    """A CheckpointError naming the step and the file when one of a step's own files is missing or garbled.
    Cheap (metadata only); a truncated array file shows only when read (see `unreadable`)."""
    step = step_dir.name
    for name in STEP_FILES:
        if not (step_dir / name).is_file():
            raise CheckpointError(f"checkpoint step {step}: {step_dir / name} is missing (a partial copy?)")
    for name in ("state/_METADATA", "meta/metadata", "_CHECKPOINT_METADATA"):
        try:
            json.loads((step_dir / name).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"checkpoint step {step}: {step_dir / name} is not valid JSON (truncated?)") from None
    if not any((step_dir / "state").glob("ocdbt.process_*/manifest.ocdbt")):
        raise CheckpointError(f"checkpoint step {step}: {step_dir / 'state'} holds no ocdbt.process_*/manifest.ocdbt")


def unreadable(step_dir: Path, error: BaseException) -> CheckpointError:
    """A one-line CheckpointError for a failure reading `step_dir`'s arrays, naming the tensor and, for a file
    cut short, the file (TensorStore names the tensor and the size it found; the data file of that size is
    the one)."""
    chain, e = [], error
    while e is not None and len(chain) < 5:  # Orbax wraps TensorStore's error, which says what went wrong
        chain.append(str(e))
        e = e.__cause__ or e.__context__
    text = " ".join(" ".join(chain).split())
    tensor = re.search(r'Error reading "([^"/]+)', text)
    what = f"tensor {tensor.group(1).replace('.', '/')}" if tensor else "its arrays"
    size = re.search(r"value of size (\d+)", text)
    cut = [
        p for p in (step_dir / "state").rglob("*") if size and p.is_file() and p.stat().st_size == int(size.group(1))
    ]
    if cut:
        return CheckpointError(
            f"checkpoint step {step_dir.name}: {what} cannot be read: {cut[0]} is truncated ({size.group(1)} bytes)"
        )
    return CheckpointError(
        f"checkpoint step {step_dir.name}: {what} cannot be read from {step_dir / 'state'} "
        f"({type(error).__name__}: {text[:200]})"
    )


def latest_checked(workdir: str | os.PathLike) -> int | None:
    """The latest step on disk (None without checkpoints), once its files are all there; else a CheckpointError
    saying what is broken and how to go on (`with_hint`). No folder is created."""
    steps = step_dirs(workdir)
    if not steps:
        return None
    latest = max(steps)
    try:
        check_files(steps[latest])
    except CheckpointError as e:
        raise with_hint(workdir, latest, e) from None
    return latest


def with_hint(workdir: str | os.PathLike, step: int, error: CheckpointError) -> CheckpointError:
    """`error` (about `step`) with what to do: resume from the latest earlier step that reads back whole, by
    moving the broken one aside, or start over. Never a silent fallback: the run would lose steps unseen."""
    ckpt = Checkpointer(workdir)
    try:
        for earlier in sorted((s for s in step_dirs(workdir) if s < step), reverse=True):
            try:
                ckpt.restore_subtree((), earlier)
            except CheckpointError:
                continue
            broken = ckpt.directory / str(step)
            return CheckpointError(
                f"{error}; step {earlier} is intact: to resume from it, move the broken step "
                f"aside (mv {broken} {ckpt.directory.parent / f'broken-step-{step}'}) and rerun"
            )
    finally:
        ckpt.close()
    return CheckpointError(f"{error}; no earlier checkpoint is intact: use another --workdir to start over")


class Checkpointer:
    """`WORKDIR/checkpoints/<step>/{state, meta}`, keeping the last `keep`."""

    def __init__(self, workdir: str | os.PathLike, keep: int = 3, async_save: bool = True, writer: bool = False):
        """`writer`: the job that holds the workdir (runtime.workdir_lock); it removes the uncommitted folders
        a save cut off (a kill, a full disk) left behind. A reader must not: they may be a running save's."""
        self.directory = Path(workdir).absolute() / "checkpoints"
        self.options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True, cleanup_tmp_directories=writer
        )
        _drop_orbax_echoes_from_now_on()  # before the manager: making it can fail on a bad disk too
        self.manager = ocp.CheckpointManager(self.directory, options=self.options)
        self._saving: int | None = None

    def steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Starts saving `state` (a pytree of arrays) and `meta` (JSON-able) as `step`; returns at once."""
        self.wait()  # the previous save: its failure is its own
        self._saving = step
        with self._save_failures():
            self.manager.save(
                step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
            )

    def restore(self, step: int | None = None, target: Any = None) -> tuple[Any, dict]:
        """(state, meta) of `step` (default: latest). `target`: a tree of arrays or ShapeDtypeStructs
        (with shardings) to restore onto; None gives the saved structure with host-local arrays."""
        step = self._existing(step)
        if target is not None:
            target = jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), target
            )
        step_dir = self.directory / str(step)
        check_files(step_dir)
        try:
            restored = self.manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())
            )
        except Exception as e:  # TensorStore's and Orbax's errors (of several types) for a file cut short or garbled
            _finalise_failed_read(e)
            raise unreadable(step_dir, e) from None
        return restored["state"], restored["meta"]

    def restore_subtree(self, keys: tuple[str, ...], step: int | None = None) -> tuple[Any, dict]:
        """(the saved state's subtree at `keys` as host NumPy arrays, meta) of `step` (default: latest).

        Reads that subtree only: e.g. ("actor", "params") of a coarse run leaves the
        critic and both optimizers' moments (five more models' worth) on disk.
        """
        step = self._existing(step)
        state_dir = self.directory / str(step) / "state"  # the manager's default step naming, as `save` uses it
        check_files(state_dir.parent)
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
            return names[: len(keys)] == tuple(keys)

        item = jax.tree_util.tree_map_with_path(
            lambda path, m: jax.ShapeDtypeStruct(m.shape, m.dtype) if inside(path) else ocp.PLACEHOLDER, saved
        )
        args = jax.tree_util.tree_map_with_path(
            lambda path, m: ocp.RestoreArgs(restore_type=np.ndarray) if inside(path) else ocp.PLACEHOLDER, saved
        )
        handler = ocp.PyTreeCheckpointHandler()
        try:
            restored = handler.restore(state_dir, args=ocp.args.PyTreeRestore(item=item, restore_args=args))
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:
            _finalise_failed_read(e)
            raise unreadable(state_dir.parent, e) from None
        finally:
            handler.close()
        for key in keys:
            restored = restored[key]
        return restored, meta

    def _existing(self, step: int | None) -> int:
        step = self.latest_step() if step is None else step
        if step is None or step not in self.steps():
            raise CheckpointError(f"{self.directory}: no checkpoint for step {step} (have {self.steps()})")
        return step

    def wait(self) -> None:
        with self._save_failures():
            self.manager.wait_until_finished()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.manager.close()

    @contextlib.contextmanager
    def _save_failures(self):
        """A failed save (a full disk, a lost filesystem) as one CheckpointError naming the step; the step's
        uncommitted folder is removed (an earlier checkpoint is the latest again)."""
        try:
            yield
        except Exception as e:
            step, self._saving = self._saving, None
            try:  # a failed save leaves the manager's other futures of it to fail later: start afresh
                self.manager.close()
            except Exception:
                pass
            for tmp in self.directory.glob(f"{step}.orbax-checkpoint-tmp*"):
                shutil.rmtree(tmp, ignore_errors=True)
            self.manager = ocp.CheckpointManager(self.directory, options=self.options)
            text = str(e)
            cause = (
                "no space left on device"
                if "No space left on device" in text or "os_error_code='28'" in text
                else text.splitlines()[0][:300]
                if text
                else type(e).__name__
            )
            raise CheckpointError(
                f"{self.directory / str(step)}: the checkpoint was not saved ({cause}); the "
                f"latest intact one is step {self.latest_step()}"
            ) from None
