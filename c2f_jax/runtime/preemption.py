"""Stopping to be resumed: a time limit, a preemption or an eviction is a checkpoint, not a loss.

SIGTERM (what SLURM sends at a time limit and a preempting scheduler or Kubernetes before its SIGKILL) and
SIGUSR1 (SLURM's early warning, `--signal=B:USR1@N`, forwarded by launch/) ask the job to stop. The loops ask
`requested()` once per step: in a multi-process job every process gets the same answer at the same step,
however many of them were signalled, so they save that step together and exit with EXIT_RESUMABLE. The
scheduler, a requeue or a relaunch of the same command then resumes from it, bit-identical to an unbroken run.
"""

from __future__ import annotations

import signal
import threading

import numpy as np

from c2f_jax.runtime import distributed

EXIT_RESUMABLE = 75  # sysexits' EX_TEMPFAIL: stopped, to be started again
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_asked = threading.Event()  # set from a signal handler, the one place a signal can leave a mark


class Stopped(Exception):
    """Raised by a job loop once it has saved `step` because a stop was requested."""

    def __init__(self, step: int):
        super().__init__(f"stopped at step {step} on a signal; its checkpoint is saved: run the same command to resume")
        self.step = step


def install() -> None:
    """Handle SIGNALS from now on by asking the job to stop at the next step boundary (replacing the
    handlers the interpreter and jax.distributed installed, which would end or ignore the job)."""
    for sig in SIGNALS:
        signal.signal(sig, lambda signum, frame: _asked.set())


def requested() -> bool:
    """Whether any process of the job has been signalled. A collective in a multi-process job: every process
    must call it at the same point (each step's end), and all get the same answer."""
    asked = _asked.is_set()
    if distributed.process_count() == 1:
        return asked
    from jax.experimental import multihost_utils

    return bool(np.max(multihost_utils.process_allgather(np.int32(asked))))
