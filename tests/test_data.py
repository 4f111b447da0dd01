"""HH-RLHF parsing, loading from local files, bucketing and the resumable iterator."""

import json

import numpy as np
import pytest

from c2f_jax import data
from c2f_jax.data import DataError
from c2f_jax.model import tokenizer

MULTI_TURN = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: What is a tide?\n\nAssistant: The sea rising.</s>"


def test_split_keeps_every_turn_before_the_last_answer():
    prompt, answer = data.split_transcript(MULTI_TURN)
    assert prompt == "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: What is a tide?\n\nAssistant:"
    assert answer == "The sea rising."  # the stop string is stripped from the target
    assert data.split_transcript("no dialogue here") is None
    assert data.split_transcript("\n\nAssistant: orphan answer") is None


def test_bad_rows_are_skipped_and_counted(tmp_path):
    good = {"chosen": MULTI_TURN, "rejected": MULTI_TURN.replace("The sea rising.", "No.")}
    rows = [
        good,
        {"chosen": "garbage", "rejected": "garbage"},
        {"chosen": MULTI_TURN, "rejected": "\n\nHuman: other\n\nAssistant: x"},  # prompts differ
        {"chosen": MULTI_TURN, "rejected": MULTI_TURN.replace("The sea rising.</s>", "")},  # empty answer
        {"chosen": None, "rejected": MULTI_TURN},
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs, skipped = data.load_pairs(str(path))
    assert skipped == 4 and len(pairs) == 1
    assert pairs[0].chosen == "The sea rising." and pairs[0].rejected == "No."


def test_parquet_and_json_files_load(tmp_path):
    import datasets

    rows = [{"chosen": MULTI_TURN, "rejected": MULTI_TURN.replace("rising", "falling")}] * 3
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "p.parquet"))
    (tmp_path / "p.json").write_text(json.dumps(rows))
    for name in ("p.parquet", "p.json"):
        pairs, skipped = data.load_pairs(str(tmp_path / name))
        assert len(pairs) == 3 and skipped == 0


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda d: d / "missing.jsonl", "dataset file not found"),
        (
            lambda d: (d / "cols.jsonl").write_text('{"text": "x"}\n') and d / "cols.jsonl",
            r"no \['chosen', 'rejected'\]",
        ),
        (lambda d: (d / "bad.jsonl").write_text("{not json\n") and d / "bad.jsonl", "cannot read"),
    ],
)
def test_bad_sources_are_one_line_errors(tmp_path, make, words):
    with pytest.raises(DataError, match=words) as e:
        data.load_pairs(str(make(tmp_path)))
    assert "\n" not in str(e.value)


def test_bundled_sample_is_a_real_preference_set():
    pairs, skipped = data.load_pairs("bundled")
    assert skipped == 0 and 300 <= len(pairs) <= 500
    assert all(p.prompt.endswith("Assistant:") for p in pairs)
    assert np.mean([len(p.chosen) > len(p.rejected) for p in pairs]) > 0.6
    train, held_out = data.train_eval_split(pairs, 0.2, seed=0)
    assert len(held_out) == round(0.2 * len(pairs)) and not set(map(id, train)) & set(map(id, held_out))


def test_preference_batch_shares_one_bucket_and_keeps_answer_ends():
    tok = tokenizer.load_tokenizer(None)
    pairs, _ = data.load_pairs("bundled")
    batch = data.preference_batch(tok, pairs[:4], buckets=(32, 64))
    assert batch["chosen_ids"].shape == batch["rejected_ids"].shape == (4, 64)
    # Chosen answers are longer than 64 tokens with their prompt: the prompt start is cut, the answer end kept.
    answer = data.tokenize_answer(tok, pairs[0].chosen)
    n = min(len(answer), 64)
    assert list(batch["chosen_ids"][0, -n:]) == answer[-n:]
    with_system = data.tokenize_prompt(tok, pairs[0].prompt, tokenizer.COARSE_SYSTEM_PROMPT)
    assert tok.decode(with_system, skip_special_tokens=True).startswith("Below is an instruction")


def test_iterator_is_deterministic_and_resumes_exactly():
    it = data.BatchIterator(size=10, batch_size=4, seed=3)
    first = [it.next() for _ in range(5)]  # crosses two epoch boundaries (tail of 2 dropped)
    assert all(len(b) == 4 and len(set(b)) == 4 for b in first)
    again = data.BatchIterator(size=10, batch_size=4, seed=3)
    again.next(), again.next()
    saved = again.state()
    resumed = data.BatchIterator(size=10, batch_size=4, seed=3)
    resumed.restore(json.loads(json.dumps(saved)))
    np.testing.assert_array_equal(np.stack([resumed.next() for _ in range(3)]), np.stack(first[2:]))
    assert not np.array_equal(first[0], data.BatchIterator(size=10, batch_size=4, seed=4).next())
