"""The lm-eval model `c2f-jax` against lm-eval's own `hf` backend on the same exported float32 model.

Local tasks (tests/lm_eval_tasks), one per request type: two-shot multiple choice (loglikelihood), documents
longer than max_length (loglikelihood_rolling), greedy generation to stop strings (generate_until).
"""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import ROOT, cli_env

TASKS = ["c2f_mc", "c2f_mc_letters", "c2f_rolling", "c2f_gen"]
MAX_LENGTH = 64  # shorter than two of the documents, so rolling windows are exercised


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The tiny preset with weights scaled up (clear argmaxes), real Mistral tokenizer, as an HF folder."""
    from c2f_jax.model import hf, model, tokenizer

    out = tmp_path_factory.mktemp("lmeval") / "model"
    params = model.init_params(model.TINY, jax.random.key(0))
    params = jax.tree_util.tree_map_with_path(
        lambda path, a: a if "norm" in jax.tree_util.keystr(path) else a * 5, params
    )
    hf.save_pretrained(out, model.TINY, params, tokenizer_source=tokenizer.load_tokenizer(None))
    return out


def evaluate(model, model_args, **kw):
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=TASKS,
        log_samples=True,
        batch_size=4,
        task_manager=TaskManager(include_path=str(ROOT / "tests" / "lm_eval_tasks")),
        **kw,
    )


@pytest.fixture(scope="module")
def both(folder):
    import os

    import c2f_jax.eval.lm_eval  # noqa: F401  (registers c2f-jax)

    cwd = os.getcwd()
    os.chdir(ROOT)  # the task YAMLs name their data files relative to the checkout
    try:
        ours = evaluate("c2f-jax", f"pretrained={folder},max_length={MAX_LENGTH}")
        theirs = evaluate("hf", f"pretrained={folder},dtype=float32,max_length={MAX_LENGTH}", device="cpu")
    finally:
        os.chdir(cwd)
    return ours, theirs


def _pairs(ours, theirs, task):
    a, b = ours["samples"][task], theirs["samples"][task]
    assert [s["doc_id"] for s in a] == [s["doc_id"] for s in b] and a
    return zip(a, b)


def test_loglikelihoods_and_is_greedy_equal_the_hf_backend(both, folder):
    from c2f_jax.model import tokenizer

    tok = tokenizer.load_tokenizer(folder)
    worst = 0.0
    for sa, sb in [pair for task in ("c2f_mc", "c2f_mc_letters") for pair in _pairs(*both, task)]:
        assert sa["arguments"] == sb["arguments"]  # the same two-shot prompts
        for (ll_a, greedy_a), (ll_b, greedy_b), args in zip(
            (r[0] for r in sa["resps"]), (r[0] for r in sb["resps"]), sa["arguments"]
        ):
            tokens = len(tok(args[1], add_special_tokens=False).input_ids)
            worst = max(worst, abs(ll_a - ll_b) / tokens)
            assert greedy_a == greedy_b
    print(f"largest loglikelihood difference per scored token: {worst:.2e}")
    assert worst <= 1e-4


def test_rolling_loglikelihoods_over_documents_longer_than_max_length(both, folder):
    from c2f_jax.model import tokenizer

    tok = tokenizer.load_tokenizer(folder)
    longest = 0
    for sa, sb in _pairs(*both, "c2f_rolling"):
        tokens = len(tok(sa["doc"]["text"]).input_ids)
        longest = max(longest, tokens)
        assert abs(sa["resps"][0][0] - sb["resps"][0][0]) <= 1e-4 * tokens
    assert longest > MAX_LENGTH + 1  # more than one window


def test_greedy_generations_identical(both):
    for sa, sb in _pairs(*both, "c2f_gen"):
        assert sa["resps"] == sb["resps"]
        assert sa["resps"][0][0]  # something was generated (cut at the stop strings)


def test_task_metrics_equal(both):
    ours, theirs = both
    for task in TASKS:
        for key, value in theirs["results"][task].items():
            if isinstance(value, (int, float)) and "stderr" not in key:
                assert ours["results"][task][key] == pytest.approx(value, rel=1e-6), (task, key)


def test_windows_pack_into_rows_that_share_their_prefix():
    """Every window lands once, in a row of at most `capacity` tokens holding its own prefix; the choices of a
    question share one row, and documents (empty prefix) share rows instead of padding."""
    from c2f_jax.eval.lm_eval import pack_windows

    question = tuple(range(100, 120))
    choices = {(question + (c,) * (n - 1), (c,) * n) for c, n in ((1, 3), (2, 1), (3, 5), (4, 2))}
    documents = {(tuple(range(n)), tuple(range(1, n + 1))) for n in (30, 25, 20, 12, 9, 4)}
    rows = pack_windows(choices | documents, capacity=40)
    seen = [w for _, ws in rows for w in ws]
    assert sorted(seen) == sorted(choices | documents)
    for prefix, ws in rows:
        assert len(prefix) + sum(len(c) for _, c in ws) <= 40
        assert all(inp[: len(inp) - len(c)] == prefix for inp, c in ws)
    assert [len(ws) for p, ws in rows if p == question[:-1]] == [4]  # the last context token predicts
    assert len([p for p, _ in rows if p == ()]) == 3  # 100 tokens in rows of 40, first-fit longest first


@pytest.mark.slow  # lm-eval's CLI, task index or a second mesh
def test_a_second_evaluation_compiles_nothing(folder, monkeypatch):
    """Requests are batched into static length buckets: once a task's buckets have compiled, nothing does."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from c2f_jax.eval.lm_eval import C2FJaxLM
    from c2f_jax.runtime import compilations

    monkeypatch.chdir(ROOT)
    lm = C2FJaxLM(pretrained=str(folder), max_length=MAX_LENGTH, batch_size=4)
    run = lambda: lm_eval.simple_evaluate(
        model=lm, tasks=TASKS, task_manager=TaskManager(include_path=str(ROOT / "tests" / "lm_eval_tasks"))
    )
    run()
    before = compilations.total()
    run()
    assert compilations.total() == before


def test_in_memory_merge_equals_the_merged_folder(folder, tmp_path):
    """coarse=, sft=, gamma= merges in memory exactly as tools/merge.py writes the folder."""
    from c2f_jax.eval.lm_eval import C2FJaxLM
    from c2f_jax.merge import merge
    from c2f_jax.model import hf, model

    config, params = hf.load_pretrained(folder)
    other = tmp_path / "other"
    hf.save_pretrained(other, config, jax.tree.map(lambda a: a * 0.5 + 0.01, params), tokenizer_source=folder)
    merge.write_merge(merge.plan_merge(folder, other, [0.7]), tmp_path / "merged")
    merged_dir = tmp_path / "merged"
    if not (merged_dir / "config.json").exists():
        merged_dir = next(p for p in merged_dir.iterdir() if (p / "config.json").exists())
    from_folder = C2FJaxLM(pretrained=str(merged_dir), max_length=MAX_LENGTH, batch_size=4)
    in_memory = C2FJaxLM(coarse=str(folder), sft=str(other), gamma=0.7, max_length=MAX_LENGTH, batch_size=4)
    for a, b in zip(jax.tree.leaves(from_folder.params), jax.tree.leaves(in_memory.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert model.param_shapes(from_folder.config) is not None


def test_bad_model_args_are_one_line_errors(folder):
    from c2f_jax.eval.lm_eval import C2FJaxLM, LMEvalError

    with pytest.raises(LMEvalError, match="unknown 'pretrianed'"):
        C2FJaxLM(pretrianed=str(folder))
    with pytest.raises(LMEvalError, match="mesh='8'"):
        C2FJaxLM(pretrained=str(folder), mesh="8")
    with pytest.raises(LMEvalError, match="pretrained=DIR, or coarse=DIR,sft=DIR,gamma=G"):
        C2FJaxLM(coarse=str(folder))


@pytest.mark.slow  # lm-eval's CLI, task index or a second mesh
def test_the_cli_is_lm_evals_with_c2f_jax_registered(folder, tmp_path):
    out = tmp_path / "results"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "c2f_jax.eval.lm_eval",
            "--model",
            "c2f-jax",
            "--model_args",
            f"pretrained={folder},max_length={MAX_LENGTH}",
            "--tasks",
            "c2f_mc,c2f_gen",
            "--include_path",
            "tests/lm_eval_tasks",
            "--limit",
            "2",
            "--batch_size",
            "2",
            "--seed",
            "1",
            "--log_samples",
            "--output_path",
            str(out),
        ],
        cwd=ROOT,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = [p for p in out.rglob("results_*.json")]
    assert results, list(out.rglob("*"))
    saved = json.loads(results[0].read_text())
    assert saved["config"]["model"] == "c2f-jax" and set(saved["results"]) == {"c2f_mc", "c2f_gen"}
    assert any(out.rglob("samples_c2f_mc_*.jsonl"))


@pytest.mark.slow  # lm-eval's CLI, task index or a second mesh
def test_paper_preset_names_the_papers_11_benchmarks_lm_eval_knows():
    from lm_eval.tasks import TaskManager

    from c2f_jax.eval.lm_eval import TASKS_DIR, parse_tasks

    paper = parse_tasks("paper")
    assert len(paper) == 11 and dict(paper)["mmlu"] == 5 and dict(paper)["gsm8k"] == 8 and dict(paper)["race_m"] == 1
    known = set(TaskManager(include_path=str(TASKS_DIR)).all_tasks)
    assert {name for name, _ in paper} <= known  # race_m is ours, the rest lm-eval's own
    assert parse_tasks("c2f_mc:2, c2f_gen") == [("c2f_mc", 2), ("c2f_gen", None)]


@pytest.mark.slow  # lm-eval's CLI, task index or a second mesh
def test_sweep_tasks_writes_table3_with_every_gamma_merged_in_memory(folder, tmp_path, monkeypatch):

    from c2f_jax.model import hf

    config, params = hf.load_pretrained(folder)
    sft = tmp_path / "sft"
    hf.save_pretrained(sft, config, jax.tree.map(lambda a: a * 0.9, params), tokenizer_source=folder)
    from c2f_jax.cli import sweep

    monkeypatch.chdir(ROOT)
    out = tmp_path / "table3"
    assert (
        sweep.main(
            [
                "--coarse",
                str(folder),
                "--sft",
                str(sft),
                "--gammas",
                "0.5",
                "--tasks",
                "c2f_mc:1,c2f_rolling",
                "--include-path",
                "tests/lm_eval_tasks",
                "--task-limit",
                "2",
                "--max-length",
                "64",
                "--batch-size",
                "4",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    table = (out / "table3.md").read_text()
    assert "| 0 (SFT) |" in table and "| 0.5 |" in table and "| 1 (coarse) |" in table
    saved = json.loads((out / "table3.json").read_text())
    assert [r["gamma"] for r in saved["rows"]] == [0.0, 0.5, 1.0]
    assert all(set(r["metrics"]) == {"c2f_mc", "c2f_rolling", "mean"} for r in saved["rows"])
    assert (out / "table3.png").exists() and len(list((out / "lm_eval").glob("gamma_*.json"))) == 3
    assert not (out / "models").exists()  # merged in memory, no folder per gamma


@pytest.mark.slow  # lm-eval's CLI, task index or a second mesh
def test_on_a_2x2x2_mesh_the_results_equal_one_device(folder, monkeypatch):
    """Params in the train layout over 8 devices, batches split over data x fsdp: the same loglikelihoods and
    greedy generations as one device."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from c2f_jax.eval.lm_eval import C2FJaxLM

    monkeypatch.chdir(ROOT)
    results = []
    for mesh in ("1x1x1", "2x2x2"):
        lm = C2FJaxLM(pretrained=str(folder), max_length=MAX_LENGTH, batch_size=4, mesh=mesh)
        assert len(lm.params["embed"].sharding.device_set) == (8 if mesh == "2x2x2" else 1)
        results.append(
            lm_eval.simple_evaluate(
                model=lm,
                tasks=["c2f_mc", "c2f_gen"],
                log_samples=True,
                limit=3,
                task_manager=TaskManager(include_path=str(ROOT / "tests" / "lm_eval_tasks")),
            )
        )
    one, eight = results
    for sa, sb in _pairs(one, eight, "c2f_mc"):
        for a, b in zip(sa["resps"], sb["resps"]):
            assert a[0][0] == pytest.approx(b[0][0], abs=1e-4) and a[0][1] == b[0][1]
    for sa, sb in _pairs(one, eight, "c2f_gen"):
        assert sa["resps"] == sb["resps"]
