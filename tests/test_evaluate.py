"""Evaluation: text metrics on hand-made responses, model-based scores against direct computations, CLI errors."""

import importlib.util
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from c2f_jax import data
from c2f_jax.eval import evaluate
from c2f_jax.model import hf, model, tokenizer
from c2f_jax.rl import reward

ROOT = Path(__file__).resolve().parent.parent


def load_tool(name):
    return importlib.import_module(f"c2f_jax.cli.{name}")


# ----------------------------------------------------------------------------- text metrics


def test_repetition_counts_repeated_4grams_within_a_response():
    assert evaluate.repetition([1, 2, 3, 4, 5, 6]) == 0.0
    # 1 2 3 4 1 2 3 4: 4-grams 1234 2341 3412 4123 1234 -> one of five repeats an earlier one
    assert evaluate.repetition([1, 2, 3, 4, 1, 2, 3, 4]) == pytest.approx(1 / 5)
    assert evaluate.repetition([7] * 10) == pytest.approx(6 / 7)  # seven 4-grams, all the same
    assert evaluate.repetition([1, 2, 3]) == 0.0  # too short to hold a 4-gram


def test_distinct_n_pools_ngrams_across_responses():
    responses = [[1, 2, 3], [1, 2, 4]]
    assert evaluate.distinct(responses, 1) == pytest.approx(4 / 6)  # {1,2,3,4} of 6 tokens
    assert evaluate.distinct(responses, 2) == pytest.approx(3 / 4)  # {12, 23, 24} of 4 bigrams
    assert evaluate.distinct([[5]], 2) == 0.0


def test_text_metrics_length_and_eos_rate():
    m = evaluate.text_metrics([[1, 2], [3, 4, 5, 6]], [True, False])
    assert m["length"] == 3.0 and m["eos_rate"] == 0.5
    assert m["distinct_1"] == 1.0 and m["repetition"] == 0.0
    with pytest.raises(evaluate.EvalError, match="no responses"):
        evaluate.text_metrics([], [])


def test_markdown_table_holds_every_metric_in_order():
    table = evaluate.markdown_table({"a": {"reward": 1.0, "length": 2.0}, "b": {"length": 3.0}})
    lines = table.splitlines()
    assert lines[0] == "| model | reward | length (tokens) |"
    assert lines[2] == "| a | 1.000 | 2.000 |" and lines[3] == "| b |  | 3.000 |"


# ----------------------------------------------------------------------------- model passes


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random tiny policy and reward model (vocab 32000, the bundled tokenizer) as HF folders."""
    root = tmp_path_factory.mktemp("eval")
    tok = tokenizer.load_tokenizer(None)
    config = model.TINY
    params = model.init_params(config, jax.random.key(0))
    rm_config, rm_params = reward.init_from_base(config, params, jax.random.key(1))
    hf.save_pretrained(root / "policy", config, params, tokenizer_source=tok)
    hf.save_pretrained(root / "rm", rm_config, rm_params, tokenizer_source=tok)
    return root, evaluate.load_model(root / "policy"), evaluate.load_model(root / "rm")


def test_scored_tokens_equal_a_direct_log_softmax(tiny):
    """Left padding, bucketing and scoring only the last K positions change nothing: each row equals its own
    unpadded full pass, and is_greedy is the argmax test of every scored token."""
    _, policy, _ = tiny
    tok = policy.tokenizer
    pairs = evaluate.held_out_pairs("bundled", 3)
    rows = [(data.tokenize_prompt(tok, p.prompt), data.tokenize_answer(tok, p.chosen)) for p in pairs]
    ids, mask = data.left_pad([a + b for a, b in rows], evaluate.SEQUENCE_BUCKETS, tok.pad_token_id)
    K = max(len(answer) for _, answer in rows) + 3
    targets = np.full((len(rows), K), -1, np.int32)
    for r, (_, answer) in enumerate(rows):
        targets[r, -len(answer) :] = answer
    got, greedy = evaluate.compiled_score_tokens(
        policy.params, ids[:, :-1], mask[:, :-1], targets, config=policy.config
    )
    got = np.asarray(got)
    for r, (prompt, answer) in enumerate(rows):
        seq = jnp.asarray([prompt + answer], jnp.int32)
        logits = model.forward(policy.config, policy.params, seq)[0, :-1]
        logp = jax.nn.log_softmax(logits, axis=-1)
        want = sum(float(logp[len(prompt) - 1 + i, tok_id]) for i, tok_id in enumerate(answer))
        assert got[r] == pytest.approx(want, rel=1e-4, abs=1e-3)
        argmax = np.asarray(jnp.argmax(logits, -1))[len(prompt) - 1 :]
        assert bool(greedy[r]) == bool(np.all(argmax == np.asarray(answer)))
    ppl = evaluate.perplexity(policy, pairs, batch_size=2)
    n = sum(len(a) for _, a in rows)
    assert ppl == pytest.approx(np.exp(-got.sum() / n), rel=1e-5)


def test_reward_scores_equal_the_reward_model_on_each_unpadded_sequence(tiny):
    _, _, rm = tiny
    tok = rm.tokenizer
    prompts, responses = ["Why is the sky blue?", "Hi"], ["Because of scattering, mostly.", "Hello there, friend!"]
    got = evaluate.reward_scores(rm, prompts, responses, batch_size=4)
    for p, r, score in zip(prompts, responses, got):
        seq = data.tokenize_prompt(tok, tokenizer.format_prompt(p)) + data.tokenize_answer(tok, r)
        want = model.sequence_scores(rm.config, rm.params, jnp.asarray([seq], jnp.int32))[0, 0]
        assert score == pytest.approx(float(want), rel=1e-4, abs=1e-4)


def test_sample_responses_strip_eos_and_measure_what_was_generated(tiny, monkeypatch):
    """The responses evaluate measures are the rollout's tokens up to EOS, without it; suppressed EOS gives
    full-length responses."""
    _, policy, _ = tiny
    gens = evaluate.sample_responses(
        policy, ["Hi", "Tell me a story"], max_new_tokens=8, suppress_eos=True, batch_size=4
    )
    assert [len(g["tokens"]) for g in gens] == [8, 8] and not any(g["ended_with_eos"] for g in gens)
    eos, pad = policy.tokenizer.eos_token_id, policy.tokenizer.pad_token_id
    # A rollout where row 0 stops after two tokens: EOS is dropped from the measured tokens, the rest kept.
    tokens = np.array([[10, 11, eos, pad], [12, 13, 14, 15]] * 2, np.int32)
    mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1]] * 2, np.int32)
    monkeypatch.setattr(
        evaluate.rollout,
        "generate",
        lambda *a, **k: evaluate.rollout.Rollout(tokens, mask, np.zeros(mask.shape, np.float32)),
    )
    gens = evaluate.sample_responses(policy, ["a", "b"], max_new_tokens=4, batch_size=4)
    assert [g["tokens"] for g in gens] == [[10, 11], [12, 13, 14, 15]]
    assert [g["ended_with_eos"] for g in gens] == [True, False]
    assert evaluate.text_metrics([g["tokens"] for g in gens], [g["ended_with_eos"] for g in gens])["length"] == 3


def test_a_policy_must_be_a_causal_lm(tiny):
    _, _, rm = tiny
    with pytest.raises(evaluate.EvalError, match="a policy must be a MistralForCausalLM"):
        evaluate.evaluate_model(rm, ["Hi"], evaluate.EvalSettings(max_new_tokens=4))


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--model", "{root}/nope"], r"--model \S+nope: model folder not found"),
        (["--model", "{root}/policy", "--prompts", "{root}/none.txt"], r"none\.txt: prompts file not found"),
        (["--model", "{root}/policy", "--prompts", "{root}/bad.jsonl"], r"bad\.jsonl:2: expected a JSON object"),
        (["--model", "{root}/policy", "--batch-size", "0"], r"--batch-size=0, .* must be >= 1"),
        (["--model", "{root}/policy", "--limit", "0"], r"--limit=0 must be >= 1"),
    ],
)
def test_evaluate_cli_bad_inputs_are_one_line_errors(tiny, argv, words, capsys):
    root, _, _ = tiny
    (root / "bad.jsonl").write_text('{"prompt": "a"}\n[1, 2]\n')
    tool = load_tool("evaluate")
    with pytest.raises(SystemExit) as e:
        tool.cli.run(lambda: tool.main([a.format(root=root) for a in argv]))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    assert re.search(words, err), err


def test_sweep_refuses_an_existing_out_and_a_missing_reward_model(tiny, capsys):
    root, _, _ = tiny
    tool = load_tool("sweep")
    (root / "taken").mkdir(exist_ok=True)
    for argv, words in (
        (
            [
                "--coarse",
                root / "policy",
                "--sft",
                root / "policy",
                "--out",
                root / "taken",
                "--reward-model",
                root / "rm",
            ],
            "already exists",
        ),
        (["--coarse", root / "policy", "--sft", root / "policy", "--out", root / "new"], "--reward-model is required"),
        (
            [
                "--coarse",
                root / "policy",
                "--sft",
                root / "policy",
                "--out",
                root / "new",
                "--reward-model",
                root / "rm",
                "--gammas",
                "0.5,1.5",
            ],
            r"gamma='1\.5' is outside",
        ),
        (
            [
                "--coarse",
                root / "policy",
                "--sft",
                root / "policy",
                "--out",
                root / "policy",
                "--overwrite",
                "--reward-model",
                root / "rm",
            ],
            r"is the input --coarse",
        ),
    ):
        with pytest.raises(SystemExit) as e:
            tool.cli.run(lambda: tool.main([str(a) for a in argv]))
        assert e.value.code == 2
        assert re.search(words, capsys.readouterr().err)
    assert not (root / "new").exists()
