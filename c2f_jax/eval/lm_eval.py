"""lm-evaluation-harness on our compiled model: the lm-eval model `c2f-jax`, and lm-eval's own CLI with it registered (c2f-lm-eval).

  c2f-lm-eval --model c2f-jax --model_args pretrained=runs/demo-hf,dtype=float32 --tasks arc_easy
  c2f-lm-eval --model c2f-jax --model_args pretrained=runs/demo,step=48 ...      # a training workdir
  c2f-lm-eval --model c2f-jax --model_args coarse=runs/demo,sft=runs/sft,gamma=0.7 ...  # merged in memory

`import c2f_jax.eval.lm_eval` registers the model, so `lm_eval.simple_evaluate(model="c2f-jax", ...)` works too.

Requests are split into context and continuation, with BOS, by lm-eval's own `TemplateLM` (what its `hf` backend
uses), so the numbers compare with everyone's. Scoring runs one compiled forward pass per (batch, length bucket);
generation runs the compiled rollout (early stop at EOS) per (batch, prompt bucket, max_gen_toks, sampling).
Lengths come from the buckets, never from a request, so a task compiles a handful of programs, not one per
request. Model args:

  pretrained=DIR       an HF folder, or a training workdir (its actor; step=N, default the latest)
  coarse=, sft=, gamma=  theta = gamma * coarse + (1 - gamma) * sft, merged in memory (merge.merge_params, as
                       tools/merge.py computes it); config and tokenizer are the SFT model's, as merge.py writes them
  dtype=float32        params and compute dtype
  mesh=DxFxT           the ('data', 'fsdp', 'tensor') mesh, e.g. 1x8x1 for a 7B model over 8 devices (default 1x1x1)
  max_length=N         context length (default the model's max_position_embeddings, as the hf backend)
  add_bos_token=BOOL   as the hf backend's (default: the tokenizer's own setting)
  seed=N               the sampling seed for do_sample=True requests
"""

from __future__ import annotations

import functools
import json
import math
from functools import partial
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

try:
    from lm_eval import utils as lm_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
except ImportError:  # the eval extra is optional
    raise ImportError("lm-eval is not installed: pip install 'c2f-jax[eval]' (lm-eval==0.4.13)") from None

from c2f_jax.eval import evaluate
from c2f_jax.merge import merge
from c2f_jax.model import sharding
from c2f_jax.model.config import float_dtype
from c2f_jax.rl import rollout
from c2f_jax.runtime import backend

# The paper's Table 3 (Mistral-C2F, arXiv 2406.08657): its 11 benchmarks as lm-eval tasks, with the shot counts it
# states (MMLU 5, BBH 3, RACE 1, GSM8K 8); the others are zero-shot. AGIEval and AGIEval-ZH are lm-eval's agieval_en
# and agieval_cn groups; RACE-H is lm-eval's race, RACE-M our race_m (TASKS_DIR).
PAPER_TASKS = (
    ("mmlu", 5),
    ("agieval_en", 0),
    ("bbh_fewshot", 3),
    ("agieval_cn", 0),
    ("arc_easy", 0),
    ("arc_challenge", 0),
    ("hellaswag", 0),
    ("winogrande", 0),
    ("race_m", 1),
    ("race", 1),
    ("gsm8k", 8),
)
TASKS_DIR = Path(__file__).resolve().parent.parent / "data" / "lm_eval_tasks"
# A task's headline number: the first of these its results hold.
MAIN_METRICS = (
    "acc,none",
    "exact_match,strict-match",
    "exact_match,none",
    "acc_norm,none",
    "bits_per_byte,none",
    "word_perplexity,none",
)
# Generation settings we run; anything else in a task's generation_kwargs is refused, naming the key.
GENERATION_KEYS = ("do_sample", "temperature", "top_k", "top_p")
MIN_BUCKET = 32


class LMEvalError(ValueError):
    """A model argument or request the c2f-jax backend cannot run."""


def length_buckets(max_length: int) -> list[int]:
    """Static sequence lengths: MIN_BUCKET x 2^k and 1.5 x that, up to max_length, and max_length itself.

    Half steps: with powers of two alone a batch pads up to twice its longest row (the hf backend pads to
    exactly its longest), with them at most 1.5 times; each bucket compiles once, about 2 log2(max_length)."""
    buckets, b = [], MIN_BUCKET
    while b < max_length:
        buckets += [x for x in (b, b * 3 // 2) if x < max_length]
        b *= 2
    return buckets + [max_length]


def _bucket(length: int, buckets: list[int]) -> int:
    return next(b for b in buckets if b >= length)


def pack_windows(windows, capacity: int) -> list[tuple[tuple, list]]:
    """Rows [(prefix, [(input, continuation), ...])] of at most `capacity` tokens each.

    A window's prefix is its input less the len(continuation) positions that predict the continuation;
    windows with one prefix (the choices of a question; for rolling documents, the empty prefix) fill rows
    first-fit, longest first, so the prefix is computed once per row. Every window fits a row of its own
    (len(input) <= capacity)."""
    groups: dict = {}
    for inp, cont in sorted(windows, key=lambda w: (-len(w[1]), w)):
        groups.setdefault(inp[: len(inp) - len(cont)], []).append((inp, cont))
    rows = []
    for prefix, members in groups.items():
        mine: list = []  # [tokens used, windows]
        for window in members:
            row = next((r for r in mine if r[0] + len(window[1]) <= capacity), None)
            if row is None:
                row = [len(prefix), []]
                mine.append(row)
            row[0] += len(window[1])
            row[1].append(window)
        rows += [(prefix, ws) for _, ws in mine]
    return rows


def _row_length(row) -> int:
    return len(row[0]) + sum(len(cont) for _, cont in row[1])


def _packed_arrays(rows, T: int, K: int) -> tuple[tuple, list]:
    """(ids, positions, segments, targets) for `evaluate.score_packed`, rows right-aligned in T columns, and
    (row, first column in targets, window) per window in row order."""
    ids, positions = np.zeros((len(rows), T), np.int32), np.zeros((len(rows), T), np.int32)
    segments, targets = np.full((len(rows), T), -1, np.int32), np.full((len(rows), K), -1, np.int32)
    spans = []
    for r, (prefix, windows) in enumerate(rows):
        col = T - _row_length((prefix, windows))
        ids[r, col : col + len(prefix)], positions[r, col : col + len(prefix)] = prefix, np.arange(len(prefix))
        segments[r, col : col + len(prefix)] = 0
        col += len(prefix)
        for j, (inp, cont) in enumerate(windows, start=1):
            n = len(cont)
            ids[r, col : col + n], segments[r, col : col + n] = inp[len(inp) - n :], j
            positions[r, col : col + n] = np.arange(len(prefix), len(prefix) + n)
            targets[r, col - (T - K) : col - (T - K) + n] = cont
            spans.append((r, col - (T - K), (inp, cont)))
            col += n
    return (ids, positions, segments, targets), spans


def _mesh_shape(text: str) -> dict:
    try:
        data, fsdp, tensor = (int(x) for x in str(text).lower().split("x"))
    except ValueError:
        raise LMEvalError(f"mesh={text!r}: expected DATAxFSDPxTENSOR, e.g. 1x8x1") from None
    return {"data": data, "fsdp": fsdp, "tensor": tensor}


MODEL_ARGS = (
    "pretrained",
    "step",
    "coarse",
    "sft",
    "gamma",
    "dtype",
    "mesh",
    "max_length",
    "add_bos_token",
    "seed",
    "batch_size",
    "max_batch_size",
    "device",
)


def _number(args: dict, key: str, kind, low, high=None):
    """args[key] as `kind`, checked to lie in [low, high]; None when absent."""
    value = args.get(key)
    if value is None:
        return None
    try:
        number = kind(value)
    except (TypeError, ValueError):
        number = None
    if (
        number is None
        or (kind is float and not math.isfinite(number))
        or number < low
        or (high is not None and number > high)
    ):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise LMEvalError(f"model_args: {key}={value!r} must be {'an integer' if kind is int else 'a number'} {bound}")
    return number


def _model_folder(key: str, path, step) -> None:
    """An HF folder or a training workdir (with checkpoint `step`, when given), checked without loading it."""
    from c2f_jax.runtime import workdir

    p = Path(str(path))
    if not p.is_dir():
        raise LMEvalError(f"model_args: {key}={path}: no such folder")
    if workdir.is_workdir(p):
        steps = sorted(int(c.name) for c in (p / workdir.CHECKPOINTS).glob("*") if c.name.isdigit())
        if not steps:
            raise LMEvalError(f"model_args: {key}={path}: the training workdir holds no checkpoint")
        if step is not None and step not in steps:
            raise LMEvalError(f"model_args: step={step}: {path} has no checkpoint at that step (it has {steps})")
    elif step is not None:
        raise LMEvalError(f"model_args: step= applies to a training workdir; {key}={path} is an HF folder")
    elif not (p / "config.json").is_file():
        raise LMEvalError(f"model_args: {key}={path}: not an HF model folder (no config.json) nor a workdir")


def check_model_args(args: dict) -> None:
    """The c2f-jax model's arguments (module docstring), checked before any model loads: names, sources, ranges,
    and a mesh no larger than the devices."""
    unknown = sorted(k for k in args if k not in MODEL_ARGS)
    if unknown:
        raise LMEvalError(f"model_args: unknown {unknown[0]!r} (known: {', '.join(MODEL_ARGS[:10])})")
    step = _number(args, "step", int, 0)
    sources = [k for k in ("coarse", "sft", "gamma") if args.get(k) is not None]
    if args.get("pretrained") is not None:
        if sources:
            raise LMEvalError("model_args: give pretrained=, or coarse=, sft= and gamma=, not both")
        _model_folder("pretrained", args["pretrained"], step)
    elif len(sources) < 3:
        missing = [k for k in ("coarse", "sft", "gamma") if k not in sources]
        raise LMEvalError(
            f"model_args: pretrained=DIR, or coarse=DIR,sft=DIR,gamma=G, is required (missing {', '.join(missing)})"
        )
    else:
        _number(args, "gamma", float, 0.0, 1.0)
        _model_folder("coarse", args["coarse"], step)
        _model_folder("sft", args["sft"], None)
    float_dtype(str(args.get("dtype") or "float32"), "model_args: dtype")
    _number(args, "max_length", int, 1)
    _number(args, "seed", int, 0)
    if not str(args.get("batch_size", 8)).startswith("auto"):
        _number(args, "batch_size", int, 1)
    shape = _mesh_shape(args.get("mesh") or "1x1x1")
    size = math.prod(shape.values())
    if min(shape.values()) < 1 or size > jax.device_count():
        raise LMEvalError(f"model_args: mesh={args.get('mesh')}: {size} devices asked, {jax.device_count()} present")


@register_model("c2f-jax")
class C2FJaxLM(TemplateLM):
    """An lm-eval model on c2f-jax's compiled forward pass and rollout (see the module docstring)."""

    def __init__(
        self,
        pretrained: str | None = None,
        step: int | None = None,
        coarse: str | None = None,
        sft: str | None = None,
        gamma: float | None = None,
        dtype: str = "float32",
        mesh: str = "1x1x1",
        max_length: int | None = None,
        add_bos_token: bool | None = None,
        seed: int = 0,
        batch_size: int | str = 8,
        max_batch_size: int | None = None,
        device: str | None = None,
        **unknown,
    ):
        super().__init__()
        check_model_args(
            dict(
                pretrained=pretrained,
                step=step,
                coarse=coarse,
                sft=sft,
                gamma=gamma,
                dtype=dtype,
                mesh=mesh,
                max_length=max_length,
                seed=seed,
                batch_size=batch_size,
                **unknown,
            )
        )
        dtype = float_dtype(dtype, "dtype").name
        self._setup(
            *self._load(pretrained, step, coarse, sft, gamma, dtype),
            mesh=mesh,
            batch_size=batch_size,
            max_length=max_length,
            add_bos_token=add_bos_token,
            seed=seed,
        )

    @classmethod
    def from_params(cls, config, params, tokenizer, name: str, **options) -> "C2FJaxLM":
        """A model from params already in memory (the sweep's in-memory merges); options as the model args."""
        lm = cls.__new__(cls)
        TemplateLM.__init__(lm)
        lm._setup(config, params, tokenizer, name, **options)
        return lm

    def _setup(
        self,
        config,
        params,
        tokenizer,
        name,
        *,
        mesh: str = "1x1x1",
        batch_size: int | str = 8,
        max_length: int | None = None,
        add_bos_token: bool | None = None,
        seed: int = 0,
    ) -> None:
        self.config, self.tokenizer, self.name = config, tokenizer, name
        self.mesh = sharding.make_mesh(**_mesh_shape(mesh))
        rows = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        self._batch_size = 8 if str(batch_size).startswith("auto") else int(batch_size)
        self._batch_size = -(-self._batch_size // rows) * rows  # the batch splits over the data axes
        self.params = sharding.place(params, sharding.param_shardings(self.mesh, params))
        self._max_length = int(max_length or self.config.max_position_embeddings)
        self.buckets = length_buckets(self._max_length)
        self.add_bos_token = add_bos_token
        self.rng = jax.random.key(int(seed))
        self._rollout = None  # the rollout layout copy, made on the first generate_until

    @staticmethod
    def _load(pretrained, step, coarse, sft, gamma, dtype):
        """(config, params, tokenizer, name) of the model args' source."""
        if pretrained is not None:
            if coarse is not None or sft is not None:
                raise LMEvalError("model_args: give pretrained=, or coarse=, sft= and gamma=, not both")
            m = evaluate.load_model(pretrained, dtype=dtype, step=None if step is None else int(step))
            return m.config, m.params, m.tokenizer, str(pretrained)
        if coarse is None or sft is None or gamma is None:
            raise LMEvalError("model_args: pretrained=DIR, or coarse=DIR,sft=DIR,gamma=G, is required")
        a = evaluate.load_model(coarse, dtype=dtype, step=None if step is None else int(step))
        b = evaluate.load_model(sft, dtype=dtype)
        params = merge.merge_params(a.params, b.params, float(gamma), dtype)
        return b.config, params, b.tokenizer, f"{coarse}+{sft}@{gamma}"

    # ------------------------------------------------------------------------- what TemplateLM asks of a model

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return 256

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return str(self.name).replace("/", "__")

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None, **kwargs
    ) -> list[int]:
        """As the hf backend encodes: the tokenizer's special tokens unless told otherwise, none when the string
        already starts with the BOS text."""
        flag = add_special_tokens if add_special_tokens is not None else self.add_bos_token
        if add_special_tokens is None and string.startswith(self.tokenizer.decode(self.prefix_token_id)):
            flag = False
        ids = self.tokenizer.encode(string, **({} if flag is None else {"add_special_tokens": flag}))
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise LMEvalError(f"{self.name}: the tokenizer has no chat template (--apply_chat_template)")
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    # ------------------------------------------------------------------------- scoring

    def _padded(self, rows: list, width: int) -> tuple:
        """Left-padded int32 ids, mask [batch_size, width] of token lists (the last repeated to a full batch),
        as batch-sharded arrays."""
        rows = rows + [rows[-1]] * (self._batch_size - len(rows))
        ids, mask = np.zeros((len(rows), width), np.int32), np.zeros((len(rows), width), np.int32)
        for r, tokens in enumerate(rows):
            ids[r, width - len(tokens) :], mask[r, width - len(tokens) :] = tokens, 1
        return sharding.global_batch(self.mesh, ids), sharding.global_batch(self.mesh, mask)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(sum of continuation logprobs, continuation is greedy) per (cache key, context ids, continuation ids).

        Each request is cut as the hf backend cuts it (the last max_length + 1 tokens of context + continuation)
        into a window (input, continuation); identical windows are scored once (`score_windows`)."""
        windows = []
        for _, context, continuation in requests:
            if not continuation or len(continuation) > self._max_length:
                raise LMEvalError(f"a continuation of {len(continuation)} tokens; it must be 1 to {self._max_length}")
            whole = (list(context) + list(continuation))[-(self._max_length + 1) :]
            windows.append((tuple(whole[:-1]), tuple(continuation)))
        scores = self.score_windows(set(windows), disable_tqdm)
        results = []
        for (key, _, _), window in zip(requests, windows):
            results.append(scores[window])
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, results[-1])
        return results

    def score_windows(self, windows: set, disable_tqdm: bool = True) -> dict:
        """{(input, continuation): (sum of logprobs, is greedy)}: log p(continuation | input), where the last
        len(continuation) tokens of input are the positions that predict it.

        Windows are packed into rows (`pack_windows`): the choices of one question share a single pass over
        it, and short documents share rows instead of padding, where the hf backend runs every (context,
        choice) pair on its own. Rows are batched by length, each batch at static bucket widths."""
        rows = sorted(pack_windows(windows, self._max_length), key=lambda r: -_row_length(r))
        out = {}
        for start in tqdm(
            range(0, len(rows), self._batch_size), disable=disable_tqdm or not rows, desc="c2f-jax loglikelihood"
        ):
            batch = rows[start : start + self._batch_size]
            T = _bucket(_row_length(batch[0]), self.buckets)
            K = min(_bucket(max(_row_length(r) - len(r[0]) for r in batch), self.buckets), T)
            arrays, spans = _packed_arrays(batch + [batch[-1]] * (self._batch_size - len(batch)), T, K)
            logp, greedy = evaluate.compiled_score_packed(
                self.params, *map(partial(sharding.global_batch, self.mesh), arrays), config=self.config
            )
            logp, greedy = sharding.to_host(logp), sharding.to_host(greedy)
            for r, first, window in spans[: sum(len(ws) for _, ws in batch)]:
                n = len(window[1])
                out[window] = (
                    float(np.sum(logp[r, first : first + n], dtype=np.float64)),
                    bool(np.all(greedy[r, first : first + n])),
                )
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each document's total logprob over lm-eval's disjoint windows of max_length tokens."""
        windows, owner = [], []
        for n, (text,) in enumerate(req.args for req in requests):
            for context, continuation in map(
                lm_utils.make_disjoint_window,
                lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self._max_length,
                    context_len=1,
                ),
            ):
                windows.append((None, context, continuation))
                owner.append(n)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for n, (logp, _) in zip(owner, scores):
            totals[n] += logp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ------------------------------------------------------------------------- generation

    def _rollout_params(self):
        """The actor's rollout copy (compute dtype, per-layer weights, the backend's down orientation) on the mesh:
        the layout the training job samples with, made once."""
        if self._rollout is None:
            layout = rollout.rollout_layout(self.config, backend.of_mesh(self.mesh))
            copy = rollout.rollout_params(layout, self.params)
            self._rollout = layout, sharding.place(copy, sharding.param_shardings(self.mesh, copy, "rollout"))
        return self._rollout

    def _sampling(self, gen_kwargs: dict) -> tuple[list[str], int, dict]:
        """(stop strings, max_gen_toks, rollout.generate's sampling arguments) of one request's generation_kwargs."""
        kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        until = handle_stop_sequences(
            kwargs.pop("until", None), eos=self.tokenizer.decode(self.eot_token_id, skip_special_tokens=False)
        )
        max_gen_toks = int(kwargs.pop("max_gen_toks"))
        unknown = sorted(k for k in kwargs if k not in GENERATION_KEYS)
        if unknown:
            raise LMEvalError(
                f"generation_kwargs: {unknown[0]!r} is not supported by c2f-jax "
                f"(supported: until, max_gen_toks, {', '.join(GENERATION_KEYS)})"
            )
        temperature = float(kwargs.get("temperature") or 0.0) if kwargs.get("do_sample") else 0.0
        if kwargs.get("do_sample") and temperature == 0.0:
            temperature = 1.0  # sampling asked for without a temperature: the distribution as it is
        if max_gen_toks < 1 or max_gen_toks >= self._max_length:
            raise LMEvalError(f"max_gen_toks={max_gen_toks}: must be 1 to max_length - 1 ({self._max_length - 1})")
        return (
            until,
            max_gen_toks,
            {
                "temperature": temperature,
                "top_k": int(kwargs.get("top_k") or 0),
                "top_p": float(kwargs.get("top_p") or 1.0),
            },
        )

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled) continuations, cut at the first stop string; EOS ends a row early."""
        layout, params = self._rollout_params()
        args = [req.args for req in requests]
        groups: dict = {}
        for i, (_, gen_kwargs) in enumerate(args):
            groups.setdefault(json.dumps(gen_kwargs, sort_keys=True, default=str), []).append(i)
        results: list = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="c2f-jax generate_until")
        for members in groups.values():
            until, max_gen_toks, sampling = self._sampling(args[members[0]][1])
            contexts = {
                i: self.tok_encode(args[i][0], left_truncate_len=self._max_length - max_gen_toks) for i in members
            }
            order = sorted(members, key=lambda i: (-len(contexts[i]), args[i][0]))
            for start in range(0, len(order), self._batch_size):
                batch = order[start : start + self._batch_size]
                ids, mask = self._padded([contexts[i] for i in batch], _bucket(len(contexts[batch[0]]), self.buckets))
                self.rng, key = jax.random.split(self.rng)
                out = rollout.generate(
                    layout,
                    params,
                    ids,
                    mask,
                    key,
                    max_new_tokens=max_gen_toks,
                    eos_token_ids=(self.eot_token_id,),
                    pad_id=self.tokenizer.pad_token_id or 0,
                    **sampling,
                )
                tokens, kept = sharding.to_host(out.tokens), sharding.to_host(out.mask)
                for r, i in enumerate(batch):
                    text = self.tokenizer.decode(tokens[r][kept[r] > 0].tolist(), skip_special_tokens=True)
                    results[i] = postprocess_generated_text(text, until, None)
                    self.cache_hook.add_partial("generate_until", args[i], results[i])
                bar.update(len(batch))
        bar.close()
        return results


def parse_tasks(text: str) -> list[tuple[str, int | None]]:
    """`paper` (PAPER_TASKS), or comma-separated lm-eval task names, each optionally `name:shots`."""
    if text.strip() == "paper":
        return list(PAPER_TASKS)
    tasks = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        name, _, shots = item.partition(":")
        if shots and not shots.isdigit():
            raise LMEvalError(f"--tasks {item!r}: shots must be a number (name:shots)")
        tasks.append((name, int(shots) if shots else None))
    if not tasks:
        raise LMEvalError("--tasks is empty")
    return tasks


@functools.cache
def task_manager(include_path: str | None = None):
    """lm-eval's TaskManager over its own tasks, ours (TASKS_DIR) and `include_path` (indexing takes seconds: once)."""
    from lm_eval.tasks import TaskManager

    paths = dict.fromkeys(str(Path(p).resolve()) for p in (TASKS_DIR, include_path) if p)
    return TaskManager(include_path=list(paths))


def check_tasks(tasks: list[tuple[str, int | None]], include_path: str | None = None):
    """The task manager, once every task name is known to lm-eval (or `include_path`): checked before a model
    loads, so an unknown name costs seconds, not a model's loading time."""
    if include_path is not None and not Path(include_path).is_dir():
        raise LMEvalError(f"--include_path {include_path}: no such folder")
    manager = task_manager(include_path)
    known = set(manager.all_tasks)
    unknown = [name for name, _ in tasks if name not in known]
    if unknown:
        raise LMEvalError(f"--tasks: unknown lm-eval task {unknown[0]!r} (`c2f-lm-eval ls tasks` lists them)")
    for name, shots in tasks:
        if shots is not None and shots < 0:
            raise LMEvalError(f"--tasks {name}:{shots}: shots must be >= 0")
    return manager


def headline(results: dict) -> tuple[str, float]:
    """(metric, value): a task's (or group's) headline number from lm-eval's results entry (MAIN_METRICS)."""
    key = next((k for k in MAIN_METRICS if isinstance(results.get(k), (int, float))), None)
    if key is None:
        raise LMEvalError(f"no headline metric among {sorted(results)}")
    return key.split(",")[0], float(results[key])


def run_tasks(
    lm,
    tasks: list[tuple[str, int | None]],
    *,
    limit: float | None = None,
    include_path: str | None = None,
    seed: int = 0,
) -> tuple[dict, list[dict]]:
    """Runs lm-eval on `lm`, once per shot count (lm-eval takes one per call): ({task: (metric, headline
    number)}, [lm-eval's results object per call, samples left out])."""
    import lm_eval

    manager = check_tasks(tasks, include_path)
    scores, outputs = {}, []
    for shots in dict.fromkeys(s for _, s in tasks):
        names = [n for n, s in tasks if s == shots]
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=names,
            num_fewshot=shots,
            limit=limit,
            task_manager=manager,
            random_seed=seed,
            numpy_random_seed=seed,
            fewshot_random_seed=seed,
        )
        outputs.append({k: v for k, v in out.items() if k != "samples"})
        scores.update({n: headline(out["results"][n]) for n in names})
    return scores, outputs


if __name__ == "__main__":  # `python -m c2f_jax.eval.lm_eval` is the command `c2f-lm-eval`
    import sys

    sys.modules["c2f_jax.eval.lm_eval"] = sys.modules[__name__]  # one module, so `c2f-jax` registers once
    from c2f_jax.cli.lm_eval import command

    command()
