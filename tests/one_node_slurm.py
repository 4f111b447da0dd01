"""A one-node SLURM cluster on this machine for the tests: munged, slurmctld and slurmd from Debian's packages.

The node's CPUs are declared oversubscribed (8 CPUs, OverSubscribe=FORCE), so several
tasks run on a 2-core machine. Needs root (slurmd runs jobs as their user). Everything
lives in a temporary folder; the daemons are stopped when the context ends.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from c2f_jax.runtime.local_job import free_port

DAEMONS = ("munged", "slurmctld", "slurmd", "srun", "sbatch", "sinfo")


def missing() -> str | None:
    """Why no cluster can start here, or None."""
    absent = [d for d in DAEMONS if shutil.which(d) is None]
    if absent:
        return f"SLURM is not installed ({', '.join(absent)} not found; apt-get install slurm-wlm munge)"
    if os.geteuid() != 0:
        return "a one-node SLURM cluster needs root (slurmd runs the jobs)"
    return None


def _munge_works() -> bool:
    try:
        token = subprocess.run(["munge", "-n"], capture_output=True, timeout=10).stdout
        return subprocess.run(["unmunge"], input=token, capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@contextlib.contextmanager
def cluster(folder: Path):
    """Yields the environment (SLURM_CONF) in which srun/sbatch reach the running cluster."""
    host = socket.gethostname()
    for sub in ("state", "spool"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    conf = folder / "slurm.conf"
    conf.write_text(
        "\n".join(
            [
                "ClusterName=c2ftest",
                f"SlurmctldHost={host}",
                "SlurmUser=root",
                "SlurmdUser=root",
                f"SlurmctldPort={free_port()}",
                f"SlurmdPort={free_port()}",
                "AuthType=auth/munge",
                f"StateSaveLocation={folder}/state",
                f"SlurmdSpoolDir={folder}/spool",
                f"SlurmctldPidFile={folder}/slurmctld.pid",
                f"SlurmdPidFile={folder}/slurmd.pid",
                f"SlurmctldLogFile={folder}/slurmctld.log",
                f"SlurmdLogFile={folder}/slurmd.log",
                "ProctrackType=proctrack/linuxproc",
                "TaskPlugin=task/none",
                "SelectType=select/cons_tres",
                "SelectTypeParameters=CR_CPU",
                "MpiDefault=none",
                "ReturnToService=2",
                "SlurmdParameters=config_overrides",
                # A requeued job waits out the launch credential's lifetime (120 s by default), then the next scheduling
                # pass (up to 60 s): 2.5 of the 3.4 minutes the requeue test took. A cluster may shorten both too.
                "AuthInfo=cred_expire=20",
                "SchedulerParameters=sched_interval=5,bf_interval=5",
                f"NodeName={host} CPUs=8 State=UNKNOWN",
                "PartitionName=debug Nodes=ALL Default=YES OverSubscribe=FORCE MaxTime=INFINITE State=UP",
                "",
            ]
        )
    )
    env = {**os.environ, "SLURM_CONF": str(conf)}
    started = []
    try:
        if not _munge_works():
            Path("/run/munge").mkdir(parents=True, exist_ok=True)
            shutil.chown("/run/munge", "munge", "munge")
            started.append(
                subprocess.Popen(
                    ["munged", "--foreground", "--force"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                )
            )
            deadline = time.monotonic() + 20
            while not _munge_works():
                if time.monotonic() > deadline:
                    raise RuntimeError("munged did not start")
                time.sleep(0.2)
        for daemon in ("slurmctld", "slurmd"):
            started.append(
                subprocess.Popen(
                    [daemon, "-D", "-f", str(conf)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                )
            )
        deadline = time.monotonic() + 60
        while True:
            state = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True).stdout
            if state.strip() in ("idle", "mixed", "allocated"):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the SLURM node did not come up (sinfo: {state.strip()!r}); see {folder}/*.log")
            time.sleep(0.5)
        yield env
    finally:
        for p in reversed(started):
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
