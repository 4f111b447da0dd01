"""What a run shows: WORKDIR/metrics.jsonl (one object per step), TensorBoard events, a progress bar."""

from __future__ import annotations

import json
import math
import os
import socket
import struct
import sys
import time
from pathlib import Path

from tqdm import tqdm

from c2f_jax.runtime import distributed, workdir


def read_metrics(path: str | os.PathLike, drop_torn_last_line: bool = False, warn: bool = True) -> list[dict]:
    """The rows of a workdir's metrics.jsonl (none before the first step). A line that is no JSON row is a
    WorkdirError naming the file and line, but for a torn last line (a crash mid-write, a partial copy) when
    `drop_torn_last_line`: that row is left out, with a warning on stderr."""
    file = Path(path) / workdir.METRICS
    if not file.exists():
        return []
    lines = file.read_text(errors="replace").splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise ValueError("a row without its step")
        except ValueError as e:
            if drop_torn_last_line and number == len(lines):
                if warn:
                    print(
                        f"warning: {file}:{number}: dropped a torn last line (written after the last checkpoint)",
                        file=sys.stderr,
                    )
                break
            reason = "torn (a crash mid-write?)" if number == len(lines) else str(e).split(":")[0]
            raise workdir.WorkdirError(f"{file}:{number}: not a metrics row: {reason}") from None
        rows.append(row)
    return rows


def _json_number(x):
    if isinstance(x, (int, bool)):
        return int(x)
    x = float(x)
    return x if math.isfinite(x) else str(x)  # JSON has no NaN; keep it visible as a string


class MetricsWriter:
    """Appends one JSON line and one TensorBoard event per step (process 0 only).

    On resume from step N, lines for steps > N (written after that checkpoint) are dropped first, so the file
    reads as one uninterrupted run, and TensorBoard is told to forget its events after N. A step's line and
    event are appended whole or not at all: a write that fails (a full disk) is cut back and raised as one
    OSError naming the file, so a resume finds only whole rows.
    """

    def __init__(self, path: str | os.PathLike, resume_step: int = 0):
        self.path = Path(path) / workdir.METRICS

        def keep_until_resume(tmp: Path) -> None:
            kept = read_metrics(path, drop_torn_last_line=True, warn=False)  # the resume's check said so
            tmp.write_text("".join(json.dumps(m) + "\n" for m in kept if m["step"] <= resume_step))

        workdir.write(self.path, keep_until_resume, overwrite=True)
        self.enabled, self.events = distributed.writes_here(), None
        if not self.enabled:
            return
        self.file = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        self.events = _events_file(Path(path) / workdir.TENSORBOARD, purge_after=resume_step)

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _json_number(v) for k, v in metrics.items()}}
        append_whole(self.file, self.path, (json.dumps(row) + "\n").encode())
        if self.events is not None:
            self.events.write(step, metrics)

    def close(self) -> None:
        if self.enabled:
            os.close(self.file)
            if self.events is not None:
                self.events.close()


def append_whole(fd: int, path: Path, data: bytes) -> None:
    """Appends `data` to the open file `fd` (of `path`), or nothing: a failed write is cut back off."""
    start = os.lseek(fd, 0, os.SEEK_END)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    except OSError as e:
        os.ftruncate(fd, start)
        raise OSError(e.errno, e.strerror, str(path)) from None


class _TensorBoardEvents:
    """A TensorBoard event file written in the calling thread (tensorboardX's SummaryWriter writes from a
    thread of its own, where a full disk becomes a traceback and lost events, never an error here)."""

    def __init__(self, folder: Path, purge_after: int):
        from tensorboardX.proto.event_pb2 import Event, SessionLog
        from tensorboardX.record_writer import masked_crc32c
        from tensorboardX.summary import scalar

        self.Event, self.scalar, self.crc = Event, scalar, masked_crc32c
        folder.mkdir(exist_ok=True)
        self.path = folder / f"events.out.tfevents.{time.time():.0f}.{socket.gethostname()}.{os.getpid()}"
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        # TensorBoard hides the events of steps > purge_after from the earlier files (a resumed run)
        self._append(
            [
                Event(wall_time=time.time(), step=purge_after + 1, file_version="brain.Event:2"),
                Event(wall_time=time.time(), step=purge_after + 1, session_log=SessionLog(status=SessionLog.START)),
            ]
        )

    def write(self, step: int, metrics: dict) -> None:
        self._append(
            [self.Event(wall_time=time.time(), step=step, summary=self.scalar(k, float(v))) for k, v in metrics.items()]
        )

    def _append(self, events) -> None:
        records = []
        for event in events:
            data = event.SerializeToString()
            header = struct.pack("Q", len(data))
            records += [header, struct.pack("I", self.crc(header)), data, struct.pack("I", self.crc(data))]
        append_whole(self.fd, self.path, b"".join(records))

    def close(self) -> None:
        os.close(self.fd)


def _events_file(folder: Path, purge_after: int) -> _TensorBoardEvents | None:
    try:
        return _TensorBoardEvents(folder, purge_after)
    except ImportError:  # TensorBoard files are a convenience; the JSONL is the record
        return None


def progress(total: int, initial: int, enabled: bool = True, desc: str = "train"):
    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, dynamic_ncols=True, mininterval=1.0)


def close_progress_bars() -> None:
    """Ends the open progress bars' lines, so that an error printed next starts a line of its own."""
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
