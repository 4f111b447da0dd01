"""A multi-process JAX job on this machine: N processes of one command, joined on 127.0.0.1.

  python -m c2f_jax.runtime.local_job --processes 2 --devices 4 -- python -m c2f_jax.train --config tiny_coarse.py

Each process gets --devices fake CPU devices and the JAX_COORDINATOR_ADDRESS /
JAX_NUM_PROCESSES / JAX_PROCESS_ID that c2f_jax.runtime.distributed joins on (a free
port). Logs go to one file per process. Whatever happens, no process outlives the
job: each runs in its own process group, killed on timeout, error or interrupt.
The tests run every multi-process case through this.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(index: int, processes: int, devices: int, port: int, base: dict | None = None) -> dict:
    """The environment of process `index` of a local job (no SLURM variables: they would win)."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if not k.startswith("SLURM_")}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", PYTHONUNBUFFERED="1")
    if processes > 1:
        env.update(
            JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(processes), JAX_PROCESS_ID=str(index)
        )
    return env


@dataclasses.dataclass
class Exit:
    """How one process ended: status (None if it had to be killed at the deadline), when, and its log."""

    index: int
    returncode: int | None
    seconds: float
    log: str


class LocalJob:
    """`with LocalJob(commands, devices) as job: job.wait(timeout)`; commands: one argv per process
    (or one argv for all, with `processes`). `env` adds to (or replaces) this process's environment;
    the job's own variables (devices, coordinator) win over both."""

    def __init__(
        self, commands, devices: int = 1, processes: int | None = None, env: dict | None = None, cwd=None, log_dir=None
    ):
        if processes is not None:
            commands = [commands] * processes
        self.commands, self.devices, self.cwd = [list(map(str, c)) for c in commands], devices, cwd
        self.extra_env = env or {}
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="c2f-job-"))
        self.procs, self.logs, self.started = [], [], 0.0
        self.ended: dict[int, float] = {}

    def __enter__(self) -> "LocalJob":
        port, n = free_port(), len(self.commands)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.started = time.monotonic()
        for i, command in enumerate(self.commands):
            log = open(self.log_dir / f"process_{i}.log", "w")
            env = process_env(i, n, self.devices, port, {**os.environ, **self.extra_env})
            self.procs.append(
                subprocess.Popen(
                    command,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self.cwd,
                    env=env,
                    start_new_session=True,
                    stdin=subprocess.DEVNULL,
                )
            )
            self.logs.append(log)
        return self

    def poll(self) -> bool:
        """True once every process has exited; records when each did."""
        for i, p in enumerate(self.procs):
            if i not in self.ended and p.poll() is not None:
                self.ended[i] = time.monotonic()
        return len(self.ended) == len(self.procs)

    def kill(self, index: int, sig: int = signal.SIGKILL) -> None:
        self.procs[index].send_signal(sig)

    def wait(self, timeout: float) -> list[Exit]:
        """Waits up to `timeout` seconds for every process, kills what is left, returns how each ended."""
        deadline = time.monotonic() + timeout
        while not self.poll() and time.monotonic() < deadline:
            time.sleep(0.1)
        self._kill_all()
        return self.exits()

    def exits(self) -> list[Exit]:
        for log in self.logs:
            log.flush()
        return [
            Exit(
                i,
                p.returncode if i in self.ended else None,
                self.ended.get(i, time.monotonic()) - self.started,
                (self.log_dir / f"process_{i}.log").read_text(errors="replace"),
            )
            for i, p in enumerate(self.procs)
        ]

    def _kill_all(self) -> None:
        for i, p in enumerate(self.procs):
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)  # the whole group: nothing it started survives
                except ProcessLookupError:
                    pass
                p.wait()
        self.poll()

    def __exit__(self, *exc) -> None:
        self._kill_all()
        for log in self.logs:
            log.close()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--devices", type=int, default=4, help="fake CPU devices per process")
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command every process runs")
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("no command given (put it after --)")
    for flag, value in (("--processes", args.processes), ("--devices", args.devices), ("--timeout", args.timeout)):
        if not value >= 1:  # NaN too
            print(f"error: {flag}={value} must be >= 1", file=sys.stderr)
            return 2
    with LocalJob(command, args.devices, args.processes) as job:
        try:
            exits = job.wait(args.timeout)
        except KeyboardInterrupt:
            exits = job.exits()
    for e in exits:
        print(
            f"process {e.index}: exit {e.returncode} after {e.seconds:.1f} s, log {job.log_dir}/process_{e.index}.log"
        )
    for e in exits:
        if e.returncode != 0:
            sys.stdout.write(f"--- process {e.index} (last lines)\n" + "\n".join(e.log.splitlines()[-5:]) + "\n")
    return max((abs(e.returncode) if e.returncode is not None else 124) for e in exits)


if __name__ == "__main__":
    sys.exit(main())
