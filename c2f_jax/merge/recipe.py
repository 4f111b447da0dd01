"""Merging by a mergekit YAML recipe: `python tools/merge.py --config merge.yml --out DIR`.

Reads mergekit's format for the methods of c2f_jax.merge.methods (and linear):

    merge_method: slerp | linear | task_arithmetic | ties | dare_linear | dare_ties
    base_model: FOLDER                 # slerp: the t = 0 end; task vectors: what the deltas are taken from
    models:
      - model: FOLDER
        parameters: {weight: 0.7, density: 0.5}
    parameters: {t: 0.3, normalize: true, lambda: 1.0}
    dtype: float32                     # the inputs are read as this (the task-vector methods compute in it)
    out_dtype: bfloat16                # default: dtype, else each tensor as the base model stores it
    tokenizer_source: base

A value may be a list, a gradient over the layers as mergekit reads it (layer i of L at position i / (L - 1),
tensors outside the layers at 0). Any other key, or a per-tensor filter, is refused in one line naming it.
Tensors stream through in chunks, as the linear merge's do, so memory holds a few chunks whatever the model's
size; SLERP, TIES and DARE first read a tensor in counting passes for what they need of it whole (norms and
dot product, a magnitude threshold, L1 sums). DARE's drops come from `seed`, recorded in merge_provenance.json.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np

from c2f_jax.merge import merge, merge_io, methods
from c2f_jax.model import hf, safetensors_io
from c2f_jax.model.safetensors_io import SafetensorsError
from c2f_jax.runtime import workdir

TOP_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source"}
SHARED = {
    "slerp": {"t"},
    "linear": {"normalize"},
    "task_arithmetic": {"normalize", "lambda", "int8_mask"},
    "ties": {"normalize", "lambda", "int8_mask"},
    "dare_linear": {"normalize", "lambda", "rescale"},
    "dare_ties": {"normalize", "lambda", "rescale", "int8_mask"},
}
PER_MODEL = {"slerp": set(), "linear": {"weight"}, **{m: {"weight", "density"} for m in methods.METHODS}}
_LAYER = re.compile(r"\.layers\.(\d+)\.")
MAX_RECIPE_BYTES = 1 << 20
MAX_RECIPE_NODES = 100_000


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
    params = {} if params is None else params
    if not isinstance(params, dict):
        _fail(source, f"{where}: expected a mapping of settings, found {type(params).__name__}")
    for key, value in params.items():
        if key not in allowed:
            _fail(source, f"{where}: unsupported key {key!r} for {method}")
        if isinstance(value, list):
            if not value or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
                _fail(
                    source,
                    f"{where}.{key}: a list must hold numbers (a gradient); filters per tensor are not supported",
                )
        elif not isinstance(value, (int, float, bool)):
            _fail(source, f"{where}.{key}: {value!r} is not supported (a number, a boolean or a list of numbers)")
        values = value if isinstance(value, list) else [value]
        if not all(math.isfinite(v) for v in values):
            _fail(source, f"{where}.{key}: {value!r} is not a finite number")
        if key == "density" and not all(0 < v <= 1 for v in values):
            _fail(source, f"{where}.{key}: {value!r} must be in (0, 1] (the share of each delta kept)")
    return params


def _expanded_size(root) -> int:
    """The number of nodes a composed YAML document has with every alias expanded (memoised per node)."""
    sizes: dict[int, int] = {}

    def size(node) -> int:
        if id(node) not in sizes:
            sizes[id(node)] = 1  # a node that holds itself counts once, not forever
            value = node.value if isinstance(node.value, list) else []
            children = [c for item in value for c in (item if isinstance(item, tuple) else (item,))]
            sizes[id(node)] = 1 + sum(size(c) for c in children)
        return sizes[id(node)]

    return 0 if root is None else size(root)


def _load_yaml(path: Path):
    """The YAML document in `path`, bounded in size, before and after its aliases expand."""
    import yaml

    try:
        if path.stat().st_size > MAX_RECIPE_BYTES:
            _fail(path, f"{path.stat().st_size} bytes; a recipe is at most {MAX_RECIPE_BYTES} bytes")
        text = path.read_text()
        # Aliases of nodes holding aliases grow a small file exponentially ("billion laughs"): bound the size
        # the document has once its aliases are expanded, counted on the node graph without expanding it.
        nodes = _expanded_size(yaml.compose(text, Loader=yaml.SafeLoader))
        if nodes > MAX_RECIPE_NODES:
            _fail(path, f"expands to {nodes} YAML nodes through its aliases; a recipe may have {MAX_RECIPE_NODES}")
        doc = yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        _fail(path, f"not a readable YAML file ({str(e).splitlines()[0]})")
    return doc


def read_recipe(path) -> Recipe:
    """The recipe in mergekit YAML file `path`; a MergeError naming the first thing we do not support."""
    path = Path(path)
    doc = _load_yaml(path)
    if not isinstance(doc, dict):
        _fail(path, "not a mergekit recipe (a mapping with merge_method)")
    for key in doc:
        if key not in TOP_KEYS:
            _fail(path, f"unsupported key {key!r} (supported: {', '.join(sorted(TOP_KEYS))})")
    for key in ("merge_method", "dtype", "out_dtype", "tokenizer_source", "base_model"):
        if doc.get(key) is not None and not isinstance(doc[key], str):
            _fail(path, f"{key}: {doc[key]!r} is not a string")
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
    if not isinstance(doc.get("models") or [], list):
        _fail(path, "models: expected a list of {model: FOLDER, parameters: {...}}")
    for i, entry in enumerate(doc.get("models") or []):
        if not isinstance(entry, dict) or not isinstance(entry.get("model"), str) or not entry["model"]:
            _fail(path, f"models[{i}]: expected a mapping with 'model: FOLDER'")
        for key in entry:
            if key not in ("model", "parameters"):
                _fail(path, f"models[{i}]: unsupported key {key!r}")
        params = _parameters(path, f"models[{i}].parameters", entry.get("parameters"), PER_MODEL[method], method)
        if base is not None and Path(entry["model"]) == base and method != "linear":
            continue  # the base listed among the models, as mergekit's examples do
        models.append((Path(entry["model"]), params))
    want = 1 if method == "slerp" else None
    if not models or (want and len(models) != want):
        _fail(
            path,
            f"{method} needs {'one model besides the base' if want else 'at least one model'}; found {len(models)}",
        )
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


def merger_for(recipe: Recipe, name: str, size: int, layers: int, seed: int, stored=None):
    """The c2f_jax.merge.methods merger of one tensor (`size` entries) by the recipe, its settings read at the
    tensor's place among the layers; `stored` is the dtype the first input stores it in (the task-vector
    methods compute in the recipe's dtype, else in that one, as mergekit does)."""
    at = position(name, layers)
    shared = {k: value_at(v, at) for k, v in recipe.parameters.items()}
    per = [{k: value_at(v, at) for k, v in p.items()} for _, p in recipe.models]
    if recipe.method == "slerp":
        return methods.Slerp(shared["t"])
    weights = [p["weight"] for p in per]
    if recipe.method == "linear":
        if shared.get("normalize", True) and sum(weights) == 0:
            _fail(recipe.source, f"tensor {name}: the weights sum to 0, and normalize divides by their sum")
        return methods.Linear(weights, shared.get("normalize", True))
    return methods.TaskVectors(
        recipe.method,
        weights,
        size,
        [p.get("density", 1.0) for p in per],
        lam=shared.get("lambda", 1.0),
        normalize=shared.get("normalize"),
        seed=seed,
        tensor=name,
        dtype=merge.DTYPES[recipe.dtype] if recipe.dtype else stored,
        rescale=shared.get("rescale"),
    )


@dataclasses.dataclass(frozen=True)
class _Tensor:
    name: str
    shape: tuple[int, ...]
    out_dtype: np.dtype

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def out_nbytes(self) -> int:
        return self.size * self.out_dtype.itemsize


def _chunk_jobs(shards, mergers: dict, chunk: int) -> tuple[list[tuple], list[bool]]:
    """Every chunk each input reader yields, in order: (tensor, start, count), a tensor's counting passes, then
    its output pass; and whether each is a tensor's first pass (the inputs' sha256 is taken there, where the
    arithmetic leaves the CPU most room)."""
    jobs, first_pass = [], []
    for shard in shards:
        for t in shard:
            for p in range(mergers[t.name].counting_passes + 1):
                for start in range(0, t.size, chunk):
                    jobs.append((t, start, min(chunk, t.size - start)))
                    first_pass.append(p == 0)
    return jobs, first_pass


def _copy_model_files(source: Path, folder: Path, out_dtype: str | None) -> None:
    """config.json (its dtype set to `out_dtype` when given), the tokenizer and the generation files."""
    config = json.loads((source / "config.json").read_text())
    if out_dtype:
        for key in ("dtype", "torch_dtype"):
            if key in config:
                config[key] = out_dtype
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    hf.copy_tokenizer(source, folder)
    for extra in merge._EXTRA_FILES:
        if (source / extra).exists():
            shutil.copy2(source / extra, folder / extra)


def _tensor_names(folders: list[Path], readers: list) -> list[str]:
    """The first input's tensor names to merge, in natural order, each checked present with the same shape in
    every other input."""
    first = readers[0]
    names = sorted((n for n in first.names() if not merge._SKIPPED.match(n)), key=merge._natural_key)
    for folder, reader in zip(folders[1:], readers[1:]):
        for n in names:
            if n not in reader.names() or reader.shape(n) != first.shape(n):
                raise merge.MergeError(f"tensor {n}: missing or of another shape in {folder} than in {folders[0]}")
    return names


def _merge_tensor(t: _Tensor, merger, chunks, count: int, as_f32, writer: merge_io.ChunkWriter, f) -> None:
    """One tensor through `merger`: its counting passes, then its output pass written to `f`; each pass takes
    the next `count` (job, *input chunks) of the `chunks` stream."""
    for p in range(merger.counting_passes):
        for (_, start, _), *arrays in itertools.islice(chunks, count):
            merger.observe(p, start, [as_f32(a) for a in arrays])
    for (_, start, _), *arrays in itertools.islice(chunks, count):
        merged = merger.merge(start, [as_f32(a) for a in arrays])
        buffer = writer.buffer(merged.shape, t.out_dtype)
        np.copyto(buffer, merged, casting="unsafe")  # round to nearest even, as astype does
        writer.write(f, buffer)


def _provenance(recipe: Recipe, seed: int, out_dtype: str | None, tensors: int, inputs: list[Path]) -> dict:
    """merge_provenance.json's content, before the inputs' sha256 (added once they are read)."""
    return {
        "method": f"{recipe.method} (c2f_jax.merge.methods, as mergekit 0.1.5)",
        "recipe": str(recipe.source.resolve()) if recipe.source else None,
        "base": str(recipe.base) if recipe.base else None,
        "models": [{"model": str(m), "parameters": p} for m, p in recipe.models],
        "parameters": recipe.parameters,
        "seed": seed,
        "dtype": recipe.dtype,
        "out_dtype": out_dtype,
        "tensors": tensors,
        "inputs": [{"path": str(f.resolve())} for f in inputs],
        "sha256_covers": "each input tensor's 'name|dtype|shape' line and bytes, in natural name order "
        "(a tensor of no elements is left out)",
    }


def write_recipe(
    recipe: Recipe,
    out,
    seed: int = 0,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    chunk_bytes: int = merge_io.CHUNK_BYTES,
) -> dict:
    """Merges by `recipe` into the HF folder `out` (written under a temporary name, renamed when whole): the
    tensors, the base model's (or first model's) config.json, tokenizer and generation files, and
    merge_provenance.json (with each input's sha256, as the linear merge records them). Returns the provenance.

    Tensors stream through in chunks of `chunk_bytes` of float32, as in the linear merge: a method's counting
    passes read a tensor's chunks first (c2f_jax.merge.methods), then its output pass reads them again and
    writes the merged chunks; the inputs' readers run one chunk ahead through all passes alike."""
    out = Path(out)
    folders = ([recipe.base] if recipe.base else []) + [m for m, _ in recipe.models]
    try:
        workdir.check_output(out, [(str(f), f) for f in folders], "--out", overwrite=overwrite)
    except workdir.WorkdirError as e:
        raise merge.MergeError(str(e)) from None
    readers = [merge._open_checkpoint(merge.resolve_input(f)) for f in folders]
    first = readers[0]
    # linear merges its models only, as mergekit's ignores a base_model that is not among them
    inputs = list(zip(folders, readers))[1 if recipe.method == "linear" and recipe.base else 0 :]
    names = _tensor_names(folders, readers)
    out_dtype = recipe.out_dtype or recipe.dtype
    tensors = [_Tensor(n, first.shape(n), merge.DTYPES[out_dtype] if out_dtype else first.dtype(n)) for n in names]
    shards = safetensors_io.plan_shards(tensors, lambda t: t.out_nbytes, hf.parse_size(max_shard_size))
    layers = hf.read_config(folders[0]).num_hidden_layers
    read_as = merge.DTYPES[recipe.dtype] if recipe.dtype else None
    chunk = max(4, chunk_bytes // 16 * 4)  # elements, a multiple of 4 (DARE's draws come four to 64 bits)
    mergers = {t.name: merger_for(recipe, t.name, t.size, layers, seed, inputs[0][1].dtype(t.name)) for t in tensors}
    jobs, first_pass = _chunk_jobs(shards, mergers, chunk)

    def as_f32(x: np.ndarray) -> np.ndarray:
        return (merge._cast(x, read_as) if read_as is not None else x).astype(np.float32, copy=False)

    def fill(tmp: Path) -> None:
        merge_io.reuse_freed_memory()
        streams = [merge_io.ChunkReader(r, {t.name: r.dtype(t.name) for t in tensors}, chunk) for _, r in inputs]
        writer = merge_io.ChunkWriter(chunk * max(t.out_dtype.itemsize for t in tensors))
        with contextlib.ExitStack() as closing:
            for c in (*streams, writer):
                closing.callback(c.close)
            chunks = zip(jobs, *(s.chunks(jobs, hashed=first_pass) for s in streams))
            for shard, fname in zip(shards, safetensors_io.shard_names(len(shards))):
                f = writer.open(tmp / fname)
                header = safetensors_io.header([(t.name, t.shape, t.out_dtype) for t in shard])
                writer.write(f, np.frombuffer(header, np.uint8))
                for t in shard:
                    _merge_tensor(t, mergers.pop(t.name), chunks, -(-t.size // chunk), as_f32, writer, f)
                writer.finish(f, len(header) + sum(t.out_nbytes for t in shard))
            writer.drain()
        for entry, s in zip(provenance["inputs"], streams):
            entry["sha256"] = s.sha.hexdigest()
        safetensors_io.write_index(
            tmp, [[t.name for t in shard] for shard in shards], sum(t.out_nbytes for t in tensors)
        )
        _copy_model_files(folders[0], tmp, out_dtype)
        (tmp / merge.PROVENANCE_NAME).write_text(json.dumps(provenance, indent=2))

    provenance = _provenance(recipe, seed, out_dtype, len(tensors), [f for f, _ in inputs])
    try:
        workdir.write(out, fill, overwrite, folder=True)
    except SafetensorsError as e:  # an input that changed or broke after it was checked
        raise merge.MergeError(str(e)) from None
    return provenance
