"""Anthropic HH-RLHF preference pairs: loading, parsing, tokenizing, bucketing, a resumable iterator.

A row holds two transcripts, `chosen` and `rejected`, of the form
"\\n\\nHuman: ...\\n\\nAssistant: ...", identical up to the final answer. We split
each into the prompt (every turn up to and including the last "Assistant:") and
the answer. Rows that do not parse are skipped and counted, never fatal.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Sequence

import numpy as np

HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
# The paper strips these from RLHF targets: the Coarse Actor must never learn to stop.
STOP_STRINGS = ("</s>", "<s>", "<|endoftext|>", "<|im_end|>", "<|eot_id|>")
BUNDLED = "bundled"
LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


class DataError(ValueError):
    """A dataset or batch we cannot use; the message names the file or column."""


@dataclasses.dataclass(frozen=True)
class Pair:
    prompt: str  # ends with "Assistant:"
    chosen: str
    rejected: str


def bundled_path() -> Path:
    """Our own small HH-format preference set shipped in the package (see scripts/make_sample_data.py)."""
    return Path(__file__).parent / "data" / "hh_sample.jsonl"


def strip_stop_strings(text: str) -> str:
    for s in STOP_STRINGS:
        text = text.replace(s, "")
    return text


def split_transcript(text: str) -> tuple[str, str] | None:
    """(prompt up to the last 'Assistant:', stripped answer) or None if the text is not an HH dialogue."""
    if not isinstance(text, str):
        return None
    cut = text.rfind(ASSISTANT)
    if cut < 0 or HUMAN not in text[:cut]:
        return None
    answer = strip_stop_strings(text[cut + len(ASSISTANT) :]).strip()
    return text[: cut + len(ASSISTANT)], answer


def parse_row(row: dict) -> Pair | None:
    """A Pair, or None when either side fails to parse, the prompts differ, or an answer is empty."""
    chosen, rejected = split_transcript(row.get("chosen")), split_transcript(row.get("rejected"))
    if chosen is None or rejected is None or chosen[0] != rejected[0] or not chosen[1] or not rejected[1]:
        return None
    return Pair(chosen[0], chosen[1], rejected[1])


def _first_line(e: BaseException) -> str:
    """The most telling line of a `datasets` error: its cause's (the parser's), else its own."""
    inner = e.__cause__ or e
    text = str(inner).strip() or str(e).strip()
    return f"{type(inner).__name__}: {text.splitlines()[0][:200]}" if text else type(inner).__name__


@contextlib.contextmanager
def _quiet_datasets():
    """No progress bars or ERROR logging from `datasets` for a local file: a failure is our one line."""
    import datasets

    verbosity, bars = datasets.logging.get_verbosity(), datasets.is_progress_bar_enabled()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL + 1)
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        if bars:
            datasets.enable_progress_bars()


def _read_rows(source: str, data_dir: str | None, split: str):
    import datasets

    path = Path(source)
    if source == BUNDLED:
        path = bundled_path()
    if path.suffix in LOCAL_SUFFIXES or path.exists():
        if not path.exists():
            raise DataError(f"{path}: dataset file not found")
        if path.suffix not in LOCAL_SUFFIXES or not path.is_file():
            raise DataError(f"{path}: expected a .jsonl, .json or .parquet file")
        if path.stat().st_size == 0:
            raise DataError(f"{path}: the file is empty")
        try:
            with _quiet_datasets():
                ds = datasets.load_dataset(LOCAL_SUFFIXES[path.suffix], data_files=str(path), split="train")
        except Exception as e:  # datasets raises many types for a malformed file
            raise DataError(f"{path}: cannot read ({_first_line(e)})") from None
        where = str(path)
    else:
        try:
            ds = datasets.load_dataset(source, data_dir=data_dir, split=split)
        except Exception as e:
            raise DataError(
                f"dataset {source!r} (data_dir={data_dir!r}, split={split!r}) cannot be loaded: {_first_line(e)}"
            ) from None
        where = source
    missing = {"chosen", "rejected"} - set(ds.column_names)
    if missing:
        raise DataError(f"{where}: no {sorted(missing)} column(s); found {ds.column_names}")
    return ds


def load_pairs(source: str, data_dir: str | None = None, split: str = "train") -> tuple[list[Pair], int]:
    """Parsed pairs and the number of rows skipped.

    source: "bundled", a local .jsonl/.json/.parquet file, or a hub name such as
    "Anthropic/hh-rlhf" (with data_dir such as "helpful-base").
    """
    pairs, skipped = [], 0
    for row in _read_rows(source, data_dir, split):
        pair = parse_row(row)
        if pair is None:
            skipped += 1
        else:
            pairs.append(pair)
    if not pairs:
        raise DataError(f"{source}: no row parsed as an HH dialogue ({skipped} skipped)")
    return pairs, skipped


def train_eval_split(pairs: Sequence[Pair], eval_fraction: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """A deterministic shuffled split; at least one pair on each side."""
    order = np.random.default_rng(seed).permutation(len(pairs))
    n_eval = min(max(1, int(round(len(pairs) * eval_fraction))), len(pairs) - 1)
    return [pairs[i] for i in order[n_eval:]], [pairs[i] for i in order[:n_eval]]


# ----------------------------------------------------------------------------- tokens and buckets


def prompt_text(prompt: str, system_prompt: str | None) -> str:
    """The text the actor sees: the system prompt (if any) right before the HH dialogue."""
    return system_prompt.strip() + prompt if system_prompt else prompt.lstrip()


def tokenize_prompt(tokenizer, prompt: str, system_prompt: str | None = None) -> list[int]:
    """BOS + tokens of the (system prompt +) dialogue ending in 'Assistant:'."""
    return tokenizer(prompt_text(prompt, system_prompt)).input_ids


def tokenize_answer(tokenizer, answer: str) -> list[int]:
    """Answer tokens, no BOS/EOS (the leading space is the one that follows 'Assistant:')."""
    return tokenizer(" " + answer, add_special_tokens=False).input_ids


def pick_bucket(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= length; a length over the largest bucket is an error, never a new shape."""
    for b in sorted(buckets):
        if length <= b:
            return b
    raise DataError(f"sequence of {length} tokens is longer than the largest bucket {max(buckets)}")


def check_lengths(token_lists: Sequence[Sequence[int]], buckets: Sequence[int], source: str, remedy: str) -> None:
    """A DataError saying how many rows of `source` are longer than the largest bucket (`remedy`: what to do)."""
    lengths = [len(t) for t in token_lists if len(t) > max(buckets)]
    if lengths:
        raise DataError(
            f"{source}: {len(lengths)} of {len(token_lists)} prompts are longer than the largest "
            f"bucket {max(buckets)} (up to {max(lengths)} tokens); raise {remedy}"
        )


def left_pad(
    token_lists: Sequence[Sequence[int]], buckets: Sequence[int], pad_id: int = 0, truncate: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Left-pads to the smallest bucket holding the longest row: int32 ids [B, P], mask [B, P].

    truncate=True keeps the last tokens of rows longer than the largest bucket
    (the end of a dialogue is what the answer depends on); otherwise that is an error.
    """
    if not len(token_lists) or any(len(t) == 0 for t in token_lists):
        raise DataError("every row needs at least one token")
    longest = max(len(t) for t in token_lists)
    if truncate:
        longest = min(longest, max(buckets))
    width = pick_bucket(longest, buckets)
    ids = np.full((len(token_lists), width), pad_id, np.int32)
    mask = np.zeros((len(token_lists), width), np.int32)
    for row, toks in enumerate(token_lists):
        toks = list(toks)[-width:]
        ids[row, width - len(toks) :] = toks
        mask[row, width - len(toks) :] = 1
    return ids, mask


def preference_batch(tokenizer, pairs: Sequence[Pair], buckets: Sequence[int], system_prompt: str | None = None):
    """Reward-model batch: chosen and rejected sequences left-padded to one shared bucket.

    Returns dict of int32 arrays chosen_ids, chosen_mask, rejected_ids, rejected_mask [B, T].
    Over-long sequences lose tokens from the start of the prompt, never the answer's end.
    """
    chosen, rejected = [], []
    for p in pairs:
        prompt = tokenize_prompt(tokenizer, p.prompt, system_prompt)
        chosen.append(prompt + tokenize_answer(tokenizer, p.chosen))
        rejected.append(prompt + tokenize_answer(tokenizer, p.rejected))
    ids, mask = left_pad(chosen + rejected, buckets, tokenizer.pad_token_id, truncate=True)
    n = len(pairs)
    return {"chosen_ids": ids[:n], "chosen_mask": mask[:n], "rejected_ids": ids[n:], "rejected_mask": mask[n:]}


# ----------------------------------------------------------------------------- iteration


@dataclasses.dataclass
class BatchIterator:
    """Deterministic shuffled batches of indices into a dataset of `size` items, resumable.

    Each epoch is a fresh permutation seeded by (seed, epoch); a short tail is
    dropped so every batch has the same static shape. `state()` / `restore()`
    save and restore the position exactly.
    """

    size: int
    batch_size: int
    seed: int
    epoch: int = 0
    index: int = 0

    def __post_init__(self):
        if self.batch_size > self.size:
            raise DataError(f"batch size {self.batch_size} is larger than the dataset ({self.size} items)")

    def _order(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.size)

    def next(self) -> np.ndarray:
        if self.index + self.batch_size > self.size:
            self.epoch, self.index = self.epoch + 1, 0
        batch = self._order()[self.index : self.index + self.batch_size]
        self.index += self.batch_size
        return batch

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def restore(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
