"""The training workdir: its files, and how anything outside Orbax is written.

    WORKDIR/
      run_config.json      the resolved config; a restart checks it against the new one
      job.lock             held by the running job (c2f_jax.runtime.workdir_lock)
      model_config.json    the trained model's architecture (an HF config.json dict)
      tokenizer/           the run's tokenizer (HF files)
      checkpoints/<step>/  Orbax: array state and JSON meta (c2f_jax.runtime.checkpoint)
      metrics.jsonl        one JSON object per step; tensorboard/ beside it
      base_model/          the tiny demo's base model (HF folder), when the run made it
      reward_run/          the tiny demo's inline reward job (a workdir itself), and
      reward_model/        its export (HF folder)

The trained model is read back and exported by c2f_jax.model.export.

Every file this project writes outside Orbax goes through `write`: built under a
temporary sibling name and renamed into place, so a killed run never leaves a
half-written file; in a multi-process job process 0 writes and the others wait
for it. No JAX here at import time (the merger and the file tools use this module).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import shutil
from pathlib import Path
from typing import Callable

from c2f_jax.runtime import distributed
from c2f_jax.runtime.workdir_lock import process_alive

RUN_CONFIG = "run_config.json"
MODEL_CONFIG = "model_config.json"
TOKENIZER = "tokenizer"
CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
BASE_MODEL = "base_model"
REWARD_RUN = "reward_run"
REWARD_MODEL = "reward_model"
# The files in a workdir that a command other than training writes (c2f-plot's default output).
RUN_PLOT = "run.png"
WORKDIR_OUTPUTS = (RUN_PLOT,)
# Keys that may change between a run and its resumption; any other difference is an incompatible config.
RESUMABLE_KEYS = ("steps", "checkpoint_every", "keep_checkpoints", "eval_every", "mesh.")
# The checkpoint subtree holding a job's trained model.
TRAINED_MODEL = {"coarse": ("actor", "params"), "reward": ("reward", "params")}


class WorkdirError(ValueError):
    """A folder that is not a usable training workdir, or an output that may not be replaced."""


# ----------------------------------------------------------------------------- writing


_nested = {"depth": 0}


@contextlib.contextmanager
def output(path: str | os.PathLike, overwrite: bool = False, folder: bool = False):
    """Yields a temporary sibling of `path` (an empty folder when `folder`), renamed onto `path` when the
    block completes and removed when it raises. Only the writing process uses this: see `write`."""
    path = Path(path)
    check_replaceable(path, overwrite, folder)
    if not path.parent.is_dir():
        raise WorkdirError(f"{path.parent}: parent folder does not exist")
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    _remove(tmp)
    _remove_abandoned(path)
    if folder:
        tmp.mkdir()
    try:
        yield tmp
    except OSError as e:
        _remove(tmp)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):  # name what was being written, not its temporary name
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise
    except BaseException:
        _remove(tmp)
        raise
    old = path.parent / f".{path.name}.old-{os.getpid()}"
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    _remove(old)


def _remove_abandoned(path: Path) -> None:
    """Removes the temporaries of `path` left by writers on this host that were killed mid-write (their process
    is gone): a killed run's next write of the same file leaves no clutter behind."""
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*-*"):
        kind, _, pid = stale.name[len(path.name) + 2 :].rpartition("-")
        if kind in ("tmp", "old") and pid.isdigit() and int(pid) != os.getpid() and not process_alive(int(pid)):
            _remove(stale)


def remove_if_empty(path: str | os.PathLike) -> None:
    """Removes the folder `path` when it holds no file, only (empty) folders: what a run that failed before its
    first write leaves."""
    path = Path(path)
    if path.is_dir() and not any(p.is_file() or p.is_symlink() for p in path.rglob("*")):
        shutil.rmtree(path, ignore_errors=True)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def write(
    path: str | os.PathLike, fill: Callable[[Path], object], overwrite: bool = False, folder: bool = False
) -> Path:
    """The one way a file or folder gets written: `fill(tmp)` builds it at a temporary path (an empty
    folder when `folder`), which is renamed onto `path` once complete.

    In a multi-process job only process 0 runs `fill`; every process returns once the result is in
    place (a barrier), so all may read it next. A `write` inside a `fill` just writes.
    """
    path = Path(path)
    writing = distributed.writes_here()
    if writing:
        _nested["depth"] += 1
        try:
            with distributed.working(f"writing {path}"), output(path, overwrite, folder) as tmp:
                fill(tmp)
        finally:
            _nested["depth"] -= 1
    if _nested["depth"] == 0:
        distributed.barrier("write")  # names must agree across processes: a temporary path's may not
    return path


def check_replaceable(
    out: str | os.PathLike, overwrite: bool = False, folder: bool = True, flag: str = "--out"
) -> None:
    """A WorkdirError unless writing `out` (a folder when `folder`, else a file) may take its place: an existing
    path is replaced only with `overwrite`, and a folder never by a file, nor a file by a folder."""
    out = Path(out)
    if not out.exists() and not out.is_symlink():
        return
    if out.is_dir() and not folder:
        raise WorkdirError(f"{flag} {out}: is a folder; a file would replace it and everything in it (name a file)")
    if not out.is_dir() and folder:
        raise WorkdirError(f"{flag} {out}: is a file, not a folder; choose another output")
    if not overwrite:
        raise WorkdirError(f"{flag} {out}: already exists (pass --overwrite to replace it)")


def check_apart(out, inputs, flag: str = "--out") -> None:
    """A WorkdirError when `out` is, is inside, or contains one of `inputs` ({flag or key: path}, or such pairs;
    None and names that are no path, such as a hub dataset, are skipped): writing there would mix the output
    into what the command reads, or replace it."""
    target = Path(out).absolute().resolve()
    for name, src in inputs.items() if hasattr(inputs, "items") else inputs:
        if not src or not Path(src).exists():
            continue
        source = Path(src).absolute().resolve()
        relation = (
            "is"
            if target == source
            else "is inside"
            if source in target.parents
            else "contains"
            if target in source.parents
            else None
        )
        if relation:
            raise WorkdirError(f"{flag} {out}: {relation} the input {name} {src}; choose another output")


def check_output(out, inputs, flag: str = "--out", overwrite: bool = False, folder: bool = True) -> None:
    """The output rule of every command, checked before any work. `out` (a folder when `folder`, else a file):
    - may not be, be inside, or contain one of `inputs` (`check_apart`);
    - may not be or be inside a training workdir (but for the files a workdir lets commands write there,
      WORKDIR_OUTPUTS): a workdir is days of training;
    - replaces an existing path only with `overwrite`, and never a folder by a file (`check_replaceable`).
    """
    check_apart(out, inputs, flag)
    target = Path(out).absolute().resolve()
    holder = next((p for p in (target, *target.parents) if is_workdir(p)), None)
    if holder is not None and not (not folder and target.parent == holder and target.name in WORKDIR_OUTPUTS):
        where = "is" if holder == target else "is inside"
        raise WorkdirError(f"{flag} {out}: {where} the training workdir {holder}; choose another output")
    check_replaceable(out, overwrite, folder, flag)


def write_text(path: str | os.PathLike, text: str, overwrite: bool = True) -> Path:
    return write(path, lambda tmp: tmp.write_text(text), overwrite)


def write_json(path: str | os.PathLike, obj, overwrite: bool = True) -> Path:
    return write_text(path, json.dumps(obj, indent=2) + "\n", overwrite)


# ----------------------------------------------------------------------------- reading


def is_workdir(path: str | os.PathLike) -> bool:
    return (Path(path) / RUN_CONFIG).is_file()


def run_config(path: str | os.PathLike) -> dict:
    """The resolved config a workdir's run was started with."""
    file = Path(path) / RUN_CONFIG
    if not file.is_file():
        raise WorkdirError(f"{path}: no {RUN_CONFIG}; not a c2f_jax training workdir")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise WorkdirError(f"{file}: not valid JSON ({e})") from None


def job(path: str | os.PathLike) -> str:
    name = run_config(path).get("job")
    if name not in TRAINED_MODEL:
        raise WorkdirError(f"{Path(path) / RUN_CONFIG}: job={name!r}; expected one of {sorted(TRAINED_MODEL)}")
    return name


def flatten(d: dict, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1}."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def check_resumable(path: str | os.PathLike, config: dict) -> None:
    """A WorkdirError naming the first key (other than RESUMABLE_KEYS) where `config` differs from the
    config the workdir's checkpoints were made with."""
    saved, new = flatten(run_config(path)), flatten(config)
    for key in sorted(set(saved) | set(new)):
        if key.startswith(RESUMABLE_KEYS) or saved.get(key) == new.get(key):
            continue
        raise WorkdirError(
            f"{path} holds checkpoints of an incompatible config: {key} was "
            f"{saved.get(key)!r}, now {new.get(key)!r} (use another --workdir)"
        )
