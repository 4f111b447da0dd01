"""One job per workdir: a job holds WORKDIR/job.lock while it runs, so a second copy of it is refused.

The hold is a small JSON file (host, process id, its start time, since when), made with O_EXCL and renewed
(its mtime) every RENEW seconds by a thread. A hold is stale, and taken over with a line saying so, when its
process is gone from this host (kill -9), or when nobody has renewed it for STALE seconds (a lost node; no
other host can see its processes). In a multi-process job process 0 holds the workdir for all (jobs/setup.py).
A job releases its hold at its end (jobs/), a process every hold it still has when it exits, whatever the
way; taking a hold the process already has is a no-op.
Not covered: two jobs taking over the same stale hold in the same instant.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

LOCK = "job.lock"
RENEW = 15  # seconds
STALE = 120  # seconds without renewal: the holder is gone (several RENEWs, for a slow shared filesystem)

_held: dict[Path, dict] = {}
_renewing = threading.Event()


class HeldError(ValueError):
    """The workdir is held by a live job."""


def _start_ticks(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc): tells a reused process id apart."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _pid_max() -> int:
    try:
        return int(Path("/proc/sys/kernel/pid_max").read_text())
    except (OSError, ValueError):
        return 1 << 22  # Linux's largest


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs on this host (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _record() -> dict:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "start_ticks": _start_ticks(os.getpid()),
        "since": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }


def _describe(holder: dict) -> str:
    return f"host {holder.get('host', '?')}, process id {holder.get('pid', '?')}, since {holder.get('since', '?')}"


def _read(lock: Path) -> dict:
    try:
        holder = json.loads(lock.read_text())
    except (OSError, ValueError):  # a holder cut off while writing it: judged by its age alone
        return {}
    return holder if isinstance(holder, dict) else {}


def _gone(holder: dict, lock: Path) -> str | None:
    """Why the holder is gone, or None if it may be alive."""
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return "released"
    pid = holder.get("pid")
    if holder.get("host") == socket.gethostname() and pid is not None:
        if isinstance(pid, bool) or not isinstance(pid, int) or not 0 < pid <= _pid_max():
            return f"its process id {pid!r} cannot exist on this host"
        if not process_alive(pid) or _start_ticks(pid) != holder.get("start_ticks"):
            return "its process no longer runs on this host"
        return None
    if age > STALE:
        return f"not renewed for {age:.0f} s"
    return None


def hold(workdir: str | os.PathLike) -> None:
    """Holds `workdir` (an existing folder) for this process until it ends. Raises HeldError naming the holder
    when a live job holds it; takes over a stale hold, saying so on stderr."""
    lock = (Path(workdir) / LOCK).absolute()
    if lock in _held:
        return
    mine = _record()
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read(lock)
            if holder.get("host") == mine["host"] and holder.get("pid") == mine["pid"]:
                break  # this process's own hold, from before
            gone = _gone(holder, lock)
            if gone is None:
                raise HeldError(
                    f"{workdir}: in use by another job ({_describe(holder)}, in {lock}); wait for it "
                    "to end or use another --workdir"
                ) from None
            if gone != "released":
                print(
                    f"{workdir}: taking over the hold of a job that is gone ({_describe(holder)}: {gone})",
                    file=sys.stderr,
                    flush=True,
                )
            try:
                lock.unlink()
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(mine) + "\n")
        break
    else:
        raise HeldError(f"{workdir}: could not take {lock}: other jobs keep taking it")
    _held[lock] = mine
    if not _renewing.is_set():
        _renewing.set()
        threading.Thread(target=_renew, name="c2f-workdir-hold", daemon=True).start()
        atexit.register(release_all)


def _renew() -> None:
    while True:
        time.sleep(RENEW)
        for lock in list(_held):
            try:
                os.utime(lock)
            except OSError:  # removed or unreachable: the next job will judge it by what it finds
                pass


def release(workdir: str | os.PathLike) -> None:
    """Gives up the hold on `workdir` (a job's end): its lock file is removed if it is still ours."""
    lock = (Path(workdir) / LOCK).absolute()
    mine = _held.pop(lock, None)
    holder = _read(lock) if mine is not None else {}
    if holder and (holder.get("host"), holder.get("pid")) == (mine["host"], mine["pid"]):
        try:
            lock.unlink()
        except OSError:
            pass


def release_all() -> None:
    """Gives up every hold of this process (at its end, however it ends)."""
    for lock in list(_held):
        release(lock.parent)
