"""The benchmark scripts run from the command line and print their tables (tiny sizes; timings not checked)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # the benchmarks' own runs

ROOT = Path(__file__).resolve().parent.parent


def run_tool(name, *args):
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / name), *args], capture_output=True, text=True, cwd=ROOT, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def table_rows(text, first_cell):
    return [
        [c.strip() for c in line.strip("|").split("|")]
        for line in text.splitlines()
        if line.startswith(f"| {first_cell}")
    ]


def number(cell):
    return float(re.sub(r"[x%,]", "", cell))


def test_bench_rollout_prints_ratio_and_matmul_bound():
    # short decode lengths: the defaults (up to 512 + 1024) compile and decode for 20 of the test's 40 s
    out = run_tool(
        "bench_rollout.py",
        "--sizes",
        "2x64",
        "--new-tokens",
        "8",
        "--repeats",
        "1",
        "--lengths",
        "8,32",
        "--long",
        "16+32",
    )
    (row,) = table_rows(out, "2 layers")
    ours, loaded, theirs, ratio, matmul_bound, share = (number(row[i]) for i in (2, 3, 4, 5, 8, 9))
    assert ours > 0 and loaded > 0 and theirs > 0 and abs(ratio - ours / theirs) < 0.02 * ratio
    assert matmul_bound > 0 and abs(share - 100 * ours / matmul_bound) < 1.5
    short, full = table_rows(out, "EOS suppressed")
    (stopped,) = table_rows(out, "every row stops")
    (long,) = table_rows(out, "long context")
    assert [short[1], full[1], stopped[1], long[1]] == ["32 + 8", "32 + 32", "32 + 32", "16 + 32"]
    assert number(short[3]) > 0 and number(full[3]) > 0 and number(long[3]) > 0  # tok/s
    assert 0 < float(stopped[4].split()[0]) < 1  # stopping at the first token takes a fraction of the full decode


def test_bench_ppo_prints_both_sides_and_the_bound():
    out = run_tool("bench_ppo.py", "--sizes", "2x64", "--prompt", "8", "--new-tokens", "8", "--iterations", "1")
    ours, torch = table_rows(out, "2 layers")
    assert ours[1] == "ours" and torch[1] == "torch"
    for row in (ours, torch):
        rollout, scoring, update, total = (number(row[i]) for i in (2, 3, 4, 5))
        assert min(rollout, update) > 0 and abs(rollout + scoring + update - total) <= 0.016  # 2-decimal cells
    mine, theirs = number(ours[5]), number(torch[5])
    assert (theirs - 0.005) / (mine + 0.005) <= number(ours[7]) <= (theirs + 0.005) / (mine - 0.005)
    assert re.search(r"Bound, 2 layers, d=64: .* cannot exceed \d+\.\d+x", out)


def test_bench_merge_prints_floor_and_ours(tmp_path):
    out = run_tool("bench_merge.py", "--layers", "1", "--repeats", "1", "--no-sweep", "--workdir", str(tmp_path))
    (floor,) = table_rows(out, "I/O floor")
    (ours,) = table_rows(out, "ours")
    assert number(floor[2]) == 1.0 and number(ours[1]) > 0 and number(ours[2]) > 0
    assert "gamma 0.7" in out
