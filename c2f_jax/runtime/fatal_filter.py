"""The loss of process 0 as one line, not a C++ abort with a stack trace in every other log.

Process 0 hosts JAX's coordination service. When it dies, every other process's JAX client learns it at once
(its error poll fails) and aborts from a C++ thread: a fatal log line, a stack trace, SIGABRT and, where core
dumps are on, a core file per process. JAX offers no hook for it (`missed_heartbeat_callback` cannot receive
the status it is called with: std::bad_cast), and no Python code runs in an aborting thread. So a process of a
multi-process job writes its stderr through this small filter process, which forwards every byte unchanged,
but on JAX's fatal line prints one line of ours instead, ends the aborting process (SIGKILL: no core file, no
stack trace) and drops what follows.

Run as `python -m c2f_jax.runtime.fatal_filter PROCESS_INDEX PID` with its stdin the process's stderr.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

FATAL = b"Terminating process because the JAX distributed service detected fatal errors"
COORDINATOR_GONE = b"Failed to send RPC to coordination service"
NOISE = b"Polled an error from coordination service"  # the line before FATAL, saying no more than it
CPP_LOG_LINE = re.compile(rb"^[IWEF]\d{4} ")  # absl's prefix: held back until complete, it may be FATAL


def start(process: int) -> None:
    """From now on this process's stderr (fd 2, Python's and C++'s) goes through the filter."""
    child = subprocess.Popen(
        [sys.executable, "-m", __name__, str(process), str(os.getpid())],
        stdin=subprocess.PIPE,
        stdout=sys.__stderr__.fileno(),
        stderr=subprocess.DEVNULL,
        start_new_session=False,
    )
    sys.stderr.flush()
    os.dup2(child.stdin.fileno(), 2)
    child.stdin.close()  # fd 2 is now the pipe's only writing end: the filter ends when this process does


def ours(process: int, fatal_line: bytes) -> bytes:
    if COORDINATOR_GONE in fatal_line:
        what = "lost the coordinator (process 0): it died or its host is unreachable"
    else:
        status = fatal_line.split(b"absl::Status:", 1)[-1].strip().decode(errors="replace")
        what = f"the JAX distributed service failed: {status[:200]}"
    return f"[process {process}] error: stopping: {what}\n".encode()


def main(process: int, pid: int) -> None:
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # signals are for the job, which ends this filter by closing fd 2
    pending = b""
    while chunk := os.read(0, 1 << 16):
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if FATAL in line:
                os.write(1, ours(process, line))
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                return
            if NOISE not in line:
                os.write(1, line + b"\n")
        if pending and not CPP_LOG_LINE.match(pending):  # a progress bar's \r-line: show it now
            os.write(1, pending)
            pending = b""
    if pending:
        os.write(1, pending)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
