"""What a run shows: WORKDIR/metrics.jsonl (one object per step), TensorBoard events, a progress bar."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from tqdm import tqdm

from c2f_jax.runtime import distributed, workdir


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The rows of a workdir's metrics.jsonl (none before the first step)."""
    path = Path(path) / workdir.METRICS
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _json_number(x):
    if isinstance(x, (int, bool)):
        return int(x)
    x = float(x)
    return x if math.isfinite(x) else str(x)  # JSON has no NaN; keep it visible as a string


class MetricsWriter:
    """Appends one JSON line and one TensorBoard scalar set per step (process 0 only).

    On resume from step N, lines for steps > N (written after that checkpoint) are
    dropped first, so the file reads as one uninterrupted run.
    """

    def __init__(self, path: str | os.PathLike, resume_step: int = 0):
        self.path = Path(path) / workdir.METRICS

        def keep_until_resume(tmp: Path) -> None:
            tmp.write_text("".join(json.dumps(m) + "\n" for m in read_metrics(path) if m["step"] <= resume_step))

        workdir.write(self.path, keep_until_resume, overwrite=True)
        self.enabled, self.tb = distributed.writes_here(), None
        if not self.enabled:
            return
        self.file = open(self.path, "a")
        try:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(Path(path) / workdir.TENSORBOARD), purge_step=resume_step + 1)
        except ImportError:  # TensorBoard files are a convenience; the JSONL is the record
            self.tb = None

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _json_number(v) for k, v in metrics.items()}}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(k, float(v), step)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()


def progress(total: int, initial: int, enabled: bool = True, desc: str = "train"):
    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, dynamic_ncols=True, mininterval=1.0)
