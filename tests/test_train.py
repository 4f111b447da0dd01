"""The training CLI end to end on the tiny demo: metrics, CM, compilations, export, exact resume after SIGKILL."""

import json
import os
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

from c2f_jax import train
from c2f_jax.model import export, hf, model
from c2f_jax.runtime import checkpoint, metrics, preemption
from c2f_jax.runtime import workdir as c2f_workdir
from conftest import ROOT, SHORT, cli_env, comparable

def run_cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "c2f_jax.train", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=cli_env())


def test_demo_logs_every_metric_and_advances_cm(demo):
    workdir, rows = demo
    logged = metrics.read_metrics(workdir)
    assert [r["step"] for r in logged] == list(range(1, 9))
    needed = {"reward/mean", "reward/std", "kl", "loss/policy", "loss/value", "clipfrac", "entropy",
              "cm/length_limit", "cm/p_advance", "time/rollout_tokens_per_s", "time/update_tokens_per_s",
              "compilations", "skipped_updates", "kl_coef", "kl/per_response", "approx_kl", "ratio/max",
              "sampler_gap/mean", "sampler_gap/max", "value/explained_variance", "advantages/mean",
              "advantages/std", "returns/mean", "returns/std"}
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


def test_compilations_stop_growing_once_every_bucket_is_seen(demo):
    _, rows = demo
    shapes = [(r["prompt/bucket"], r["cm/length_limit"]) for r in rows]
    last_new_shape = max(i for i, s in enumerate(shapes) if s not in shapes[:i])
    after = [r["compilations"] for r in rows[last_new_shape:]]
    assert len(after) >= 2 and len(set(after)) == 1, [(s, r["compilations"]) for s, r in zip(shapes, rows)]


def test_export_loads_in_transformers_with_our_logits(demo, tmp_path):
    workdir, _ = demo
    out = export.export(workdir, tmp_path / "hf", dtype="float32")
    config, params = hf.load_pretrained(out)
    restored, _ = checkpoint.Checkpointer(workdir).restore()
    assert np.array_equal(np.asarray(params["layers"]["mlp"]["up"]),
                          np.asarray(restored["actor"]["params"]["layers"]["mlp"]["up"]))
    hm = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = np.array([tok("Human: How do tides work? Assistant: First,").input_ids])
    with torch.no_grad():
        ref = hm(torch.tensor(ids)).logits.numpy()
    assert np.abs(np.asarray(model.forward(config, params, ids)) - ref).max() < 1e-4
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "plot_run.py"), str(workdir)], capture_output=True,
                          text=True, env=cli_env())
    assert done.returncode == 0 and (workdir / "run.png").stat().st_size > 10_000


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


def _interrupted(args, workdir, sig, rows: int) -> tuple[int, str, str]:
    """The CLI run of `args`, sent `sig` once `workdir` has `rows` metrics rows: (exit status, stdout, stderr)."""
    proc = subprocess.Popen([sys.executable, "-m", "c2f_jax.train", *args], cwd=ROOT, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and len(metrics.read_metrics(workdir)) < rows:
        time.sleep(0.1)
    os.kill(proc.pid, sig)
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


def test_killed_or_signalled_run_resumes_to_the_same_metrics_and_weights(demo, tmp_path):
    """SIGKILL loses the steps since the last checkpoint; SIGTERM (a time limit, a preemption) saves the step
    it stops at, even with no periodic checkpoint due, and exits with EXIT_RESUMABLE. Either way the
    relaunched command ends exactly where an uninterrupted run does."""
    workdir, rows = demo
    # Share the demo's base and reward model so only PPO runs here.
    common = ["--config", "tiny_coarse.py", *SHORT, f"--config.model.base={workdir / 'base_model'}",
              f"--config.reward_model.path={workdir / 'reward_model'}"]
    assert run_cli(*common, "--workdir", str(tmp_path / "reference")).returncode == 0  # uninterrupted
    killed, stopped = tmp_path / "killed", tmp_path / "stopped"
    kill_args = [*common, "--workdir", str(killed)]
    stop_args = [*common, "--config.checkpoint_every=100", "--workdir", str(stopped)]

    _interrupted(kill_args, killed, signal.SIGKILL, 5)  # mid-run: after a checkpoint (step 4), before the next
    assert 0 < len(metrics.read_metrics(killed)) < 8
    code, out, err = _interrupted(stop_args, stopped, signal.SIGTERM, 3)
    logged = len(metrics.read_metrics(stopped))
    assert code == preemption.EXIT_RESUMABLE, err[-2000:]
    assert 3 <= logged < 8 and checkpoint.step_dirs(stopped).keys() == {logged}, (logged, checkpoint.step_dirs(stopped))
    assert f"stopped at step {logged} on a signal" in out

    for path, args in ((killed, kill_args), (stopped, stop_args)):
        done = run_cli(*args)
        assert done.returncode == 0, done.stderr[-2000:]
        assert comparable(metrics.read_metrics(path)) == comparable(metrics.read_metrics(tmp_path / "reference"))
        a, _ = checkpoint.Checkpointer(path).restore()
        b, _ = checkpoint.Checkpointer(tmp_path / "reference").restore()
        leaves_a, tree_a = jax.tree.flatten(a)
        leaves_b, tree_b = jax.tree.flatten(b)
        assert tree_a == tree_b and len(leaves_a) > 10
        assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(leaves_a, leaves_b))


@pytest.mark.parametrize("extra, words", [
    (["--config.ppo.kl_coeff=0.1"], "bad command line"),
    (["--config.data.source=/nowhere/pairs.jsonl"], "dataset file not found"),
    (["--config.model.base=/nowhere/mistral"], "model folder not found"),
    (["--config.ppo.minibatches=3"], "does not split into ppo.minibatches=3"),
    (["--config.ppo.minibatches=8", "--config.mesh.data=4"], "minibatches) size 2 does not split over"),
])
def test_bad_inputs_are_one_line_errors(extra, words, tmp_path):
    done = run_cli("--config", "tiny_coarse.py", *extra, "--workdir", str(tmp_path / "w"))
    assert done.returncode == 2 and words in done.stderr and done.stderr.strip().count("\n") == 0, done.stderr


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
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"{name}_tool", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gamma_sweep_end_to_end_on_the_demo_models(demo, tmp_path):
    """tools/sft.py makes an Instruct stand-in from the demo's base; tools/sweep.py merges it with the demo's
    Coarse Actor workdir at two gammas and evaluates all four models; tools/evaluate.py on the workdir gives
    the sweep's gamma-1 numbers; the table, JSON, plot and generations page agree."""
    workdir, _ = demo
    few = ["--limit", "4", "--max-new-tokens", "8", "--batch-size", "4"]
    _tool("sft").main(["--base", str(workdir / "base_model"), "--out", str(tmp_path / "sft"), "--steps", "4",
                       "--batch-size", "4", "--max-length", "128"])
    _tool("sweep").main(["--coarse", str(workdir), "--sft", str(tmp_path / "sft"), "--gammas", "0.7,0.3",
                         "--reward-model", str(workdir / "reward_model"), "--out", str(tmp_path / "sweep"),
                         "--show", "2", *few])
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
    # The sweep's gamma-1 row is the workdir's actor: tools/evaluate.py on the workdir gives the same numbers.
    _tool("evaluate").main(["--model", str(workdir), "--reward-model", str(workdir / "reward_model"),
                            "--json", str(tmp_path / "eval.json"), *few])
    direct = json.loads((tmp_path / "eval.json").read_text())[str(workdir)]
    assert direct == pytest.approx(rows[-1]["metrics"], rel=1e-5, abs=1e-6)
