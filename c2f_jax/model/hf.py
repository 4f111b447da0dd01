"""Hugging Face folders <-> (MistralConfig, params).

Tensors stream one at a time in both directions: loading fills one stacked
param (all layers of, say, q_proj) on the host, places it, and frees it, so a
14.5 GB checkpoint needs about one model of host RAM. Only safetensors are read.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from c2f_jax.model import safetensors_io
from c2f_jax.model.config import ConfigError, MistralConfig, Params, dtype_name, np_dtype
from c2f_jax.model.safetensors_io import INDEX_NAME, SINGLE_NAME, SafetensorsError, SafetensorsFile, write_checkpoint

# JAX is imported only where arrays are placed or fetched, so file-level work (the merger) starts fast.
from c2f_jax.runtime import distributed, workdir

# The dtypes an HF folder we write may store: the ones transformers loads (float8 it does not).
HF_DTYPES = ("float32", "bfloat16", "float16")

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# Buffers some old checkpoints carry; recomputed from the config, never loaded.
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


class HFError(ValueError):
    """A Hugging Face folder we cannot read or write; the message names the file, key or tensor."""


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """How one HF tensor maps onto (a layer slice of) one of our params.

    ours = hf.reshape(hf_split).transpose(perm); hf_shape is the HF tensor's shape.
    """

    path: tuple[str, ...]
    hf_name: str
    layer: int | None
    hf_shape: tuple[int, ...]
    hf_split: tuple[int, ...]
    perm: tuple[int, ...]

    def from_hf(self, w: np.ndarray) -> np.ndarray:
        return w.reshape(self.hf_split).transpose(self.perm)

    def to_hf(self, a: np.ndarray) -> np.ndarray:
        return a.transpose(np.argsort(self.perm)).reshape(self.hf_shape)


def tensor_specs(config: MistralConfig) -> list[TensorSpec]:
    """Every HF tensor of this config, in HF order, with its place in our param tree."""
    c = config
    D, F, V = c.hidden_size, c.intermediate_size, c.vocab_size
    N, K, H = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    specs = [TensorSpec(("embed",), "model.embed_tokens.weight", None, (V, D), (V, D), (0, 1))]
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        specs += [
            TensorSpec(("layers", "attn_norm", "scale"), p + "input_layernorm.weight", i, (D,), (D,), (0,)),
            TensorSpec(("layers", "attn", "q"), p + "self_attn.q_proj.weight", i, (N * H, D), (N, H, D), (2, 0, 1)),
            TensorSpec(("layers", "attn", "k"), p + "self_attn.k_proj.weight", i, (K * H, D), (K, H, D), (2, 0, 1)),
            TensorSpec(("layers", "attn", "v"), p + "self_attn.v_proj.weight", i, (K * H, D), (K, H, D), (2, 0, 1)),
            TensorSpec(("layers", "attn", "o"), p + "self_attn.o_proj.weight", i, (D, N * H), (D, N, H), (1, 2, 0)),
            TensorSpec(("layers", "mlp_norm", "scale"), p + "post_attention_layernorm.weight", i, (D,), (D,), (0,)),
            TensorSpec(("layers", "mlp", "gate"), p + "mlp.gate_proj.weight", i, (F, D), (F, D), (1, 0)),
            TensorSpec(("layers", "mlp", "up"), p + "mlp.up_proj.weight", i, (F, D), (F, D), (1, 0)),
            TensorSpec(("layers", "mlp", "down"), p + "mlp.down_proj.weight", i, (D, F), (D, F), (1, 0)),
        ]
    specs.append(TensorSpec(("final_norm", "scale"), "model.norm.weight", None, (D,), (D,), (0,)))
    if not c.has_lm_head:
        specs.append(TensorSpec(("score",), "score.weight", None, (c.num_labels, D), (c.num_labels, D), (1, 0)))
    elif not c.tie_word_embeddings:
        specs.append(TensorSpec(("lm_head",), "lm_head.weight", None, (V, D), (V, D), (1, 0)))
    return specs


def _param_shape(spec: TensorSpec, config: MistralConfig) -> tuple[int, ...]:
    one = tuple(spec.hf_split[i] for i in spec.perm)
    return one if spec.layer is None else (config.num_hidden_layers, *one)


# ----------------------------------------------------------------------------- reading


def read_config(path: str | os.PathLike, **runtime) -> MistralConfig:
    """MistralConfig from `path/config.json` (runtime fields such as param_dtype passed through)."""
    f = Path(path) / "config.json"
    if not Path(path).is_dir():
        raise HFError(f"{path}: not a model folder")
    try:
        return MistralConfig.from_hf(json.loads(f.read_text()), **runtime)
    except FileNotFoundError:
        raise HFError(f"{f}: missing") from None
    except json.JSONDecodeError as e:
        raise HFError(f"{f}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except ConfigError as e:
        raise HFError(f"{f}: {e}") from None


class CheckpointReader:
    """Name -> tensor lookup over the safetensors files of an HF folder, validated up front."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        index = self.path / INDEX_NAME
        try:
            if index.exists():
                try:
                    weight_map = json.loads(index.read_text())["weight_map"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise HFError(f"{index}: not a valid safetensors index (no weight_map)") from None
                files = {}
                for fname in sorted(set(weight_map.values())):
                    if not (self.path / fname).exists():
                        raise HFError(f"{index}: names shard {fname}, which is missing")
                    files[fname] = SafetensorsFile(self.path / fname)
                for name, fname in weight_map.items():
                    if name not in files[fname]:
                        raise HFError(f"{index}: says {name} is in {fname}, but that file does not hold it")
                self.files = {name: files[fname] for name, fname in weight_map.items()}
            elif (self.path / SINGLE_NAME).exists():
                f = SafetensorsFile(self.path / SINGLE_NAME)
                self.files = {name: f for name in f.names()}
            elif any(self.path.glob("*.bin")) or any(self.path.glob("*.pt")):
                raise HFError(
                    f"{self.path}: only pickle weights (.bin/.pt) found; we read safetensors only, never unpickle"
                )
            else:
                raise HFError(f"{self.path}: no {SINGLE_NAME} or {INDEX_NAME}")
        except SafetensorsError as e:
            raise HFError(str(e)) from None

    def names(self) -> list[str]:
        return list(self.files)

    def where(self, name: str) -> Path:
        return self.files[name].path

    def shape(self, name: str) -> tuple[int, ...]:
        return self.files[name].shape(name)

    def dtype(self, name: str) -> np.dtype:
        return self.files[name].dtype(name)

    def get(self, name: str) -> np.ndarray:
        return self.files[name].get(name)


def check_tensors(reader: CheckpointReader, specs: list[TensorSpec]) -> None:
    """Every expected tensor present with the shape config.json implies, nothing unexpected."""
    expected = {s.hf_name: s for s in specs}
    for s in specs:
        if s.hf_name not in reader.files:
            raise HFError(f"{reader.path}: tensor {s.hf_name} is missing")
        if reader.shape(s.hf_name) != s.hf_shape:
            raise HFError(
                f"{reader.where(s.hf_name)}: tensor {s.hf_name} has shape {reader.shape(s.hf_name)}, "
                f"config.json implies {s.hf_shape}"
            )
    for name in reader.names():
        if name not in expected and not _IGNORED.match(name):
            raise HFError(f"{reader.where(name)}: unexpected tensor {name} for this config")


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get(tree: Params, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def load_pretrained(
    path: str | os.PathLike, dtype="float32", shardings: Params | None = None, **runtime
) -> tuple[MistralConfig, Params]:
    """Reads an HF `MistralForCausalLM` / `MistralForSequenceClassification` folder.

    Returns (config with param_dtype=dtype, params as a nested dict of jax arrays of
    that dtype; "bfloat16" and jnp.bfloat16 alike). `shardings` (a tree like params, of
    `jax.sharding.Sharding`) places each param as it is built. Host memory peaks at the
    placed params plus one stacked param.
    """
    config = read_config(path, param_dtype=dtype_name(dtype), **runtime)  # a bad dtype is not config.json's fault
    reader = CheckpointReader(path)
    specs = tensor_specs(config)
    check_tensors(reader, specs)
    by_param: dict[tuple[str, ...], list[TensorSpec]] = {}
    for s in specs:
        by_param.setdefault(s.path, []).append(s)
    import jax

    params: dict = {}
    target = np_dtype(config.param_dtype)
    for ppath, group in by_param.items():
        buf = np.empty(_param_shape(group[0], config), target)
        for s in group:
            try:
                value = s.from_hf(reader.get(s.hf_name))
            except (OSError, ValueError) as e:
                raise HFError(f"{reader.where(s.hf_name)}: cannot read tensor {s.hf_name}: {e}") from None
            try:
                safetensors_io.check_finite(value, s.hf_name, reader.where(s.hf_name))
            except SafetensorsError as e:
                raise HFError(str(e)) from None
            if s.layer is None:
                buf[...] = value
            else:
                buf[s.layer] = value
        sharding = _get(shardings, ppath) if shardings is not None else None
        _set(params, ppath, jax.device_put(buf, sharding))
        del buf
    return config, params


# ----------------------------------------------------------------------------- writing


def parse_size(size: int | str) -> int:
    """'5GB' -> 5e9, '500MiB' -> 500 * 2**20, ints pass through."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", size, re.IGNORECASE)
    if not m:
        raise HFError(f"max_shard_size={size!r} is not a size such as '5GB' or '500MiB'")
    power = " KMGT".index(m.group(2).upper() or " ")
    return int(float(m.group(1)) * (1024 if m.group(3) else 1000) ** power)


def copy_tokenizer(source, dest: Path) -> None:
    """Tokenizer files from a folder, or any object with `save_pretrained(dir)`."""
    if hasattr(source, "save_pretrained"):
        source.save_pretrained(str(dest))
        return
    for name in TOKENIZER_FILES:
        if (Path(source) / name).exists():
            shutil.copy2(Path(source) / name, dest / name)


def save_pretrained(
    path: str | os.PathLike,
    config: MistralConfig,
    params: Params,
    dtype=None,
    max_shard_size: int | str = "5GB",
    tokenizer_source: Any = None,
    overwrite: bool = False,
) -> None:
    """Writes an HF folder: safetensors shards (+ index when more than one), config.json,
    generation_config.json, and tokenizer files when `tokenizer_source` is given.

    dtype: the tensors' dtype in any spelling; None keeps each param's own. The folder is built
    under a temporary name and renamed into place, so a killed save leaves nothing half-written.
    """
    import jax

    path = Path(path)
    dtype = None if dtype is None else dtype_name(dtype)
    specs = tensor_specs(config)
    host_cache: dict = {}  # one stacked param on the host at a time

    def host(ppath):
        if ppath not in host_cache:
            host_cache.clear()
            host_cache[ppath] = np.asarray(jax.device_get(_get(params, ppath)))
        return host_cache[ppath]

    # Grouped by param (stable, so layers stay in order): each stacked param comes to the host once.
    first_seen = {p: i for i, p in enumerate(dict.fromkeys(s.path for s in specs))}
    entries = []
    for s in sorted(specs, key=lambda s: first_seen[s.path]):
        try:
            leaf = _get(params, s.path)
        except (KeyError, TypeError):
            raise HFError(f"params have no {'/'.join(s.path)} (needed for {s.hf_name})") from None
        if tuple(leaf.shape) != _param_shape(s, config):
            raise HFError(
                f"param {'/'.join(s.path)} has shape {tuple(leaf.shape)}, config implies {_param_shape(s, config)}"
            )
        out_dtype = np_dtype(dtype or leaf.dtype)

        def produce(s=s, out_dtype=out_dtype):
            a = host(s.path)
            return s.to_hf(a if s.layer is None else a[s.layer]).astype(out_dtype)

        entries.append((s.hf_name, s.hf_shape, out_dtype, produce))
    max_bytes = parse_size(max_shard_size)
    config_dtype = dtype or config.param_dtype
    if distributed.writes_here():
        try:
            workdir.check_replaceable(path, overwrite, folder=True)
        except workdir.WorkdirError as e:
            raise HFError(str(e)) from None
    if not path.parent.is_dir():
        raise HFError(f"{path.parent}: parent folder does not exist")

    def fill(tmp: Path) -> None:
        write_checkpoint(tmp, entries, max_bytes)
        (tmp / "config.json").write_text(json.dumps(config.to_hf(config_dtype), indent=2))
        gen = {"bos_token_id": config.bos_token_id, "eos_token_id": config.to_hf()["eos_token_id"]}
        if config.pad_token_id is not None:
            gen["pad_token_id"] = config.pad_token_id
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        if tokenizer_source is not None:
            copy_tokenizer(tokenizer_source, tmp)

    workdir.write(path, fill, overwrite, folder=True)
