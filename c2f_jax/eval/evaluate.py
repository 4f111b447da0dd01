"""What a policy does: sample responses with the rollout engine and measure them.

Per model: mean reward-model score of its responses, mean length, EOS rate,
repetition (share of repeated 4-grams within a response), distinct-1/2 across
responses, perplexity of held-out chosen answers; benchmark accuracies come from
lm-eval (c2f_jax.eval.lm_eval, `c2f-evaluate --tasks`). The paper's picture: the Coarse Actor writes
long, analytic but repetitive text; merging it with the Instruct model keeps the
length and removes the repetition. c2f-evaluate and c2f-sweep print these.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from c2f_jax import data
from c2f_jax.model import export, hf, model, tokenizer
from c2f_jax.model.model import MistralConfig, Params
from c2f_jax.rl import reward, rollout
from c2f_jax.runtime import backend, distributed, workdir

PROMPT_BUCKETS = (64, 128, 256, 512, 1024)
SEQUENCE_BUCKETS = (128, 256, 512, 1024, 2048)
# The held-out split of a preference file that evaluation scores and scripts/sft.py does not train on.
# (The reward configs hold out their own eval_fraction; a coarse run samples every prompt of its file.)
EVAL_FRACTION, EVAL_SEED = 0.1, 0


class EvalError(ValueError):
    """A model, prompts file or setting the evaluation cannot use."""


# ----------------------------------------------------------------------------- inputs


@dataclasses.dataclass
class Loaded:
    """A model ready to run: config (compute dtype set), params on the default device, its tokenizer."""

    config: MistralConfig
    params: Params
    tokenizer: object
    path: str


def load_model(path: str | os.PathLike, dtype: str = "float32", step: int | None = None) -> Loaded:
    """An HF folder, or a training workdir (its actor, or its reward model for a reward run, at `step`)."""
    p = Path(path)
    if not p.is_dir():
        raise EvalError(f"{p}: not a model folder (no such directory)")
    if workdir.is_workdir(p):
        config, params, tok_dir = export.load_model(p, step)
        config = config.replace(compute_dtype=dtype)
        params = jax.tree.map(lambda a: jnp.asarray(a, config.param_dtype), params)
        return Loaded(config, params, tokenizer.load_tokenizer(tok_dir), str(p))
    if step is not None:
        raise EvalError(f"{p}: --step applies to training workdirs, this is an HF folder")
    config, params = hf.load_pretrained(p, compute_dtype=dtype)
    return Loaded(config, params, tokenizer.load_tokenizer(p), str(p))


def read_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts from a .txt file (one per line) or .jsonl (a 'prompt' field per line)."""
    path = Path(path)
    if not path.exists():
        raise EvalError(f"{path}: prompts file not found")
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if path.suffix != ".jsonl":
        prompts = lines
    else:
        prompts = []
        for n, line in enumerate(lines, 1):
            try:
                prompts.append(str(json.loads(line)["prompt"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise EvalError(f"{path}:{n}: expected a JSON object with a 'prompt' field") from None
    if not prompts:
        raise EvalError(f"{path}: no prompts")
    return prompts


def held_out_pairs(source: str = "bundled", limit: int | None = None) -> list[data.Pair]:
    """The held-out side of a preference file's deterministic EVAL_FRACTION / EVAL_SEED split."""
    pairs, _ = data.load_pairs(source)
    _, held_out = data.train_eval_split(pairs, EVAL_FRACTION, EVAL_SEED)
    return held_out[:limit] if limit else held_out


# ----------------------------------------------------------------------------- text metrics


def ngrams(tokens: Sequence, n: int) -> list[tuple]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def repetition(tokens: Sequence, n: int = 4) -> float:
    """Share of a response's n-grams that repeat an earlier n-gram of the same response (0 when it has none)."""
    grams = ngrams(tokens, n)
    return (len(grams) - len(set(grams))) / len(grams) if grams else 0.0


def distinct(responses: Sequence[Sequence], n: int) -> float:
    """Distinct-n over a set of responses: unique n-grams / all n-grams, pooled (0 when there are none)."""
    grams = [g for r in responses for g in ngrams(r, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def text_metrics(responses: Sequence[Sequence[int]], ended: Sequence[bool]) -> dict:
    """Length, EOS rate, repetition and distinct-n of token-id responses (EOS not counted in them)."""
    if not responses:
        raise EvalError("no responses to measure")
    return {
        "length": float(np.mean([len(r) for r in responses])),
        "eos_rate": float(np.mean([bool(e) for e in ended])),
        "repetition": float(np.mean([repetition(r, 4) for r in responses])),
        "distinct_1": distinct(responses, 1),
        "distinct_2": distinct(responses, 2),
    }


# ----------------------------------------------------------------------------- model passes


def _batches(items: Sequence, batch_size: int):
    """Fixed-size chunks; the last is filled with copies of its last item so every batch has one shape."""
    for start in range(0, len(items), batch_size):
        chunk = list(items[start : start + batch_size])
        yield chunk, chunk + [chunk[-1]] * (batch_size - len(chunk))


def sample_responses(
    m: Loaded,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    suppress_eos: bool = False,
    system_prompt: str | None = None,
    batch_size: int = 8,
    buckets: Sequence[int] = PROMPT_BUCKETS,
    truncate: bool = True,
    seed: int = 0,
) -> list[dict]:
    """Responses to HH-formatted prompts, batched and bucketed: one compilation per prompt bucket.

    Returns per prompt {"prompt", "response" (text), "tokens" (ids without EOS), "ended_with_eos"}.
    """
    config = rollout.rollout_layout(m.config, backend.of(jax.default_backend()))
    params = rollout.rollout_params(config, m.params)
    tok = m.tokenizer
    suppress = tokenizer.stop_token_ids(tok) if suppress_eos else ()
    token_lists = [tok(tokenizer.format_prompt(p, system_prompt)).input_ids for p in prompts]
    rng, out = jax.random.key(seed), []
    for chunk, padded in _batches(list(zip(prompts, token_lists)), batch_size):
        ids, mask = data.left_pad([t for _, t in padded], buckets, tok.pad_token_id, truncate=truncate)
        rng, key = jax.random.split(rng)
        gen = rollout.generate(
            config,
            params,
            ids,
            mask,
            key,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            suppress_token_ids=suppress,
            eos_token_ids=(tok.eos_token_id,),
            pad_id=tok.pad_token_id,
        )
        tokens, gen_mask = np.asarray(gen.tokens), np.asarray(gen.mask)
        for row, (prompt, _) in enumerate(chunk):
            kept = tokens[row][gen_mask[row] > 0].tolist()
            ended = bool(kept) and kept[-1] == tok.eos_token_id
            kept = kept[:-1] if ended else kept
            out.append(
                {
                    "prompt": prompt,
                    "response": tok.decode(kept, skip_special_tokens=True),
                    "tokens": kept,
                    "ended_with_eos": ended,
                }
            )
    return out


def reward_scores(
    rm: Loaded,
    prompts: Sequence[str],
    responses: Sequence[str],
    *,
    batch_size: int = 8,
    buckets: Sequence[int] = SEQUENCE_BUCKETS,
) -> np.ndarray:
    """Reward-model score of each (prompt, response) text, float64 [N], formatted as the reward model
    was trained (HH dialogue, answer after 'Assistant:'; the start of over-long prompts is cut)."""
    if rm.config.has_lm_head or rm.config.num_labels != 1:
        raise EvalError(
            f"{rm.path}: is a {rm.config.architecture}; the reward model must be a {model.SEQ_CLS} with one label"
        )
    tok = rm.tokenizer
    seqs = [
        data.tokenize_prompt(tok, tokenizer.format_prompt(p)) + data.tokenize_answer(tok, r)
        for p, r in zip(prompts, responses)
    ]
    scores = []
    for chunk, padded in _batches(seqs, batch_size):
        ids, mask = data.left_pad(padded, buckets, tok.pad_token_id, truncate=True)
        scores.extend(np.asarray(reward.score_sequences(rm.params, ids, mask, config=rm.config))[: len(chunk)].tolist())
    return np.asarray(scores, np.float64)


def score_packed(params, ids, positions, segments, targets, *, config) -> tuple[jax.Array, jax.Array]:
    """Log p(target) and whether it is the argmax, per scored position of packed rows.

    ids, positions, segments int32 [B, T]: each row a shared prefix (segment 0) followed by scored windows
    (segments 1, 2, ...; `model.attention_bias`), -1 on left padding; targets int32 [B, K]: the token each of
    the last K positions predicts, -1 where nothing is scored. The prefix (a question and its shots) is
    computed once for all its continuations (its choices), and the LM head runs on the last K positions only.
    Returns (float32 [B, K], 0 where unscored; bool [B, K], True where unscored).
    """
    mask = (segments >= 0).astype(jnp.int32)
    hidden = model.apply(config, params, ids, positions, positions, mask, head=False, segments=segments)[0]
    logits = jnp.einsum(
        "BKD,DV->BKV",
        hidden[:, -targets.shape[1] :],
        model.head_weight(config, params),
        preferred_element_type=jnp.float32,
    )
    scored = targets >= 0
    safe = jnp.where(scored, targets, 0)[..., None]
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), safe, -1)[..., 0]
    return jnp.where(scored, logp, 0.0), (jnp.argmax(logits, axis=-1) == safe[..., 0]) | ~scored


compiled_score_packed = jax.jit(score_packed, static_argnames=("config",))


def score_tokens(params, ids, mask, targets, *, config):
    """Sum of log p(target) over the scored positions and whether each was the argmax, per row.

    ids, mask int32 [B, T] (left-padded); targets int32 [B, K]: the tokens the last K positions predict, -1
    where nothing is scored (K a static bucket of the batch's longest continuation). The LM head runs on those
    K positions only: at the bench shape it is most of a forward pass, and a scored continuation is often a
    few tokens of a long context. Returns (float32 [B], bool [B]); no logits leave the program. Used by
    `perplexity`; the lm-eval model packs its requests (`score_packed`).
    """
    segments = jnp.where(mask > 0, 0, -1)  # one unpacked sequence per row: everything is the prefix segment
    logp, greedy = score_packed(params, ids, model.positions_from_mask(mask), segments, targets, config=config)
    return jnp.sum(logp, -1), jnp.all(greedy, -1)


compiled_score_tokens = jax.jit(score_tokens, static_argnames=("config",))


def perplexity(
    m: Loaded, pairs: Sequence[data.Pair], *, batch_size: int = 8, buckets: Sequence[int] = SEQUENCE_BUCKETS
) -> float:
    """exp(mean negative log-likelihood per token) of the chosen answers given their prompts."""
    tok = m.tokenizer
    rows = []
    for p in pairs:
        prompt, answer = data.tokenize_prompt(tok, p.prompt), data.tokenize_answer(tok, p.chosen)
        if not answer:
            continue
        rows.append((prompt, answer))
    if not rows:
        raise EvalError("no preference pair with a non-empty chosen answer")
    total, count = 0.0, 0
    for chunk, padded in _batches(rows, batch_size):
        ids, mask = data.left_pad(
            [prompt + answer for prompt, answer in padded], buckets, tok.pad_token_id, truncate=True
        )
        # Positions 0 .. T-2 predict tokens 1 .. T-1; the answers are the last tokens (truncation cuts prompts).
        targets = np.full((len(padded), ids.shape[1] - 1), -1, np.int32)
        for row, (_, answer) in enumerate(padded):
            n = min(len(answer), ids.shape[1] - 1)
            targets[row, -n:] = answer[-n:]
        logp, _ = compiled_score_tokens(m.params, ids[:, :-1], mask[:, :-1], targets, config=m.config)
        total += float(np.sum(np.asarray(logp)[: len(chunk)]))
        count += int(np.sum(targets[: len(chunk)] >= 0))
    return float(np.exp(-total / count))


# ----------------------------------------------------------------------------- one model, many models


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """How every model is evaluated (the same for all, so their numbers compare)."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    suppress_eos: bool = False
    system_prompt: str | None = None
    batch_size: int = 8
    seed: int = 0

    def __post_init__(self):
        rollout.SamplingConfig(self.temperature, self.top_k, self.top_p)  # its range checks, before any model loads


def evaluate_model(
    m: Loaded,
    prompts: Sequence[str],
    settings: EvalSettings,
    reward_model: Loaded | None = None,
    preference_pairs: Sequence[data.Pair] = (),
) -> dict:
    """{"metrics": {name: float}, "generations": [...]} for one policy."""
    if not m.config.has_lm_head:
        raise EvalError(f"{m.path}: is a {m.config.architecture}; a policy must be a {model.CAUSAL_LM}")
    s = settings
    gens = sample_responses(
        m,
        prompts,
        max_new_tokens=s.max_new_tokens,
        temperature=s.temperature,
        top_k=s.top_k,
        top_p=s.top_p,
        suppress_eos=s.suppress_eos,
        system_prompt=s.system_prompt,
        batch_size=s.batch_size,
        seed=s.seed,
    )
    metrics = {}
    if reward_model is not None:
        metrics["reward"] = float(
            np.mean(
                reward_scores(
                    reward_model, [g["prompt"] for g in gens], [g["response"] for g in gens], batch_size=s.batch_size
                )
            )
        )
    metrics.update(text_metrics([g["tokens"] for g in gens], [g["ended_with_eos"] for g in gens]))
    if preference_pairs:
        metrics["perplexity"] = perplexity(m, preference_pairs, batch_size=s.batch_size)
    return {
        "metrics": metrics,
        "generations": [{k: g[k] for k in ("prompt", "response", "ended_with_eos")} for g in gens],
    }


METRIC_NAMES = {
    "reward": "reward",
    "length": "length (tokens)",
    "eos_rate": "EOS rate",
    "repetition": "repetition (4-gram)",
    "distinct_1": "distinct-1",
    "distinct_2": "distinct-2",
    "perplexity": "perplexity (chosen)",
}


def markdown_table(rows: dict[str, dict], first: str = "model") -> str:
    """rows: label -> metrics. One Markdown table, metric columns in METRIC_NAMES order, then any others (lm-eval
    tasks) in the order they first appear."""
    keys = [k for k in METRIC_NAMES if any(k in m for m in rows.values())]
    keys += [k for k in dict.fromkeys(k for m in rows.values() for k in m) if k not in METRIC_NAMES]
    lines = [f"| {first} | " + " | ".join(METRIC_NAMES.get(k, k) for k in keys) + " |", "|---|" + "---|" * len(keys)]
    for label, m in rows.items():
        cells = [f"{m[k]:.3f}" if k in m else "" for k in keys]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(path: str | os.PathLike, obj, overwrite: bool = False) -> None:
    """Written to a temporary file and renamed into place (by process 0 of a multi-process job); an existing
    file is replaced only with `overwrite`."""
    path = Path(path)
    if distributed.writes_here():
        path.parent.mkdir(parents=True, exist_ok=True)
    workdir.write_text(path, json.dumps(obj, indent=1) + "\n", overwrite)
