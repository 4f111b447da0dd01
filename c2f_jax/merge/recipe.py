"""Merging by a mergekit YAML recipe: `python tools/merge.py --config merge.yml --out DIR`.

Reads mergekit's format for the methods of c2f_jax.merge.methods (and linear):

    merge_method: slerp | linear | task_arithmetic | ties | dare_linear | dare_ties
    base_model: FOLDER                 # slerp: the t = 0 end; task vectors: what the deltas are taken from
    models:
      - model: FOLDER
        parameters: {weight: 0.7, density: 0.5}
    parameters: {t: 0.3, normalize: true, lambda: 1.0}
    dtype: float32                     # the inputs are read as this; the arithmetic is float32 either way
    out_dtype: bfloat16                # default: dtype, else each tensor as the base model stores it
    tokenizer_source: base

A value may be a list, a gradient over the layers as mergekit reads it (layer i of L at position i / (L - 1),
tensors outside the layers at 0). Any other key, or a per-tensor filter, is refused in one line naming it.
Tensors are merged whole, one at a time (SLERP, TIES and DARE need a tensor's norms, ranks or sums before
any output), so memory holds the inputs and a few float32 copies of the largest tensor. DARE's drops come
from `seed`, recorded in merge_provenance.json.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import numpy as np

from c2f_jax.merge import merge, merge_io, methods
from c2f_jax.model import hf, safetensors_io
from c2f_jax.runtime import workdir

TOP_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source"}
SHARED = {"slerp": {"t"}, "linear": {"normalize"}, "task_arithmetic": {"normalize", "lambda", "int8_mask"},
          "ties": {"normalize", "lambda", "int8_mask"}, "dare_linear": {"normalize", "lambda", "rescale"},
          "dare_ties": {"normalize", "lambda", "rescale", "int8_mask"}}
PER_MODEL = {"slerp": set(), "linear": {"weight"}, **{m: {"weight", "density"} for m in methods.METHODS}}
_LAYER = re.compile(r"\.layers\.(\d+)\.")


@dataclasses.dataclass(frozen=True)
class Recipe:
    method: str
    base: Path | None
    models: tuple[tuple[Path, dict], ...]  # (folder, parameters), the base left out
    parameters: dict
    dtype: str | None
    out_dtype: str | None
    source: Path | None  # the YAML file


def slerp_recipe(coarse, sft, t: float) -> Recipe:
    """SLERP from the SFT model (t = 0) to the Coarse Actor (t = 1), as gamma runs in the linear merge."""
    return Recipe("slerp", Path(sft), ((Path(coarse), {}),), {"t": merge.check_gamma(t)}, None, None, None)


def _fail(source, text: str):
    raise merge.MergeError(f"{source}: {text}")


def _parameters(source, where: str, params, allowed: set, method: str) -> dict:
    """`params` (a mapping or None) once every key is one `method` takes there and every value a number, a
    boolean or a list of numbers (a gradient)."""
    params = params or {}
    for key, value in params.items():
        if key not in allowed:
            _fail(source, f"{where}: unsupported key {key!r} for {method}")
        if isinstance(value, list):
            if not value or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
                _fail(source, f"{where}.{key}: a list must hold numbers (a gradient); filters per tensor are not "
                              "supported")
        elif not isinstance(value, (int, float, bool)):
            _fail(source, f"{where}.{key}: {value!r} is not supported (a number, a boolean or a list of numbers)")
    return params


def read_recipe(path) -> Recipe:
    """The recipe in mergekit YAML file `path`; a MergeError naming the first thing we do not support."""
    import yaml

    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        _fail(path, f"not a readable YAML file ({str(e).splitlines()[0]})")
    if not isinstance(doc, dict):
        _fail(path, "not a mergekit recipe (a mapping with merge_method)")
    for key in doc:
        if key not in TOP_KEYS:
            _fail(path, f"unsupported key {key!r} (supported: {', '.join(sorted(TOP_KEYS))})")
    method = doc.get("merge_method")
    if method not in SHARED:
        _fail(path, f"merge_method: {method!r} is not supported (supported: {', '.join(SHARED)})")
    if doc.get("tokenizer_source", "base") != "base":
        _fail(path, f"tokenizer_source: {doc['tokenizer_source']!r} is not supported (only 'base')")
    for key in ("dtype", "out_dtype"):
        if doc.get(key) is not None and doc[key] not in merge.DTYPES:
            _fail(path, f"{key}: {doc[key]!r}; expected one of {sorted(merge.DTYPES)}")
    shared = _parameters(path, "parameters", doc.get("parameters"), SHARED[method], method)
    base = Path(doc["base_model"]) if doc.get("base_model") else None
    if base is None and method != "linear":
        _fail(path, f"{method} needs a base_model")
    models = []
    for i, entry in enumerate(doc.get("models") or []):
        if not isinstance(entry, dict) or "model" not in entry:
            _fail(path, f"models[{i}]: expected a mapping with 'model'")
        for key in entry:
            if key not in ("model", "parameters"):
                _fail(path, f"models[{i}]: unsupported key {key!r}")
        params = _parameters(path, f"models[{i}].parameters", entry.get("parameters"), PER_MODEL[method], method)
        if base is not None and Path(entry["model"]) == base and method != "linear":
            continue  # the base listed among the models, as mergekit's examples do
        models.append((Path(entry["model"]), params))
    want = 1 if method == "slerp" else None
    if not models or (want and len(models) != want):
        _fail(path, f"{method} needs {'one model besides the base' if want else 'at least one model'}; "
                    f"found {len(models)}")
    if method != "slerp" and any("weight" not in p for _, p in models):
        _fail(path, f"{method}: every model needs parameters.weight")
    if method == "slerp" and "t" not in shared:
        _fail(path, "slerp needs parameters.t")
    return Recipe(method, base, tuple(models), shared, doc.get("dtype"), doc.get("out_dtype"), path)


def value_at(setting, position: float):
    """A setting at a tensor's position in [0, 1]: a number as is, a list as mergekit's gradient."""
    if not isinstance(setting, list):
        return setting
    scaled = position * (len(setting) - 1)
    i0 = int(scaled)
    i1, frac = min(len(setting) - 1, i0 + 1), scaled - int(scaled)
    return (1 - frac) * setting[i0] + frac * setting[i1]


def position(name: str, layers: int) -> float:
    found = _LAYER.search(name)
    if found is None or layers < 2:
        return 0.0 if found is None else 1.0
    return int(found.group(1)) / (layers - 1)


def merge_tensor(recipe: Recipe, name: str, base, models: list, layers: int, seed: int) -> np.ndarray:
    """float32: one tensor merged by the recipe (`base` None for linear without a base)."""
    at = position(name, layers)
    shared = {k: value_at(v, at) for k, v in recipe.parameters.items()}
    per = [{k: value_at(v, at) for k, v in p.items()} for _, p in recipe.models]
    if recipe.method == "slerp":
        return methods.slerp(shared["t"], base, models[0])
    weights = [p["weight"] for p in per]
    if recipe.method == "linear":
        return methods.linear(models, weights, shared.get("normalize", True))
    rngs = [methods.drop_rng(seed, name, i) for i in range(len(models))]
    return methods.task_vectors(recipe.method, base, models, weights, [p.get("density", 1.0) for p in per],
                                lam=shared.get("lambda", 1.0), normalize=shared.get("normalize"), rngs=rngs)


def _read_whole(reader: hf.CheckpointReader, name: str) -> np.ndarray:
    """The tensor `name` read into memory of its own (a memmap's touched pages would count towards RSS while
    it lives: a model's worth across a merge)."""
    mapped = reader.get(name)  # used only for its file, offset, shape and dtype
    out = np.empty(mapped.shape, mapped.dtype)
    path, offset = mapped.filename, mapped.offset
    del mapped
    view, done = out.reshape(-1).view(np.uint8), 0
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        while done < view.size:
            n = f.readinto(view[done:])
            if not n:
                raise merge.MergeError(f"{path}: tensor {name} is cut short")
            done += n
    return out


def write_recipe(recipe: Recipe, out, seed: int = 0, max_shard_size: int | str = "5GB",
                 overwrite: bool = False) -> dict:
    """Merges by `recipe` into the HF folder `out` (written under a temporary name, renamed when whole): the
    tensors, the base model's (or first model's) config.json, tokenizer and generation files, and
    merge_provenance.json. Returns the provenance."""
    out = Path(out)
    folders = ([recipe.base] if recipe.base else []) + [m for m, _ in recipe.models]
    workdir.check_output(out, [(str(f), f) for f in folders], "--out")
    readers = [merge._open_checkpoint(merge.resolve_input(f)) for f in folders]
    first = readers[0]
    names = sorted((n for n in first.names() if not merge._SKIPPED.match(n)), key=merge._natural_key)
    for folder, reader in zip(folders[1:], readers[1:]):
        for n in names:
            if n not in reader.names() or reader.shape(n) != first.shape(n):
                raise merge.MergeError(f"tensor {n}: missing or of another shape in {folder} than in {folders[0]}")
    out_dtype = recipe.out_dtype or recipe.dtype
    dtype_of = lambda n: merge.DTYPES[out_dtype] if out_dtype else first.dtype(n)
    plans = [(n, first.shape(n), dtype_of(n)) for n in names]
    nbytes = lambda p: int(np.prod(p[1])) * p[2].itemsize
    shards = safetensors_io.plan_shards(plans, nbytes, hf.parse_size(max_shard_size))
    layers = hf.read_config(folders[0]).num_hidden_layers
    read_as = merge.DTYPES[recipe.dtype] if recipe.dtype else None

    def fill(tmp: Path) -> None:
        writer = merge_io.ChunkWriter(max(nbytes(p) for p in plans))
        for shard, fname in zip(shards, safetensors_io.shard_names(len(shards))):
            f = writer.open(tmp / fname)
            header = safetensors_io.header(list(shard))
            writer.write(f, np.frombuffer(header, np.uint8))
            for name, _, dtype in shard:
                arrays = [_read_whole(r, name) for r in readers]
                if read_as is not None:
                    arrays = [merge._cast(a, read_as) for a in arrays]
                base, models = (arrays[0], arrays[1:]) if recipe.base else (None, arrays)
                merged = merge_tensor(recipe, name, base, models, layers, seed)
                writer.write(f, merge._cast(merged, dtype))
            writer.finish(f, len(header) + sum(nbytes(p) for p in shard))
        writer.drain()
        writer.close()
        safetensors_io.write_index(tmp, [[p[0] for p in shard] for shard in shards], sum(map(nbytes, plans)))
        config = json.loads((folders[0] / "config.json").read_text())
        if out_dtype:
            for key in ("dtype", "torch_dtype"):
                if key in config:
                    config[key] = out_dtype
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        hf.copy_tokenizer(folders[0], tmp)
        for extra in merge._EXTRA_FILES:
            if (folders[0] / extra).exists():
                shutil.copy2(folders[0] / extra, tmp / extra)
        (tmp / merge.PROVENANCE_NAME).write_text(json.dumps(provenance, indent=2))

    provenance = {"method": f"{recipe.method} (c2f_jax.merge.methods, as mergekit 0.1.5)",
                  "recipe": str(recipe.source.resolve()) if recipe.source else None, "base": str(recipe.base) if recipe.base else None,
                  "models": [{"model": str(m), "parameters": p} for m, p in recipe.models],
                  "parameters": recipe.parameters, "seed": seed, "dtype": recipe.dtype, "out_dtype": out_dtype,
                  "tensors": len(plans)}
    workdir.write(out, fill, overwrite, folder=True)
    return provenance
