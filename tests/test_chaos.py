"""The whole tiny demo (base pretraining, the inline reward job, compiles, PPO steps, saves) under random SIGKILL
and SIGTERM, relaunched after each, ends exactly where an unbroken run does: every metrics row, every weight."""

import json
import random
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, SHORT, assert_ends_as, cli_env

from c2f_jax.runtime import metrics, preemption
from c2f_jax.runtime import workdir as c2f_workdir

pytestmark = pytest.mark.slow

FAULTS = 6
SEED = 20261208


def _launch(path):
    return subprocess.Popen(
        [sys.executable, "-m", "c2f_jax.train", "--config", "tiny_coarse.py", *SHORT, "--workdir", str(path)],
        cwd=ROOT,
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _phase(path) -> str:
    """Where a run stands, from what its workdir holds."""
    rows = len(metrics.read_metrics(path, drop_torn_last_line=True, warn=False)) if path.is_dir() else 0
    if rows:
        return f"PPO, {rows} steps logged"
    if (path / c2f_workdir.REWARD_MODEL).is_dir():
        return "compiling PPO"
    if (path / c2f_workdir.REWARD_RUN).is_dir():
        return "reward model"
    return "start-up or base pretraining"


def test_random_kills_and_stops_end_where_an_unbroken_run_does(tmp_path, capsys):
    start = time.monotonic()
    unbroken = _launch(tmp_path / "unbroken")
    assert unbroken.wait(timeout=900) == 0, unbroken.stderr.read()[-2000:]
    unbroken_seconds = time.monotonic() - start

    rng, path, faults = random.Random(SEED), tmp_path / "chaos", []
    start = time.monotonic()
    for launch in range(FAULTS + 10):
        proc = _launch(path)
        if len(faults) < FAULTS:
            delay = rng.uniform(2.0, 0.6 * unbroken_seconds)
            sig = rng.choice([signal.SIGKILL, signal.SIGTERM])
            try:
                proc.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                phase = _phase(path)
                proc.send_signal(sig)
                faults.append((sig.name, delay, phase))
        code = proc.wait(timeout=900)
        err = proc.stderr.read()
        # A SIGKILL ends it at once; a SIGTERM saves at the next step boundary and asks to be started again.
        assert code in (0, preemption.EXIT_RESUMABLE, -signal.SIGKILL), err[-2000:]
        if code == 0:
            break
    chaos_seconds = time.monotonic() - start

    lines = (path / c2f_workdir.METRICS).read_text().splitlines()
    steps = [json.loads(line)["step"] for line in lines]  # every line whole JSON: none torn
    assert steps == list(range(1, len(steps) + 1)) and len(steps) == 8  # no step written twice, none missing
    assert_ends_as(path, tmp_path / "unbroken")
    with capsys.disabled():
        print(
            f"\nchaos: {len(faults)} faults over {launch + 1} launches; unbroken {unbroken_seconds:.0f} s, "
            f"chaos {chaos_seconds:.0f} s, goodput {unbroken_seconds / chaos_seconds:.2f}"
        )
        for name, delay, phase in faults:
            print(f"  {name} after {delay:5.1f} s, during {phase}")
    assert len(faults) >= FAULTS // 2, faults  # most runs were still going when their signal came
    leftovers = [p.name for p in path.iterdir() if p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name)]
    assert not leftovers  # a killed write's temporary is swept by the next write of the same file
