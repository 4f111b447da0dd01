"""c2f-plan --topology: the coarse job's programs compile for a TPU slice with libtpu and no TPU, and a
topology it cannot use is a one-line error."""

import importlib.util
import json
import subprocess
import sys

import pytest
from conftest import ROOT, cli_env

from c2f_jax.runtime import cli

pytestmark = pytest.mark.slow  # compiles for a TPU slice

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed (pip install -e '.[tpu]')"
)
# The demo's model at small shapes, its params and batch split over fsdp and tensor on a 4-chip v5p slice.
TINY = [
    "--config",
    "configs/tiny_coarse.py",
    "--config.mesh.fsdp=2",
    "--config.mesh.tensor=2",
    "--config.data.prompt_buckets=(16,)",
    "--config.cm.buckets=(8,)",
    "--config.data.batch_size=4",
    "--config.ppo.minibatches=1",
    "--config.ppo.epochs=1",
]


def plan_memory(*args):
    return subprocess.run(
        [sys.executable, "-m", "c2f_jax.cli.plan", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=cli_env(),
        timeout=600,
    )


@needs_libtpu
def test_tiny_job_compiles_for_a_tpu_slice():
    done = plan_memory(*TINY, "--topology", "v5p:2x2x1", "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stderr == ""  # libtpu's "this is no TPU VM" warnings are silenced, the compile cache stays off
    assert "on 4 TPU v5 devices, mesh data=1 fsdp=2 tensor=2" in done.stdout
    assert "fits a TPU v5 chip's 95 GB: yes" in done.stdout
    plan = json.loads(done.stdout.splitlines()[-1])
    assert list(plan) == ["reshard_to_rollout", "rollout_16+8", "reward_score", "ppo_iteration"]
    assert all(p["total_bytes"] > 0 and p["temp_bytes"] > 0 for p in plan.values())
    # The rollout reads the copy the reshard writes (plus the prompt ids, mask and key).
    copy = plan["reshard_to_rollout"]["output_bytes"]
    assert copy < plan["rollout_16+8"]["argument_bytes"] < copy + 4096


@needs_libtpu
def test_unknown_topology_is_one_line_error():
    done = plan_memory(*TINY, "--topology", "v9z:2x2")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: --topology v9z:2x2: INVALID_ARGUMENT: Invalid TPU external name: TPU v9z"
    ]


def test_topology_without_libtpu_is_a_usage_error(monkeypatch):
    from c2f_jax.cli import plan as tool

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "libtpu" else find_spec(name))
    with pytest.raises(
        cli.UsageError,
        match=r"^--topology v5p:2x2x1: libtpu is not installed \(the tpu extra: "
        r"pip install -e '\.\[tpu\]'\)$",
    ):
        tool.tpu_devices("v5p:2x2x1")
