"""Multiple-choice evaluation: row layouts, k-shot prompts, scores equal to a plain forward, static shapes."""

import json

import jax
import numpy as np
import pytest

from c2f_jax import compilations, model, sft, tokenizer
from c2f_jax import multiple_choice as mc
from c2f_jax.multiple_choice import Item, MCError

# Real Mistral vocabulary (for the real tokenizer), everything else as small as it gets. The window (32) is
# shorter than the longest rows, yet two layers still reach back to the left pads: a missing mask would show.
SMALL = model.MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            num_key_value_heads=1, head_dim=16, sliding_window=32, max_position_embeddings=512)
LONG = Item("Here is a long story that goes on and on about many things. " * 4 + "What is two plus two?",
            ("Four", "Five and a half"), 0)


@pytest.fixture(scope="module")
def tok():
    return tokenizer.load_tokenizer(None)


@pytest.fixture(scope="module")
def params():
    return model.init_params(SMALL, jax.random.key(0))


@pytest.fixture(scope="module")
def bundled():
    return mc.load_items("bundled")


# ----------------------------------------------------------------------------- loading


ROWS = [  # (row, expected item)
    ({"question": "2+2?", "choices": ["3", "4", "5", "6"], "answer": 1}, Item("2+2?", ("3", "4", "5", "6"), 1)),
    ({"question": "Sky?", "choices": ["red", "blue"], "answer": "B"}, Item("Sky?", ("red", "blue"), 1)),
    ({"question": "Cold?", "choices": {"text": ["ice", "fire", "sun"], "label": ["1", "2", "3"]}, "answerKey": "1"},
     Item("Cold?", ("ice", "fire", "sun"), 0)),
    ({"question": "Wet?", "choices": {"text": ["sand", "rain"], "label": ["A", "B"]}, "answerKey": "B"},
     Item("Wet?", ("sand", "rain"), 1)),
    ({"ctx": "A man opens a door. He", "endings": ["walks in.", "is a door."], "label": "0"},
     Item("A man opens a door. He", ("walks in.", "is a door."), 0)),
    ({"ctx_a": "[header] Make tea.", "ctx_b": "you", "endings": ["boil  water.", "eat [step] rocks."], "label": 1},
     Item("Make tea. you", ("boil water.", "eat rocks."), 1)),
    ({"query": "Dogs bark?", "choices": ["yes", "no"], "answer": 0}, Item("Dogs bark?", ("yes", "no"), 0)),
]


def test_every_row_layout_parses(tmp_path):
    rows, expected = [r for r, _ in ROWS], [e for _, e in ROWS]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "rows.json").write_text(json.dumps(rows[-1:] * 3))
    import datasets

    datasets.Dataset.from_list(rows[2:4]).to_parquet(str(tmp_path / "rows.parquet"))
    assert mc.load_items(str(tmp_path / "rows.jsonl")) == expected
    assert mc.load_items(str(tmp_path / "rows.jsonl"), limit=3) == expected[:3]
    assert mc.load_items(str(tmp_path / "rows.json")) == expected[-1:] * 3
    assert mc.load_items(str(tmp_path / "rows.parquet")) == expected[2:4]


def test_hub_name_with_config_reaches_datasets(monkeypatch):
    import datasets

    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **kw: calls.append((a, kw)) or [ROWS[0][0]])
    assert mc.load_items("cais/mmlu:all", split="dev") == [ROWS[0][1]]
    assert calls == [(("cais/mmlu", "all"), {"split": "dev"})]


@pytest.mark.parametrize("bad, words", [
    ({"question": "q", "choices": ["a", "b"], "answer": 2}, "'answer'=2 is out of range for 2 choices"),
    ({"question": "q", "choices": ["a", ""], "answer": 0}, "'choices' holds ''"),
    ({"question": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "C"}, "'answerKey'='C'"),
    ({"ctx": "c", "endings": ["a", "b"], "label": ""}, "'label'='' is not a choice index"),  # HellaSwag test split
    ({"prompt": "q"}, "no 'query', 'question' or 'endings' key"),
    ("not an object", "expected an object"),
])
def test_bad_row_is_a_one_line_error_naming_file_and_row(tmp_path, bad, words):
    path = tmp_path / "items.jsonl"
    path.write_text(json.dumps(ROWS[0][0]) + "\n\n" + json.dumps(bad) + "\n")  # the bad row is on line 3
    with pytest.raises(MCError, match=f"items.jsonl row 3: {words}") as e:
        mc.load_items(str(path))
    assert "\n" not in str(e.value)


def test_bad_files_are_one_line_errors(tmp_path):
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    (tmp_path / "obj.json").write_text('{"question": "q"}')
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    (tmp_path / "rows.csv").write_text("question,answer\n")
    for name, words in [("broken.jsonl", "row 1: not JSON"), ("obj.json", "expected a JSON list"),
                        ("missing.parquet", "file not found"), ("junk.parquet", "cannot read"),
                        ("rows.csv", "expected a .jsonl, .json or .parquet file")]:
        with pytest.raises(MCError, match=words):
            mc.load_items(str(tmp_path / name))


def test_bundled_set_is_four_choice_with_answers_spread(bundled):
    assert len(bundled) == 24 and all(len(it.choices) == 4 for it in bundled)
    assert np.bincount([it.answer for it in bundled]).tolist() == [6, 6, 6, 6]


# ----------------------------------------------------------------------------- prompts


def test_k_shot_prefix_holds_k_solved_examples_never_the_item(bundled):
    items = bundled[:5]
    for style in ("arc", "mmlu"):
        for item, ctx in zip(items, mc.contexts(items, style, shots=3)):
            prefix, query = ctx[: -len(mc.format_query(item, style))], mc.format_query(item, style)
            assert ctx.endswith(query) and query == f"Question: {item.query}\nAnswer:"
            shots = [s for s in items if s != item][:3]  # the first 3 others, in order
            assert prefix == "".join(f"Question: {s.query}\nAnswer: {s.choices[s.answer]}\n\n" for s in shots)
            assert item.query not in prefix and prefix.count("Question:") == 3
    # An explicit pool that contains the item still never shows it; too small a pool is an error.
    ctx = mc.contexts(items[:1], "arc", shots=2, shot_pool=bundled[:3])[0]
    assert ctx.count(items[0].query) == 1 and bundled[1].query in ctx and bundled[2].query in ctx
    with pytest.raises(MCError, match="shots=5 but the shot pool has only 4"):
        mc.contexts(items, "arc", shots=5)
    assert mc.contexts(items, "arc", shots=0) == [mc.format_query(it, "arc") for it in items]


def test_hellaswag_style_is_context_then_ending():
    a = Item("A cat sees a mouse. The cat", ("chases it.", "sings."), 0)
    b = Item("She opens the box and", ("x", "y"), 1)
    assert mc.format_query(a, "hellaswag") == "A cat sees a mouse. The cat"
    assert mc.few_shot_prefix([a], "hellaswag") == "A cat sees a mouse. The cat chases it.\n\n"
    assert mc.contexts([b], "hellaswag", shots=1, shot_pool=[a, b])[0] == (
        "A cat sees a mouse. The cat chases it.\n\nShe opens the box and")
    with pytest.raises(MCError, match="style='boolq'"):
        mc.format_query(a, "boolq")


# ----------------------------------------------------------------------------- scoring


def reference_logprobs(config, params, tok, context: str, choices, max_len: int) -> np.ndarray:
    """Independent of the scoring program: right-padded rows (causal attention never sees the pads), no mask,
    one plain forward, float64 log-softmax in numpy at each continuation position."""
    rows = []
    for c in choices:
        cont = tok(" " + c, add_special_tokens=False).input_ids
        ctx = tok(context).input_ids[-(max_len - len(cont)):]
        rows.append((ctx + cont, len(cont)))
    width = max(len(r) for r, _ in rows)
    ids = np.array([r + [0] * (width - len(r)) for r, _ in rows], np.int32)
    logits = np.asarray(jax.jit(model.forward, static_argnums=0)(config, params, ids), np.float64)
    out = []
    for b, (r, n) in enumerate(rows):
        total = 0.0
        for t in range(len(r) - n, len(r)):
            z = logits[b, t - 1]
            total += z[r[t]] - (z.max() + np.log(np.sum(np.exp(z - z.max()))))
        out.append(total)
    return np.array(out)


def test_choice_logprobs_equal_a_plain_forward(tok, params, bundled):
    # One-shot rows of 33..46 tokens across two buckets, a padded last batch (18 rows in batches of 4), and one
    # item whose context must lose its start to fit the largest bucket.
    items, shots, buckets = [bundled[i] for i in (0, 7, 15, 22)] + [LONG], 1, (40, 48)
    got = mc.choice_logprobs(SMALL, params, tok, items, shots=shots, style="arc", batch_size=4, buckets=buckets)
    assert [g.shape for g in got] == [(len(it.choices),) for it in items] and got[0].dtype == np.float64
    for it, ctx, g in zip(items, mc.contexts(items, "arc", shots), got):
        np.testing.assert_allclose(g, reference_logprobs(SMALL, params, tok, ctx, it.choices, max(buckets)),
                                   rtol=1e-5, atol=1e-4)
    lengths = [len(r) for r, _ in mc.request_tokens(tok, mc.contexts(items, "arc", shots), items, 10**6)]
    assert min(lengths) <= 40 < max(lengths[:-2]) <= 48 < lengths[-1]  # both buckets, and LONG truncated


def test_too_long_continuation_is_an_error(tok, params):
    item = Item("q", ("word " * 40, "b"), 1)
    with pytest.raises(MCError, match="item 0 choice 0: .* no room for context in the largest bucket"):
        mc.choice_logprobs(SMALL, params, tok, [item], buckets=(16,))


def test_metrics_acc_and_per_character_acc_norm():
    items = [Item("q", ("a", "bbbbbbbb"), 0), Item("q", ("a", "bbbbbbbb"), 1), Item("q", ("cc", "dd"), 1)]
    lps = [np.array([-2.0, -4.0]), np.array([-2.0, -4.0]), np.array([-3.0, -1.0])]
    # Item 0: acc right, acc_norm wrong (-4/8 > -2/1); item 1 the reverse; item 2 right on both.
    assert mc.metrics(items, lps) == {"acc": 2 / 3, "acc_norm": 2 / 3, "n": 3}


def test_fine_tuned_model_picks_the_answers_it_was_taught(tok, params, bundled):
    items = bundled[:8]
    texts = [mc.format_query(it, "arc") + " " + it.choices[it.answer] for it in items]
    trained, loss = sft.fine_tune(SMALL, params, [tok(t).input_ids for t in texts], steps=40, batch_size=8,
                                  lr=1e-2, buckets=(24,), pad_id=tok.pad_token_id)
    before = mc.choice_logprobs(SMALL, params, tok, items, batch_size=8, buckets=(32,))
    after = mc.choice_logprobs(SMALL, trained, tok, items, batch_size=8, buckets=(32,))
    assert mc.score(SMALL, trained, tok, items, batch_size=8, buckets=(32,)) == {"acc": 1.0, "acc_norm": 1.0, "n": 8}
    margin = lambda lps: np.array([lp[it.answer] - np.max(np.delete(lp, it.answer)) for it, lp in zip(items, lps)])
    assert min(margin(after)) > 1.0, (loss, margin(after))
    # Random weights only favour choices with fewer tokens: where every choice has as many tokens, no preference.
    same = [len({len(tok(" " + c, add_special_tokens=False).input_ids) for c in it.choices}) == 1 for it in items]
    assert sum(same) >= 4 and max(np.abs(margin(before)[same])) < 1.0, margin(before)


def test_one_compilation_per_batch_size_and_bucket(tok, params, bundled):
    items = bundled[:4]  # 16 rows of 14..22 tokens: 8 batches of 2, all in bucket 40
    name = "jit(continuation_logprob)"
    before = compilations.by_name().get(name, 0)
    first = mc.choice_logprobs(SMALL, params, tok, items, batch_size=2, buckets=(40,))
    assert compilations.by_name().get(name, 0) - before == 1
    again = mc.choice_logprobs(SMALL, params, tok, items[::-1], batch_size=2, buckets=(40,))
    assert compilations.by_name().get(name, 0) - before == 1
    np.testing.assert_allclose(np.concatenate(first), np.concatenate(again[::-1]), rtol=1e-6)
