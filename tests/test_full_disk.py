"""A full disk loses nothing: each writer, on a full tmpfs, fails with one line naming its path, leaves nothing
half-written under a name that passes as complete, and works again once space is freed. (The training run on a
full disk, end to end with its resume, is in test_train.py.)"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, cli_env, fill

from c2f_jax.model import export
from c2f_jax.runtime import checkpoint, metrics

pytestmark = pytest.mark.slow  # full disks (tmpfs) under whole runs

MANY = {f"scalar/{i:04d}": float(i) for i in range(400)}  # a row larger than a page's slack: it needs new blocks


def test_a_checkpoint_save_on_a_full_disk_is_one_error_and_the_previous_one_stays_latest(small_disk):
    ckpt = checkpoint.Checkpointer(small_disk / "w", writer=True)
    ckpt.save(1, {"a": np.ones(1000, np.float32)}, {"step": 1})
    ckpt.wait()
    filler = fill(small_disk)
    ckpt.save(2, {"a": np.random.default_rng(0).random(4_000_000, np.float32)}, {"step": 2})
    with pytest.raises(checkpoint.CheckpointError) as e:
        ckpt.wait()
    assert str(e.value) == (
        f"{small_disk / 'w' / 'checkpoints' / '2'}: the checkpoint was not saved (no space left "
        "on device); the latest intact one is step 1"
    ), e.value
    assert sorted(p.name for p in (small_disk / "w" / "checkpoints").iterdir()) == ["1"]  # no uncommitted folder
    filler.unlink()
    ckpt.save(3, {"a": np.full(1000, 3, np.float32)}, {"step": 3})
    ckpt.close()
    state, meta = checkpoint.Checkpointer(small_disk / "w").restore()
    assert meta == {"step": 3} and float(np.asarray(state["a"]).max()) == 3


@pytest.mark.parametrize("full", ["metrics.jsonl", "tensorboard"])
def test_a_metrics_or_tensorboard_write_on_a_full_disk_is_cut_back_whole(small_disk, full):
    """A step's JSON line and its TensorBoard event are appended whole or not at all."""
    writer = metrics.MetricsWriter(small_disk, resume_step=0)
    writer.write(1, MANY)
    events = writer.events.path
    sizes = (writer.path.stat().st_size, events.stat().st_size)
    row = (json.dumps({"step": 2, **MANY}) + "\n").encode()
    filler = fill(small_disk, leave=len(row) + 8192 if full == "tensorboard" else 0)
    with pytest.raises(OSError) as e:
        writer.write(2, MANY)
    named = writer.path if full == "metrics.jsonl" else events
    assert e.value.errno == 28 and str(e.value) == f"[Errno 28] No space left on device: '{named}'", e.value
    assert events.stat().st_size == sizes[1]  # the event is not half there
    assert [r["step"] for r in metrics.read_metrics(small_disk)] == ([1, 2] if full == "tensorboard" else [1])
    filler.unlink()
    writer.write(3, {"x": 1.0})
    writer.close()
    assert metrics.read_metrics(small_disk)[-1] == {"step": 3, "x": 1.0}


def _one_error(done) -> str:
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode != 0 and len(lines) == 1, done.stderr[-3000:]
    return lines[0]


def test_an_export_or_a_merge_on_a_full_disk_leaves_no_output(demo, small_disk, tmp_path):
    workdir, _ = demo
    exported = export.export(workdir, tmp_path / "hf", dtype="float32")
    commands = {
        "export": ["-m", "c2f_jax.cli.export", "--checkpoint", str(workdir), "--dtype", "float32"],
        "merge": [
            "-m",
            "c2f_jax.cli.merge",
            "--coarse",
            str(exported),
            "--sft",
            str(workdir / "base_model"),
            "--gamma",
            "0.7",
            "--dtype",
            "float32",
        ],
    }
    filler = fill(small_disk, leave=1 << 20)  # the config and tokenizer fit, the weights do not
    for name, command in commands.items():
        out = small_disk / name
        done = subprocess.run(
            [sys.executable, *command, "--out", str(out)], capture_output=True, text=True, env=cli_env(), cwd=ROOT
        )
        line = _one_error(done)
        print(f"{name} on a full disk: exit {done.returncode}: {line}")
        assert line == f"error: [Errno 28] No space left on device: '{out}'", line
        assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]  # nothing half-written, no temporary
    filler.unlink()
    for name, command in commands.items():
        done = subprocess.run(
            [sys.executable, *command, "--out", str(small_disk / name)],
            capture_output=True,
            text=True,
            env=cli_env(),
            cwd=ROOT,
        )
        assert done.returncode == 0, done.stderr[-2000:]
    assert os.path.getsize(small_disk / "export" / "model.safetensors") > 1 << 20
