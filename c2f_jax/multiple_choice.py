"""Multiple-choice evaluation by log-likelihood (MMLU / ARC / HellaSwag style), with k-shot prompts.

Each choice is scored as the summed log-probability of its tokens given the
prompt (k solved examples, then the query), using our own forward pass. `acc`
picks the choice with the highest sum; `acc_norm` the highest sum per character
of the choice, as lm-evaluation-harness does, so long choices are not punished
for having more tokens.

Prompts: styles "mmlu" and "arc" ask "Question: ...\\nAnswer:" and score
" " + choice text; "hellaswag" uses the context itself and scores each ending as
its continuation. Solved examples are separated by blank lines.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import re
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from c2f_jax import data, model
from c2f_jax.model import MistralConfig, Params

STYLES = ("mmlu", "arc", "hellaswag")
BUCKETS = (64, 128, 256, 512, 1024, 2048)
BUNDLED = "bundled"
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")
SHOT_SEPARATOR = "\n\n"


class MCError(ValueError):
    """A multiple-choice file, row or request we cannot use; the message names the file, row or key."""


@dataclasses.dataclass(frozen=True)
class Item:
    query: str  # question / context text
    choices: tuple[str, ...]
    answer: int  # index of the correct choice


def bundled_path() -> Path:
    """Our own small 4-choice set shipped in the package ({"query", "choices", "answer"} rows)."""
    return Path(__file__).parent / "data" / "mc_sample.jsonl"


# ----------------------------------------------------------------------------- parsing rows


def _text(row: dict, key: str) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        raise MCError(f"{key!r} is {value!r}, not a non-empty string")
    return value


def _choices(value, key: str) -> tuple[str, ...]:
    # Empty choices would score no tokens and divide by zero characters in acc_norm.
    if not isinstance(value, (list, tuple)) or len(value) < 2:
        raise MCError(f"{key!r} is {value!r}, not a list of at least 2 choices")
    for c in value:
        if not isinstance(c, str) or not c.strip():
            raise MCError(f"{key!r} holds {c!r}, not a non-empty string")
    return tuple(value)


def _answer(value, key: str, n: int, labels: Sequence[str] | None = None) -> int:
    """A 0-based index from an int, a label (when the row names its labels), a digit string or a letter A, B, ..."""
    text = value.strip() if isinstance(value, str) else None
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        index = int(value)
    elif labels is not None:
        if text not in labels:
            raise MCError(f"{key!r}={value!r} is not one of the labels {list(labels)}")
        index = list(labels).index(text)
    elif text and text.isdigit():
        index = int(text)  # HellaSwag's "0".."3"; 1-based digit labels (ARC) come with their label list
    elif text and len(text) == 1 and "A" <= text <= "Z":
        index = ord(text) - ord("A")
    else:
        raise MCError(f"{key!r}={value!r} is not a choice index or letter")
    if not 0 <= index < n:
        raise MCError(f"{key!r}={value!r} is out of range for {n} choices")
    return index


def _clean_hellaswag(text: str) -> str:
    # WikiHow contexts carry markup such as "[title]" and "[step]"; a title tag ends a sentence.
    text = re.sub(r"\[.*?\]", "", text.strip().replace(" [title]", ". "))
    return re.sub(r" {2,}", " ", text).strip()


def parse_row(row) -> Item:
    """One row in any supported layout -> Item; MCError (naming the key) when it does not parse.

    Layouts: ours {"query", "choices", "answer"}; MMLU {"question", "choices": [...], "answer": int or "A".."D"};
    ARC {"question", "choices": {"text": [...], "label": [...]}, "answerKey"}; HellaSwag {"ctx" or "ctx_a" +
    "ctx_b", "endings": [...], "label": int or "0"..}.
    """
    if not isinstance(row, dict):
        raise MCError(f"expected an object, got {type(row).__name__}")
    if "endings" in row:  # HellaSwag
        query = _text(row, "ctx") if "ctx" in row else _text(row, "ctx_a") + " " + _text(row, "ctx_b")
        choices = _choices([_clean_hellaswag(c) for c in _choices(row.get("endings"), "endings")], "endings")
        return Item(_clean_hellaswag(query), choices, _answer(row.get("label"), "label", len(choices)))
    if "query" in row:  # ours
        choices = _choices(row.get("choices"), "choices")
        return Item(_text(row, "query"), choices, _answer(row.get("answer"), "answer", len(choices)))
    if "question" in row:
        raw = row.get("choices")
        if isinstance(raw, dict):  # ARC
            choices, labels = _choices(raw.get("text"), "choices.text"), raw.get("label")
            if not isinstance(labels, (list, tuple)) or len(labels) != len(choices):
                raise MCError(f"'choices.label' is {labels!r}, not {len(choices)} labels")
            return Item(_text(row, "question"), choices,
                        _answer(row.get("answerKey"), "answerKey", len(choices), [str(x) for x in labels]))
        choices = _choices(raw, "choices")  # MMLU
        return Item(_text(row, "question"), choices, _answer(row.get("answer"), "answer", len(choices)))
    raise MCError(f"no 'query', 'question' or 'endings' key; found {sorted(row)}")


# ----------------------------------------------------------------------------- loading


def _numbered_rows(source: str, split: str):
    """(where, iterable of (1-based row number, row)); for .jsonl the row number is the line number."""
    path = bundled_path() if source == BUNDLED else Path(source)
    if path.suffix in LOCAL_SUFFIXES or path.exists():
        if not path.exists():
            raise MCError(f"{path}: file not found")
        if path.suffix == ".jsonl":
            return str(path), _jsonl_rows(path)
        if path.suffix == ".json":
            try:
                rows = json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise MCError(f"{path}: cannot read JSON ({str(e).splitlines()[0][:200]})") from None
            if not isinstance(rows, list):
                raise MCError(f"{path}: expected a JSON list of rows, got {type(rows).__name__}")
            return str(path), enumerate(rows, 1)
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            try:
                rows = pq.read_table(path).to_pylist()
            except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError, ArrowIOError an OSError
                raise MCError(f"{path}: cannot read ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
            return str(path), enumerate(rows, 1)
        raise MCError(f"{path}: expected a .jsonl, .json or .parquet file")
    return source, enumerate(_hub_rows(source, split), 1)


def _jsonl_rows(path: Path):
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                raise MCError(f"{path} row {n}: not JSON ({e.msg})") from None


def _hub_rows(source: str, split: str):
    """A `datasets` hub name, optionally "name:config" (e.g. "cais/mmlu:all", "allenai/ai2_arc:ARC-Easy")."""
    import datasets

    name, _, config = source.partition(":")
    try:
        return datasets.load_dataset(name, config or None, split=split)
    except (OSError, ValueError) as e:  # not found and connection errors are OSErrors, a bad config a ValueError
        first = (str(e).splitlines() or [""])[0][:200]
        raise MCError(f"dataset {name!r} (config={config or None!r}, split={split!r}) cannot be loaded: "
                      f"{type(e).__name__}: {first}") from None


def load_items(source: str, split: str = "test", limit: int | None = None) -> list[Item]:
    """Items from "bundled", a local .jsonl/.json/.parquet file, or a hub name ("name" or "name:config").

    split applies to hub datasets only; limit keeps the first `limit` items. Any row
    that does not parse is an MCError naming the file and row number.
    """
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise MCError(f"limit={limit!r}; expected a positive int or None")
    where, rows = _numbered_rows(source, split)
    items = []
    for n, row in rows:
        if limit is not None and len(items) >= limit:
            break
        try:
            items.append(parse_row(row))
        except MCError as e:
            raise MCError(f"{where} row {n}: {e}") from None
    if not items:
        raise MCError(f"{where}: no rows")
    return items


# ----------------------------------------------------------------------------- prompts


def _check_style(style: str) -> None:
    if style not in STYLES:
        raise MCError(f"style={style!r}; expected one of {STYLES}")


def format_query(item: Item, style: str) -> str:
    """The prompt for one item, ending right before the choice (which is scored as " " + choice)."""
    _check_style(style)
    if style == "hellaswag":
        return item.query.strip()
    return f"Question: {item.query.strip()}\nAnswer:"


def continuation(choice: str) -> str:
    """The text scored for a choice: it follows the prompt after one space."""
    return " " + choice


def few_shot_prefix(shots: Sequence[Item], style: str) -> str:
    """k solved examples (prompt + correct choice), each followed by a blank line; "" for no shots."""
    _check_style(style)
    return "".join(format_query(s, style) + continuation(s.choices[s.answer]) + SHOT_SEPARATOR for s in shots)


def pick_shots(item: Item, pool: Sequence[Item], k: int) -> list[Item]:
    """The first k items of the pool that are not the item itself (nor an identical copy of it)."""
    shots = list(itertools.islice((s for s in pool if s != item), k))  # stops early: pools can be large
    if len(shots) < k:
        raise MCError(f"shots={k} but the shot pool has only {len(shots)} items other than the one scored")
    return shots


def contexts(items: Sequence[Item], style: str, shots: int = 0, shot_pool: Sequence[Item] | None = None) -> list[str]:
    """Per item, the full text before its choices: k-shot prefix + query (shot pool defaults to the items)."""
    if not isinstance(shots, int) or shots < 0:
        raise MCError(f"shots={shots!r}; expected an int >= 0")
    pool = items if shot_pool is None else shot_pool
    return [few_shot_prefix(pick_shots(it, pool, shots) if shots else [], style) + format_query(it, style)
            for it in items]


# ----------------------------------------------------------------------------- scoring


@functools.partial(jax.jit, static_argnames=("config",))
def continuation_logprob(params: Params, ids, mask, target_mask, *, config: MistralConfig) -> jax.Array:
    """Summed log p of the tokens marked in target_mask, float32 [B].

    ids, mask, target_mask int32 [B, T], left-padded; token t is scored from the
    logits at t-1, so target_mask[:, 0] must be 0.
    """
    logits = model.forward(config, params, ids, mask)[:, :-1]  # [B, T-1, V]
    targets = ids[:, 1:]
    # The gather minus logsumexp fuses; a full log_softmax would materialize a second [B, T-1, V].
    token_lp = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0] - jax.nn.logsumexp(logits, axis=-1)
    return jnp.sum(token_lp * target_mask[:, 1:], axis=-1)


def request_tokens(tokenizer, contexts_: Sequence[str], items: Sequence[Item],
                   max_len: int) -> list[tuple[list[int], int]]:
    """Per (item, choice), in order: (context + continuation token ids, number of continuation tokens).

    Context and continuation are tokenized separately (context with BOS, continuation
    without), so the scored tokens are exactly the continuation's. A row over max_len
    loses tokens from the start of the context (the BOS and the oldest shots first);
    the continuation is always kept whole.
    """
    ctx_ids = tokenizer(list(contexts_)).input_ids
    texts = [continuation(c) for it in items for c in it.choices]
    cont_ids = iter(tokenizer(texts, add_special_tokens=False).input_ids)
    rows = []
    for i, (item, ctx) in enumerate(zip(items, ctx_ids)):
        for j in range(len(item.choices)):
            cont = next(cont_ids)
            if not cont:
                raise MCError(f"item {i} choice {j}: {item.choices[j]!r} tokenizes to nothing")
            if len(cont) >= max_len:
                raise MCError(f"item {i} choice {j}: {len(cont)} tokens leave no room for context in the largest "
                              f"bucket ({max_len})")
            keep = min(len(ctx), max_len - len(cont))
            rows.append((list(ctx[len(ctx) - keep:]) + list(cont), len(cont)))
    return rows


def _batch(rows: Sequence[tuple[list[int], int]], batch_size: int, buckets: Sequence[int], pad_id: int):
    """int32 ids, mask, target_mask [batch_size, bucket]; missing rows are filler (one token, nothing scored)."""
    rows = list(rows) + [([pad_id], 0)] * (batch_size - len(rows))
    ids, mask = data.left_pad([r[0] for r in rows], buckets, pad_id)
    target = np.zeros_like(mask)
    for b, (_, n) in enumerate(rows):
        if n:  # the continuation is the tail of its left-padded row
            target[b, -n:] = 1
    return ids, mask, target


def choice_logprobs(config: MistralConfig, params: Params, tokenizer, items: Sequence[Item], *, shots: int = 0,
                    shot_pool: Sequence[Item] | None = None, style: str = "arc", batch_size: int = 8,
                    buckets: Sequence[int] = BUCKETS) -> list[np.ndarray]:
    """Per item, float64 [num_choices]: summed log p of each choice's tokens after k-shot prefix + query.

    Every (item, choice) row is one sequence; rows are sorted by length (longest
    first) and cut into batches of batch_size, each left-padded to its smallest
    bucket, the last padded with filler rows: one compiled program per
    (batch_size, bucket). Rows over the largest bucket lose context from the left.
    """
    if not items:
        raise MCError("no items to score")
    if batch_size < 1:
        raise MCError(f"batch_size={batch_size}; expected >= 1")
    rows = request_tokens(tokenizer, contexts(items, style, shots, shot_pool), items, max(buckets))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    order = sorted(range(len(rows)), key=lambda r: -len(rows[r][0]))
    pending = []
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        ids, mask, target = _batch([rows[r] for r in idx], batch_size, buckets, pad_id)
        # Left on device until every batch is dispatched, so host-side padding overlaps device work.
        pending.append((idx, continuation_logprob(params, ids, mask, target, config=config)))
    flat = np.zeros(len(rows), np.float64)
    for idx, lp in pending:
        flat[idx] = np.asarray(lp, np.float64)[: len(idx)]
    bounds = np.cumsum([len(it.choices) for it in items])[:-1]
    return np.split(flat, bounds)


def metrics(items: Sequence[Item], logprobs: Sequence[np.ndarray]) -> dict:
    """{"acc", "acc_norm", "n"}: argmax of summed log p, and of log p per character of the choice text."""
    hits = [int(np.argmax(lp)) == it.answer for it, lp in zip(items, logprobs)]
    hits_norm = [int(np.argmax(lp / np.array([len(c) for c in it.choices], np.float64))) == it.answer
                 for it, lp in zip(items, logprobs)]
    return {"acc": float(np.mean(hits)), "acc_norm": float(np.mean(hits_norm)), "n": len(items)}


def score(config: MistralConfig, params: Params, tokenizer, items: Sequence[Item], *, shots: int = 0,
          shot_pool: Sequence[Item] | None = None, style: str = "arc", batch_size: int = 8,
          buckets: Sequence[int] = BUCKETS) -> dict:
    """{"acc": float, "acc_norm": float, "n": int} over the items (see choice_logprobs and metrics)."""
    lps = choice_logprobs(config, params, tokenizer, items, shots=shots, shot_pool=shot_pool, style=style,
                          batch_size=batch_size, buckets=buckets)
    return metrics(items, lps)
