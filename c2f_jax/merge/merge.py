"""Knowledge Residue Merger: theta_fine = gamma * theta_coarse + (1 - gamma) * theta_sft, tensor by tensor.

Two entry points:
- `merge_params(coarse, sft, gamma)`: two param pytrees (on one device or sharded on a mesh) -> the merged tree.
- `plan_merge(...)` then `write_merge(plan, out)`: HF folders on disk -> an HF folder (or one per gamma for a
  sweep). Everything is validated before anything is written; tensors then stream through in fixed-size chunks,
  so host memory stays at a few chunks whatever the model size (the threads and buffers: c2f_jax.merge.merge_io),
  and a sweep reads each input chunk once and writes it, merged, to every output folder in lockstep.

The arithmetic, identical in both paths: in float32, `f32(gamma) * coarse + f32(1 - gamma) * sft` (two
products, then one sum, each rounded to float32; `1 - gamma` is taken in float64 first), then rounded to
nearest into the output dtype. gamma 0 and 1 take the SFT / coarse tensor itself (cast only when the output
dtype differs), so they are exact even for NaN, inf and -0.0, which `0 * x + y` would not be.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import math
import os
import re
import shutil
from pathlib import Path

import numpy as np

# No JAX at import time: the CLI starts without it (merge_params imports it when called).
from c2f_jax.merge import merge_io
from c2f_jax.model import hf, safetensors_io
from c2f_jax.model.config import CAUSAL_LM, ConfigError, DtypeTable, dtype_name, np_dtype
from c2f_jax.model.safetensors_io import SafetensorsError
from c2f_jax.runtime import workdir

PROVENANCE_NAME = "merge_provenance.json"
DTYPES = DtypeTable({name: name for name in hf.HF_DTYPES})
_FLOATS = {"float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"}
# Files of the SFT folder copied besides the tokenizer (hf.TOKENIZER_FILES).
_EXTRA_FILES = ("generation_config.json", "chat_template.jinja")
# The files that define token ids; tokenizer_config.json is left out on purpose: an Instruct model's chat
# template makes it differ from the base model's while every token id means the same.
_VOCAB_FILES = ("tokenizer.model", "tokenizer.json")
# Buffers old checkpoints carry and transformers recomputes; never merged, never written.
_SKIPPED = re.compile(r".*rotary_emb\.inv_freq$")
# Architecture fields that may differ without changing any tensor shape; a difference is a warning.
_CONFIG_FIELDS = (
    "rope_theta",
    "sliding_window",
    "rms_norm_eps",
    "max_position_embeddings",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)


class MergeError(ValueError):
    """Inputs that cannot be merged, or an output that cannot be written; the message is one line naming the culprit."""


def check_gamma(gamma: float) -> float:
    """gamma as a float in [0, 1], or a MergeError."""
    try:
        g = float(gamma)
    except (TypeError, ValueError):
        raise MergeError(f"gamma={gamma!r} is not a number") from None
    if not 0.0 <= g <= 1.0:  # also rejects NaN
        raise MergeError(f"gamma={gamma!r} is outside [0, 1]")
    return g


def parse_gammas(text: str) -> list[float]:
    """'0.7' -> [0.7]; '0.1,0.3' -> [0.1, 0.3], in the given order; each checked to lie in [0, 1]."""
    parts = [t.strip() for t in str(text).split(",") if t.strip()]
    if not parts:
        raise MergeError(f"gamma list {text!r} names no value")
    return [check_gamma(t) for t in parts]


def _dtype_name(dtype) -> str | None:
    """The name of an output dtype in any spelling (jnp.bfloat16 -> 'bfloat16'); None stays None."""
    if dtype is None:
        return None
    try:
        return dtype_name(dtype)
    except ConfigError as e:
        raise MergeError(str(e)) from None


def _is_float(dtype) -> bool:
    return np.dtype(dtype).name in _FLOATS


# ----------------------------------------------------------------------------- the arithmetic


def _cast(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if x.dtype == dtype:
        return x
    return x.astype(np.float32, copy=False).astype(dtype)


def lerp(
    coarse: np.ndarray,
    sft: np.ndarray,
    gamma: float,
    dtype,
    scratch: merge_io.Scratch | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """float32 `gamma * coarse + (1 - gamma) * sft`, rounded to `dtype`.

    coarse, sft: NumPy arrays of one shape, any float dtypes (bfloat16 via ml_dtypes). Returns an array of
    that shape in `dtype`: `out` when given (that shape and dtype), else a view into `scratch` (valid until
    its next use) or a new array. Without `out`, gamma 0 / 1 return `sft` / `coarse` themselves when they
    already have `dtype`.
    """
    dtype = np.dtype(dtype)
    if gamma in (0.0, 1.0):
        src = coarse if gamma == 1.0 else sft
        if out is None:
            return _cast(src, dtype)
        np.copyto(out, src if src.dtype == dtype else src.astype(np.float32, copy=False), casting="unsafe")
        return out
    take = scratch.take if scratch is not None else lambda i, shape, dt: np.empty(shape, dt)
    x = np.multiply(coarse, np.float32(gamma), out=take(0, coarse.shape, np.float32), dtype=np.float32)
    y = np.multiply(sft, np.float32(1.0 - gamma), out=take(1, sft.shape, np.float32), dtype=np.float32)
    if dtype == np.float32:
        return np.add(x, y, out=x if out is None else out)
    np.add(x, y, out=x)
    out = take(2, x.shape, dtype) if out is None else out
    np.copyto(out, x, casting="unsafe")  # round to nearest even, as astype does
    return out


def _lerp_jax(a, b, gamma: float, dtype):
    import jax.numpy as jnp

    # Op by op, not under jit, on purpose: a fused kernel may contract the multiply-add into an FMA,
    # which rounds once instead of twice and would disagree with the streaming (NumPy) merge.
    if gamma == 1.0:
        return a if a.dtype == dtype else a.astype(jnp.float32).astype(dtype)
    if gamma == 0.0:
        return b if b.dtype == dtype else b.astype(jnp.float32).astype(dtype)
    x = jnp.float32(gamma) * a.astype(jnp.float32)
    y = jnp.float32(1.0 - gamma) * b.astype(jnp.float32)
    return (x + y).astype(dtype)


def merge_params(coarse, sft, gamma: float, dtype=None, method: str = "linear"):
    """The merged pytree `gamma * coarse + (1 - gamma) * sft`, leaf by leaf with `jax.tree.map`; with method
    "slerp", SLERP from sft (0) to coarse (1) (`methods.Slerp`) per HF tensor (a stacked `layers` leaf per layer), on the host.

    coarse, sft: pytrees of the same structure and leaf shapes (jax or NumPy float arrays, sharded or not;
    each output leaf keeps its input's sharding). dtype in any spelling; None gives each leaf the SFT leaf's.
    Raises MergeError naming the first path whose structure, shape or dtype kind disagrees.
    """
    import jax
    import jax.numpy as jnp

    gamma, dtype = check_gamma(gamma), _dtype_name(dtype)
    a_leaves = dict(jax.tree_util.tree_flatten_with_path(coarse)[0])
    b_leaves = dict(jax.tree_util.tree_flatten_with_path(sft)[0])
    only_a = [p for p in a_leaves if p not in b_leaves]
    only_b = [p for p in b_leaves if p not in a_leaves]
    if only_a:
        raise MergeError(f"param {jax.tree_util.keystr(only_a[0])} is in the coarse tree but not in the SFT tree")
    if only_b:
        raise MergeError(f"param {jax.tree_util.keystr(only_b[0])} is in the SFT tree but not in the coarse tree")
    if jax.tree.structure(coarse) != jax.tree.structure(sft):
        raise MergeError(f"param trees differ in structure: {jax.tree.structure(coarse)} vs {jax.tree.structure(sft)}")
    for path, a in a_leaves.items():
        b = b_leaves[path]
        if tuple(a.shape) != tuple(b.shape):
            raise MergeError(
                f"param {jax.tree_util.keystr(path)}: coarse shape {tuple(a.shape)}, SFT shape {tuple(b.shape)}"
            )
        if not (_is_float(a.dtype) and _is_float(b.dtype)):
            raise MergeError(f"param {jax.tree_util.keystr(path)}: not floating point ({a.dtype}, {b.dtype})")
    if method == "slerp":
        from c2f_jax.merge import methods

        def slerp_leaf(path, a, b):
            a, b = np.asarray(a), np.asarray(b)
            if getattr(path[0], "key", None) == "layers":  # stacked: one HF tensor per layer
                out = np.stack([methods.merge_whole(methods.Slerp(gamma), [b[i], a[i]]) for i in range(a.shape[0])])
            else:
                out = methods.merge_whole(methods.Slerp(gamma), [b, a])
            return _cast(out, np_dtype(dtype or b.dtype))

        return jax.tree_util.tree_map_with_path(slerp_leaf, coarse, sft)
    if method != "linear":
        raise MergeError(f"method={method!r}; the pytree merge does 'linear' and 'slerp'")
    return jax.tree.map(
        lambda a, b: _lerp_jax(jnp.asarray(a), jnp.asarray(b), gamma, np_dtype(dtype or b.dtype)), coarse, sft
    )


# ----------------------------------------------------------------------------- inputs


def resolve_input(path: str | os.PathLike) -> Path:
    """The HF model folder a --coarse/--sft argument names (a training workdir goes through `hf_folder` first)."""
    p = Path(path)
    if not p.exists():
        raise MergeError(f"{p}: not found")
    if not p.is_dir():
        raise MergeError(f"{p}: not a folder (expected an HF model folder with config.json and safetensors)")
    if workdir.is_workdir(p):
        raise MergeError(
            f"{p}: is a training workdir; only --coarse takes one (export it with "
            f"c2f-export --checkpoint {p} --out DIR to pass it here)"
        )
    if not (p / "config.json").exists():
        raise MergeError(f"{p}: not an HF model folder (no config.json); a training workdir has {workdir.RUN_CONFIG}")
    return p


@contextlib.contextmanager
def hf_folder(path: str | os.PathLike, scratch: str | os.PathLike, step: int | None = None):
    """Yields an HF folder for `path`: itself, or for a training workdir its actor (latest or `step`)
    exported into a temporary folder under `scratch`, removed on exit.

    The export reads only the actor's params from the checkpoint (one model in host memory, not the
    critic and AdamW moments beside it) and writes them; the merge then streams from the exported
    folder as from any other.
    """
    p = Path(path)
    if not workdir.is_workdir(p):
        if step is not None:
            raise MergeError(f"{p}: a checkpoint step applies to training workdirs only")
        yield resolve_input(p)
        return
    job = workdir.job(p)
    if job != "coarse":
        raise MergeError(f"{p}: is a {job!r} training workdir; the merger takes a coarse run's actor")
    Path(scratch).mkdir(parents=True, exist_ok=True)
    tmp = Path(scratch) / f".c2f-export-{p.name}"  # the same path in every process of a job
    try:
        from c2f_jax.model import export  # JAX and Orbax, only for workdir inputs

        export.export(p, tmp, step=step, overwrite=True)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _open_checkpoint(folder: Path) -> hf.CheckpointReader:
    try:
        config = hf.read_config(folder)
        if config.architecture != CAUSAL_LM:
            raise MergeError(f"{folder}: is a {config.architecture}; the merger takes {CAUSAL_LM} folders")
        reader = hf.CheckpointReader(folder)
        hf.check_tensors(reader, hf.tensor_specs(config))
    except SafetensorsError as e:
        raise MergeError(str(e)) from None
    except hf.HFError as e:
        raise MergeError(str(e)) from None
    if (folder / safetensors_io.INDEX_NAME).exists():
        # A shard on disk that the index does not name would be silently ignored: a stale or partial download.
        listed = {f.path.name for f in reader.files.values()}
        for shard in sorted(folder.glob("*.safetensors")):
            if safetensors_io.SHARD_NAME.match(shard.name) and shard.name not in listed:
                raise MergeError(
                    f"{shard}: shard not named in {safetensors_io.INDEX_NAME} (stale or partial checkpoint?)"
                )
    return reader


def _vocab_fingerprints(folder: Path) -> dict[str, str]:
    """{file name: sha256} of the token-id-defining files present in `folder`.

    tokenizer.model is hashed as bytes; tokenizer.json as parsed JSON with sorted keys and without its
    padding/truncation settings, so formatting and runtime options do not count as a different tokenizer.
    """
    prints = {}
    if (folder / "tokenizer.model").exists():
        prints["tokenizer.model"] = hashlib.sha256((folder / "tokenizer.model").read_bytes()).hexdigest()
    if (folder / "tokenizer.json").exists():
        try:
            d = json.loads((folder / "tokenizer.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise MergeError(f"{folder / 'tokenizer.json'}: not valid JSON") from None
        for key in ("padding", "truncation"):
            d.pop(key, None)
        prints["tokenizer.json"] = hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()
    return prints


def compare_tokenizers(coarse: Path, sft: Path, allow_mismatch: bool = False) -> list[str]:
    """Warnings, or a MergeError when the two folders' tokenizers are not the same.

    Compared: tokenizer.model and tokenizer.json, whichever both folders have. Tokenizer files on one side
    only count as a mismatch (nothing confirms the ids agree); on neither side, a warning (the output then has
    none). With allow_mismatch every mismatch becomes a warning and the output takes the SFT's tokenizer.
    """
    a, b = _vocab_fingerprints(coarse), _vocab_fingerprints(sft)
    if not a and not b:
        return [f"neither input has tokenizer files ({', '.join(_VOCAB_FILES)}); the output will have none"]
    problem = None
    if not a or not b:
        problem = f"{coarse if not a else sft} has no tokenizer files but {sft if not a else coarse} has"
    elif not a.keys() & b.keys():
        problem = f"tokenizers cannot be compared: {coarse} has {sorted(a)}, {sft} has {sorted(b)}"
    else:
        for name in sorted(a.keys() & b.keys()):
            if a[name] != b[name]:
                problem = (
                    f"tokenizers differ: {coarse / name} and {sft / name} "
                    f"(content sha256 {a[name][:12]} vs {b[name][:12]})"
                )
                break
    if problem is None:
        return []
    if not allow_mismatch:
        raise MergeError(f"{problem}; pass --allow-tokenizer-mismatch to merge anyway")
    return [f"{problem} (allowed; the output takes the SFT's tokenizer)"]


def compare_configs(coarse: Path, sft: Path) -> list[str]:
    """One warning per architecture field (rope_theta, sliding_window, ...) whose values differ."""
    a, b = hf.read_config(coarse), hf.read_config(sft)
    return [
        f"configs differ: {f} is {getattr(a, f)!r} in {coarse} and {getattr(b, f)!r} in {sft}; "
        f"the output keeps the SFT's config.json"
        for f in _CONFIG_FIELDS
        if getattr(a, f) != getattr(b, f)
    ]


# ----------------------------------------------------------------------------- the plan


@dataclasses.dataclass(frozen=True)
class TensorPlan:
    """One tensor to merge: its name and shape, both stored dtypes, and the output dtype."""

    name: str
    shape: tuple[int, ...]
    coarse_dtype: np.dtype
    sft_dtype: np.dtype
    out_dtype: np.dtype

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def out_nbytes(self) -> int:
        return self.size * self.out_dtype.itemsize


@dataclasses.dataclass
class MergePlan:
    """Everything validated about a merge, before anything is written."""

    coarse: Path
    sft: Path
    gammas: tuple[float, ...]
    tensors: list[TensorPlan]
    dtype: str | None  # the --dtype asked for; None keeps each SFT tensor's own dtype
    warnings: list[str]
    coarse_reader: hf.CheckpointReader
    sft_reader: hf.CheckpointReader

    @property
    def sweep(self) -> bool:
        return len(self.gammas) > 1


def _natural_key(name: str) -> list:
    # model.layers.2 before model.layers.10; pieces alternate str/int, so comparisons stay well typed.
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def gamma_folder(gamma: float) -> str:
    """The sub-folder of a sweep's --out that holds the merge at this gamma ('gamma_0.7')."""
    return f"gamma_{gamma:g}"


def plan_merge(coarse, sft, gammas, dtype=None, allow_tokenizer_mismatch: bool = False) -> MergePlan:
    """Validates two HF MistralForCausalLM folders for merging and lists the tensors to write.

    gammas: one float or a sequence (a sweep). dtype: float32, bfloat16 or float16 in any spelling, or None
    (each output tensor in the SFT tensor's stored dtype). Raises MergeError for anything that stops the merge; returns
    the plan with warnings (configs that differ, an allowed tokenizer mismatch) for the caller to show.
    """
    gammas = tuple(check_gamma(g) for g in (gammas if isinstance(gammas, (list, tuple)) else [gammas]))
    if not gammas:
        raise MergeError("no gamma given")
    names = [gamma_folder(g) for g in gammas]
    if len(set(names)) != len(names):
        raise MergeError(f"gammas {list(gammas)} repeat a value")
    dtype = _dtype_name(dtype)
    if dtype is not None and dtype not in DTYPES:
        raise MergeError(f"dtype={dtype!r}; expected one of {sorted(DTYPES)}")
    coarse, sft = resolve_input(coarse), resolve_input(sft)
    ra, rb = _open_checkpoint(coarse), _open_checkpoint(sft)
    a_names = {n for n in ra.names() if not _SKIPPED.match(n)}
    b_names = {n for n in rb.names() if not _SKIPPED.match(n)}
    only_a, only_b = sorted(a_names - b_names, key=_natural_key), sorted(b_names - a_names, key=_natural_key)
    if only_a:
        raise MergeError(f"tensor {only_a[0]} is in {coarse} ({ra.where(only_a[0]).name}) but not in {sft}")
    if only_b:
        raise MergeError(f"tensor {only_b[0]} is in {sft} ({rb.where(only_b[0]).name}) but not in {coarse}")
    tensors = []
    for n in sorted(a_names, key=_natural_key):
        if ra.shape(n) != rb.shape(n):
            raise MergeError(f"tensor {n} has shape {ra.shape(n)} in {coarse} but {rb.shape(n)} in {sft}")
        for folder, reader in ((coarse, ra), (sft, rb)):
            if not _is_float(reader.dtype(n)):
                raise MergeError(f"tensor {n} in {folder} is {reader.dtype(n)}, not floating point")
        out = DTYPES[dtype] if dtype else rb.dtype(n)
        tensors.append(TensorPlan(n, ra.shape(n), ra.dtype(n), rb.dtype(n), out))
    warnings = compare_tokenizers(coarse, sft, allow_tokenizer_mismatch) + compare_configs(coarse, sft)
    return MergePlan(coarse, sft, gammas, tensors, dtype, warnings, ra, rb)


def _check_out(plan: MergePlan, out: Path, overwrite: bool) -> None:
    if not out.parent.is_dir():
        raise MergeError(f"{out.parent}: parent folder does not exist")
    try:
        workdir.check_output(out, {"--coarse": plan.coarse, "--sft": plan.sft}, overwrite=overwrite)
    except workdir.WorkdirError as e:
        raise MergeError(str(e)) from None


def _copy_sft_files(plan: MergePlan, folder: Path) -> None:
    if plan.dtype is None:
        shutil.copy2(plan.sft / "config.json", folder / "config.json")
    else:
        config = json.loads((plan.sft / "config.json").read_text())
        for key in ("dtype", "torch_dtype"):  # transformers v5 / v4 names; keep whichever the SFT used
            if key in config:
                config[key] = plan.dtype
        config.setdefault("dtype", plan.dtype)
        (folder / "config.json").write_text(json.dumps(config, indent=2))
    hf.copy_tokenizer(plan.sft, folder)
    for name in _EXTRA_FILES:
        if (plan.sft / name).exists():
            shutil.copy2(plan.sft / name, folder / name)


def write_merge(
    plan: MergePlan,
    out,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    chunk_bytes: int = merge_io.CHUNK_BYTES,
) -> list[dict]:
    """Writes the merge: `out` is the model folder, or for a sweep holds one `gamma_<g>` folder per gamma.

    Each folder: safetensors shards of at most max_shard_size (+ index when more than one), the SFT's
    config.json (dtype updated when plan.dtype is set), tokenizer and generation files, and
    merge_provenance.json. Inputs are read chunk by chunk, once for all gammas; everything is written under
    a temporary name and renamed into place at the end. Returns the provenance dict of each folder.
    """
    out = Path(out)
    _check_out(plan, out, overwrite)
    try:
        max_bytes = hf.parse_size(max_shard_size)
    except hf.HFError as e:
        raise MergeError(str(e)) from None
    shards = safetensors_io.plan_shards(plan.tensors, lambda t: t.out_nbytes, max_bytes)
    chunk = max(chunk_bytes // 4, 1)  # elements, sized for the float32 work buffers
    # (tensor, first element, element count) of every chunk, shard by shard.
    jobs = [
        [(t, start, min(chunk, t.size - start)) for t in shard for start in range(0, t.size, chunk)] for shard in shards
    ]
    flat = [job for shard_jobs in jobs for job in shard_jobs]
    provenance = []

    def fill(tmp: Path) -> None:
        scratch = merge_io.Scratch(chunk)
        sa = merge_io.ChunkReader(plan.coarse_reader, {t.name: t.coarse_dtype for t in plan.tensors}, chunk)
        sb = merge_io.ChunkReader(plan.sft_reader, {t.name: t.sft_dtype for t in plan.tensors}, chunk)
        writer = merge_io.ChunkWriter(chunk * max(t.out_dtype.itemsize for t in plan.tensors))
        with contextlib.closing(sa), contextlib.closing(sb), contextlib.closing(writer):
            folders = [tmp / gamma_folder(g) for g in plan.gammas] if plan.sweep else [tmp]
            for folder in folders:
                folder.mkdir(exist_ok=True)
            chunks = zip(flat, sa.chunks(flat), sb.chunks(flat))  # each input chunk read once for every gamma
            for shard, fname, shard_jobs in zip(shards, safetensors_io.shard_names(len(shards)), jobs):
                header = safetensors_io.header([(t.name, t.shape, t.out_dtype) for t in shard])
                size = len(header) + sum(t.out_nbytes for t in shard)
                files = [writer.open(folder / fname) for folder in folders]
                for f in files:
                    writer.write(f, np.frombuffer(header, np.uint8))
                for (t, _, _), a, b in itertools.islice(chunks, len(shard_jobs)):
                    for gamma, f in zip(plan.gammas, files):
                        writer.write(
                            f, lerp(a, b, gamma, t.out_dtype, scratch, out=writer.buffer(a.shape, t.out_dtype))
                        )
                for f in files:
                    writer.finish(f, size)
            writer.drain()
            digests = {"coarse": sa.sha.hexdigest(), "sft": sb.sha.hexdigest()}
            provenance.extend(
                _finish_folder(plan, folder, gamma, shards, digests) for folder, gamma in zip(folders, plan.gammas)
            )

    try:
        workdir.write(out, fill, overwrite, folder=True)
    except SafetensorsError as e:  # an input that changed or broke after it was checked
        raise MergeError(str(e)) from None
    return provenance


def _finish_folder(plan: MergePlan, folder: Path, gamma: float, shards, digests) -> dict:
    safetensors_io.write_index(
        folder, [[t.name for t in shard] for shard in shards], sum(t.out_nbytes for t in plan.tensors)
    )
    _copy_sft_files(plan, folder)
    provenance = {
        "method": "linear (c2f_jax.merge.merge): float32 gamma * coarse + (1 - gamma) * sft, rounded to the output dtype",
        "gamma": gamma,
        "coarse": {"path": str(plan.coarse.resolve()), "sha256": digests["coarse"]},
        "sft": {"path": str(plan.sft.resolve()), "sha256": digests["sft"]},
        "sha256_covers": "each merged tensor's 'name|dtype|shape' line and bytes, in natural name order "
        "(so the sharding does not matter)",
        "tensors": len(plan.tensors),
        "dtype": plan.dtype or "as stored in the SFT model",
        "warnings": plan.warnings,
    }
    (folder / PROVENANCE_NAME).write_text(json.dumps(provenance, indent=2))
    return provenance
