"""The training CLI end to end on the tiny demo: metrics, CM, compilations, export, exact resume after SIGKILL."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import transformers
from conftest import ROOT, SHORT, assert_ends_as, cli_env, fill

from c2f_jax import train
from c2f_jax.model import export, hf, model
from c2f_jax.runtime import checkpoint, metrics, preemption, workdir_lock
from c2f_jax.runtime import workdir as c2f_workdir


def run_cli(*args, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "c2f_jax.train", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=cli_env(),
    )


@pytest.mark.slow  # the whole demo
def test_demo_logs_every_metric_and_advances_cm(demo):
    workdir, rows = demo
    logged = metrics.read_metrics(workdir)
    assert [r["step"] for r in logged] == list(range(1, 9))
    needed = {
        "reward/mean",
        "reward/std",
        "kl",
        "loss/policy",
        "loss/value",
        "clipfrac",
        "entropy",
        "cm/length_limit",
        "cm/p_advance",
        "time/rollout_tokens_per_s",
        "time/update_tokens_per_s",
        "compilations",
        "skipped_updates",
        "kl_coef",
        "kl/per_response",
        "approx_kl",
        "ratio/max",
        "sampler_gap/mean",
        "sampler_gap/max",
        "value/explained_variance",
        "advantages/mean",
        "advantages/std",
        "returns/mean",
        "returns/std",
    }
    assert needed <= set(logged[0])
    for r in logged:
        # float32 on both sides, the same weights: the rollout copy and the trainer agree to rounding
        assert 0 <= r["sampler_gap/mean"] <= r["sampler_gap/max"] < 1e-3
        assert r["ratio/max"] >= 1.0 and r["value/explained_variance"] <= 1.0
        assert r["kl/per_response"] == pytest.approx(r["kl"] * r["cm/length_limit"], rel=1e-4, abs=1e-6)
    # the demo's KL coefficient adapts towards ppo.kl_target: it moves from its start, within the controller's bound
    coefs = [r["kl_coef"] for r in logged]
    assert coefs[0] == 0.05 and coefs[-1] != coefs[0]
    assert all(abs(b / a - 1) <= 0.2 * 16 / 200 + 1e-12 for a, b in zip(coefs, coefs[1:]))
    limits = [r["cm/length_limit"] for r in logged]
    assert limits == sorted(limits) and len(set(limits)) >= 2
    assert all(r["skipped_updates"] == 0 for r in logged)
    assert any(p.name.startswith("events.out.tfevents") for p in (workdir / "tensorboard").iterdir())
    saved = json.loads((workdir / c2f_workdir.RUN_CONFIG).read_text())
    assert saved["job"] == "coarse" and saved["cm"]["buckets"] == [8, 12, 16]


@pytest.mark.slow  # the whole demo
def test_compilations_stop_growing_once_every_bucket_is_seen(demo):
    _, rows = demo
    shapes = [(r["prompt/bucket"], r["cm/length_limit"]) for r in rows]
    last_new_shape = max(i for i, s in enumerate(shapes) if s not in shapes[:i])
    after = [r["compilations"] for r in rows[last_new_shape:]]
    assert len(after) >= 2 and len(set(after)) == 1, [(s, r["compilations"]) for s, r in zip(shapes, rows)]


@pytest.mark.slow  # the whole demo
def test_export_loads_in_transformers_with_our_logits(demo, tmp_path):
    workdir, _ = demo
    out = export.export(workdir, tmp_path / "hf", dtype="float32")
    config, params = hf.load_pretrained(out)
    restored, _ = checkpoint.Checkpointer(workdir).restore()
    assert np.array_equal(
        np.asarray(params["layers"]["mlp"]["up"]), np.asarray(restored["actor"]["params"]["layers"]["mlp"]["up"])
    )
    hm = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = np.array([tok("Human: How do tides work? Assistant: First,").input_ids])
    with torch.no_grad():
        ref = hm(torch.tensor(ids)).logits.numpy()
    assert np.abs(np.asarray(model.forward(config, params, ids)) - ref).max() < 1e-4
    done = subprocess.run(
        [sys.executable, "-m", "c2f_jax.cli.plot", str(workdir)], capture_output=True, text=True, env=cli_env()
    )
    assert done.returncode == 0 and (workdir / "run.png").stat().st_size > 10_000


@pytest.mark.slow  # the whole demo
def test_workdir_model_is_restored_alone_and_exactly(demo):
    workdir, _ = demo
    ckpt = checkpoint.Checkpointer(workdir)
    full, meta = ckpt.restore()
    critic, sub_meta = ckpt.restore_subtree(("critic", "params"))
    with pytest.raises(checkpoint.CheckpointError, match="no critic/nothing"):
        ckpt.restore_subtree(("critic", "nothing"))
    ckpt.close()
    config, actor, _ = export.load_model(workdir)
    assert sub_meta == meta and config.has_lm_head

    # Alone: bytes the process reads from the checkpoint files (page cache included), for the actor's
    # params and for the whole state (actor and critic, each with two AdamW moments).
    def read_bytes():
        io = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
        return int(io["rchar"])

    ckpt = checkpoint.Checkpointer(workdir)
    read = []
    for keys in (("actor", "params"), ()):
        before = read_bytes()
        ckpt.restore_subtree(keys)
        read.append(read_bytes() - before)
    ckpt.close()
    actor_bytes = sum(x.nbytes for x in jax.tree.leaves(actor))
    assert read[0] < 1.2 * actor_bytes and read[1] > 2 * read[0], (read, actor_bytes)
    for got, saved in ((actor, full["actor"]["params"]), (critic, full["critic"]["params"])):
        assert jax.tree.structure(got) == jax.tree.structure(saved)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(saved)):
            assert isinstance(a, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, np.asarray(b))


def _saving(workdir, from_step: int) -> bool:
    """Whether Orbax is writing the checkpoint of a step >= from_step: `<step>.orbax-checkpoint-tmp-...`."""
    folder = Path(workdir) / "checkpoints"
    names = [p.name for p in folder.iterdir()] if folder.is_dir() else []
    steps = [n.split(".orbax-checkpoint-tmp")[0] for n in names if ".orbax-checkpoint-tmp" in n]
    return any(s.isdigit() and int(s) >= from_step for s in steps)


def _interrupted(args, workdir, sig, rows: int, during_save=None) -> tuple[int, str, str, float]:
    """The CLI run of `args`, sent `sig` once `workdir` has `rows` metrics rows and, when given, the signal
    `during_save` while the save that follows is being written: (exit status, stdout, stderr, seconds from the
    first signal to the exit)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "c2f_jax.train", *args],
        cwd=ROOT,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    while time.time() < deadline and len(metrics.read_metrics(workdir)) < rows:
        time.sleep(0.1)
    os.kill(proc.pid, sig)
    signalled = time.monotonic()
    if during_save is not None:
        while time.time() < deadline and not _saving(workdir, rows) and proc.poll() is None:
            time.sleep(0.001)
        assert proc.poll() is None, "the run ended before its save could be caught"
        os.kill(proc.pid, during_save)
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err, time.monotonic() - signalled


@pytest.fixture(scope="module")
def ppo_reference(demo, tmp_path_factory):
    """(args, workdir) of an uninterrupted PPO run on the demo's base and reward model (only PPO runs). While it
    runs, the same job submitted twice on its workdir is refused."""
    workdir, _ = demo
    common = [
        "--config",
        "tiny_coarse.py",
        *SHORT,
        f"--config.model.base={workdir / 'base_model'}",
        f"--config.reward_model.path={workdir / 'reward_model'}",
    ]
    path = tmp_path_factory.mktemp("ppo") / "reference"
    reference = subprocess.Popen(
        [sys.executable, "-m", "c2f_jax.train", *common, "--workdir", path],
        cwd=ROOT,
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    while not metrics.read_metrics(path) and reference.poll() is None:
        time.sleep(0.1)
    second = run_cli(*common, "--workdir", str(path))
    assert second.returncode == 2 and re.fullmatch(
        re.escape(
            f"error: {path}: in use by another job (host {os.uname().nodename}, process id {reference.pid}, since "
        )
        + r"[0-9: -]+ UTC, in "
        + re.escape(str(path / workdir_lock.LOCK))
        + r"\); wait for it to end or use another --workdir\n",
        second.stderr,
    ), second.stderr[-2000:]
    assert reference.wait(timeout=300) == 0, reference.stderr.read()[-2000:]
    return common, path


@pytest.mark.slow  # the whole demo
def test_killed_or_signalled_run_resumes_to_the_same_metrics_and_weights(ppo_reference, tmp_path):
    """SIGKILL loses the steps since the last checkpoint; SIGTERM (a time limit, a preemption) saves the step
    it stops at, even with no periodic checkpoint due, and exits with EXIT_RESUMABLE; a second SIGTERM during
    that save changes nothing, and a SIGKILL during it leaves the previous checkpoint as the latest. Each way
    the relaunched command ends exactly where an uninterrupted run does."""
    common, reference = ppo_reference
    runs = {
        name: [*common, *extra, "--workdir", str(tmp_path / name)]
        for name, extra in (
            ("killed", []),
            ("stopped", ["--config.checkpoint_every=100"]),
            ("killed_saving", ["--config.checkpoint_every=2"]),
        )
    }

    _interrupted(runs["killed"], tmp_path / "killed", signal.SIGKILL, 5)  # after a checkpoint (step 4), before the next
    assert 0 < len(metrics.read_metrics(tmp_path / "killed")) < 8
    code, out, err, seconds = _interrupted(runs["stopped"], tmp_path / "stopped", signal.SIGTERM, 3, signal.SIGTERM)
    logged = len(metrics.read_metrics(tmp_path / "stopped"))
    print(f"SIGTERM, twice: exit {code} {seconds:.1f} s after the first, step {logged} saved")
    assert code == preemption.EXIT_RESUMABLE, err[-2000:]
    assert 3 <= logged < 8 and checkpoint.step_dirs(tmp_path / "stopped").keys() == {logged}
    assert f"stopped at step {logged} on a signal" in out
    # the checkpoint due at step 2 has been written; SIGTERM at step 3, SIGKILL while step 3 is being saved
    code, *_ = _interrupted(runs["killed_saving"], tmp_path / "killed_saving", signal.SIGTERM, 3, signal.SIGKILL)
    assert code == -signal.SIGKILL and _saving(tmp_path / "killed_saving", 3)  # cut off half-way through the save
    logged, saved = (
        len(metrics.read_metrics(tmp_path / "killed_saving")),
        checkpoint.step_dirs(tmp_path / "killed_saving"),
    )
    print(f"SIGTERM then SIGKILL during the save of step {logged}: latest checkpoint {max(saved)}")
    assert max(saved) == (logged - 1) // 2 * 2, (logged, saved)
    checkpoint.latest_checked(tmp_path / "killed_saving")  # the previous one is intact

    for name, args in runs.items():
        path = tmp_path / name
        done = run_cli(*args)
        assert done.returncode == 0, done.stderr[-2000:]
        # a SIGKILL leaves the hold behind; the signalled run gave it up
        assert ("taking over the hold of a job that is gone" in done.stderr) == (name != "stopped"), done.stderr[-2000:]
        assert not (path / workdir_lock.LOCK).exists()
        assert_ends_as(path, reference)


@pytest.mark.slow  # the whole demo
def test_a_full_disk_ends_the_run_with_one_line_and_the_resume_loses_nothing(ppo_reference, small_disk):
    """The workdir's disk fills up mid-run: whichever write meets it first (a step's metrics, its TensorBoard
    event, its checkpoint) ends the run with one line naming the file; the rows and checkpoints left are whole;
    once space is freed, the same command resumes and ends as the unbroken run."""
    common, reference = ppo_reference
    path = small_disk / "run"
    args = [*common, "--config.keep_checkpoints=1", "--workdir", str(path)]  # a save needs 2 x 38 MB of 100
    proc = subprocess.Popen(
        [sys.executable, "-m", "c2f_jax.train", *args],
        cwd=ROOT,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    while time.time() < deadline and max([0, *(checkpoint.step_dirs(path) if path.exists() else ())]) < 2:
        time.sleep(0.05)
    filler = fill(small_disk)
    out, err = proc.communicate(timeout=300)
    errors = [line for line in re.split(r"[\r\n]", err) if "error" in line.lower()]
    print(f"full disk at step {len(metrics.read_metrics(path))}: exit {proc.returncode}: {errors}")
    assert proc.returncode == 2 and len(errors) == 1, err[-3000:]
    assert (
        errors[0].startswith("error: ")
        and str(path) in errors[0]
        and ("No space left on device" in errors[0] or "no space left on device" in errors[0])
    ), errors
    rows = metrics.read_metrics(path)  # every line whole
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1)) and len(rows) < 8
    for step_dir in checkpoint.step_dirs(path).values():
        checkpoint.check_files(step_dir)
    assert checkpoint.latest_checked(path) >= 2
    filler.unlink()
    done = run_cli(*args)
    assert done.returncode == 0, done.stderr[-2000:]
    assert_ends_as(path, reference)


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--config.ppo.kl_coeff=0.1"], "bad command line"),
        (["--config.data.source=/nowhere/pairs.jsonl"], "dataset file not found"),
        (["--config.model.base=/nowhere/mistral"], "model folder not found"),
        (["--config.ppo.minibatches=3"], "does not split into ppo.minibatches=3"),
        (["--config.ppo.minibatches=8", "--config.mesh.data=4"], "minibatches) size 2 does not split over"),
    ],
)
def test_bad_inputs_are_one_line_errors(extra, words, tmp_path):
    done = run_cli("--config", "tiny_coarse.py", *extra, "--workdir", str(tmp_path / "w"))
    assert done.returncode == 2 and words in done.stderr and done.stderr.strip().count("\n") == 0, done.stderr


@pytest.mark.slow  # the whole demo
def test_incompatible_workdir_is_refused_and_untouched(demo):
    workdir, _ = demo
    before = (workdir / c2f_workdir.RUN_CONFIG).read_text()
    done = run_cli("--config", "tiny_coarse.py", *SHORT, "--config.ppo.kl_coef=0.5", "--workdir", str(workdir))
    assert done.returncode == 2 and "incompatible config: ppo.kl_coef" in done.stderr
    assert (workdir / c2f_workdir.RUN_CONFIG).read_text() == before


def test_missing_config_file():
    with pytest.raises(train.TrainError, match="config file nope.py not found"):
        train.parse_args(["--config", "nope.py"])


def _tool(name):
    """A command's module (c2f_jax.cli), or the demo's SFT script (scripts/sft.py)."""
    import importlib.util

    if name != "sft":
        return importlib.import_module(f"c2f_jax.cli.{name}")
    spec = importlib.util.spec_from_file_location("sft_script", ROOT / "scripts" / "sft.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # the whole demo
def test_gamma_sweep_end_to_end_on_the_demo_models(demo, tmp_path):
    """scripts/sft.py makes an Instruct stand-in from the demo's base; c2f-sweep merges it with the demo's
    Coarse Actor workdir at two gammas and evaluates all four models; c2f-evaluate on the workdir gives
    the sweep's gamma-1 numbers; the table, JSON, plot and generations page agree."""
    workdir, _ = demo
    few = ["--limit", "4", "--max-new-tokens", "8", "--batch-size", "4"]
    _tool("sft").main(
        [
            "--base",
            str(workdir / "base_model"),
            "--out",
            str(tmp_path / "sft"),
            "--steps",
            "4",
            "--batch-size",
            "4",
            "--max-length",
            "128",
        ]
    )
    _tool("sweep").main(
        [
            "--coarse",
            str(workdir),
            "--sft",
            str(tmp_path / "sft"),
            "--gammas",
            "0.7,0.3",
            "--reward-model",
            str(workdir / "reward_model"),
            "--out",
            str(tmp_path / "sweep"),
            "--show",
            "2",
            *few,
        ]
    )
    out = tmp_path / "sweep"
    assert sorted(p.name for p in out.iterdir()) == ["generations.md", "sweep.json", "sweep.md", "sweep.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sft", "sweep"]  # no scratch export, no temp folder
    rows = json.loads((out / "sweep.json").read_text())["rows"]
    assert [r["gamma"] for r in rows] == [0.0, 0.3, 0.7, 1.0]
    keys = ["reward", "length", "eos_rate", "repetition", "distinct_1", "distinct_2", "perplexity"]
    assert all(list(r["metrics"]) == keys and all(np.isfinite(list(r["metrics"].values()))) for r in rows)
    table = [line for line in (out / "sweep.md").read_text().splitlines() if line.startswith("| ")][1:]
    for line, r in zip(table, rows, strict=True):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert [float(c) for c in cells[1:]] == [round(r["metrics"][k], 3) for k in keys]
    image = __import__("matplotlib.pyplot").pyplot.imread(out / "sweep.png")
    assert image.shape[0] > 200 and image.shape[1] > 400 and image.std() > 0.01
    page = (out / "generations.md").read_text()
    assert page.count("## Prompt") == 2 and page.count("| 0.3 |") == 2 and page.count("| 1 (coarse) |") == 2
    # SLERP swept the same way: its ends are the same two models, its middle a model of its own
    _tool("sweep").main(
        [
            "--coarse",
            str(workdir),
            "--sft",
            str(tmp_path / "sft"),
            "--gammas",
            "0.5",
            "--method",
            "slerp",
            "--reward-model",
            str(workdir / "reward_model"),
            "--out",
            str(tmp_path / "slerp"),
            "--show",
            "1",
            *few,
        ]
    )
    slerp = json.loads((tmp_path / "slerp" / "sweep.json").read_text())
    assert slerp["method"] == "slerp" and [r["gamma"] for r in slerp["rows"]] == [0.0, 0.5, 1.0]
    assert [r["metrics"] for r in slerp["rows"][::2]] == [rows[0]["metrics"], rows[-1]["metrics"]]
    assert all(np.isfinite(list(slerp["rows"][1]["metrics"].values())))
    # The sweep's gamma-1 row is the workdir's actor: c2f-evaluate on the workdir gives the same numbers.
    _tool("evaluate").main(
        [
            "--model",
            str(workdir),
            "--reward-model",
            str(workdir / "reward_model"),
            "--json",
            str(tmp_path / "eval.json"),
            *few,
        ]
    )
    direct = json.loads((tmp_path / "eval.json").read_text())[str(workdir)]
    assert direct == pytest.approx(rows[-1]["metrics"], rel=1e-5, abs=1e-6)
