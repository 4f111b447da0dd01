"""Safetensors read/write with NumPy memory maps (bfloat16 included, via ml_dtypes), and the layout of a
checkpoint folder in them: shard plan, shard file names, index file, header bytes (hf, the merger and the
benchmarks all write through these).

Our own small reader instead of `safetensors.numpy` because that one has no
bfloat16, and because we want a precise one-line error for a truncated or
corrupt file before any tensor is used. Files written here load in
`safetensors`/transformers unchanged. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from c2f_jax.model.config import DtypeTable

# Each safetensors dtype code and the NumPy dtype it stands for, resolved when first used: bfloat16 and the
# float8 types come from ml_dtypes, whose import the float32-only tools should not pay (config.np_dtype).
_DTYPE_NAMES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


class _Codes(Mapping):
    """np.dtype -> code."""

    _BY_NAME = {name: code for code, name in _DTYPE_NAMES.items()}

    def __getitem__(self, dtype) -> str:
        dtype = np.dtype(dtype)
        if not dtype.isnative and dtype.itemsize > 1:  # safetensors is little-endian, as NumPy is here
            raise KeyError(dtype)
        return self._BY_NAME[dtype.name]

    def __iter__(self):
        return (DTYPES[code] for code in _DTYPE_NAMES)

    def __len__(self) -> int:
        return len(_DTYPE_NAMES)


DTYPES, CODES = DtypeTable(_DTYPE_NAMES), _Codes()
_MAX_HEADER = 100 * 1024 * 1024
SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
SHARD_NAME = re.compile(r"model-\d+-of-\d+\.safetensors$")


class SafetensorsError(ValueError):
    """A safetensors file that is missing, truncated or malformed, or a tensor holding NaN or infinity."""


def check_finite(values: np.ndarray, name: str, path) -> None:
    """A SafetensorsError naming the tensor and file when floating-point `values` hold a NaN or an infinity:
    training, a merge, an export or an evaluation of such a model would spread them silently. Called on each
    tensor (or chunk) as it is read, not in a pass of its own."""
    if values.dtype.kind in "iub":
        return
    if not np.isfinite(values).all():
        raise SafetensorsError(f"{path}: tensor {name} holds NaN or infinite values")


class SafetensorsFile:
    """A lazily read safetensors file: `names()`, `shape(name)`, `dtype(name)`, `get(name)` (a read-only memmap)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise SafetensorsError(f"{self.path}: truncated (shorter than the 8-byte header length)")
                (n,) = struct.unpack("<Q", head)
                if n > _MAX_HEADER or 8 + n > size:
                    raise SafetensorsError(f"{self.path}: truncated or corrupt (header length {n}, file size {size})")
                header = json.loads(f.read(n))
        except FileNotFoundError:
            raise SafetensorsError(f"{self.path}: file not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise SafetensorsError(f"{self.path}: corrupt header (not JSON)") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self._entries = header
        self._data_start = 8 + n
        end = 0
        for name, e in header.items():
            if not isinstance(e, dict) or e.get("dtype") not in DTYPES or "data_offsets" not in e:
                raise SafetensorsError(f"{self.path}: corrupt header entry for tensor {name!r}")
            begin, stop = e["data_offsets"]
            expected = nbytes(e["shape"], DTYPES[e["dtype"]])
            if stop - begin != expected:
                raise SafetensorsError(f"{self.path}: tensor {name!r} has {stop - begin} bytes, shape needs {expected}")
            end = max(end, stop)
        if self._data_start + end > size:
            raise SafetensorsError(
                f"{self.path}: truncated: header declares {end} bytes of tensor data, file holds {size - self._data_start}"
            )

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        return DTYPES[self._entries[name]["dtype"]]

    def nbytes(self, name: str) -> int:
        begin, stop = self._entries[name]["data_offsets"]
        return stop - begin

    def get(self, name: str) -> np.ndarray:
        e = self._entries[name]
        begin, stop = e["data_offsets"]
        dtype, shape = DTYPES[e["dtype"]], tuple(e["shape"])
        if stop == begin:
            return np.zeros(shape, dtype)
        return np.memmap(self.path, dtype=dtype, mode="r", offset=self._data_start + begin, shape=shape)


def nbytes(shape, dtype) -> int:
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def header(tensors, metadata: dict | None = None) -> bytes:
    """The bytes a safetensors file starts with, for (name, shape, dtype) laid out in this order: the
    header's length, then the header (metadata first), padded to 8 bytes."""
    head: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, shape, dtype in tensors:
        size = nbytes(shape, dtype)
        head[name] = {"dtype": CODES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(head, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep tensor data 8-byte aligned, as the reference writer does
    return struct.pack("<Q", len(blob)) + blob


def write_file(path: str | os.PathLike, tensors, metadata: dict | None = None) -> None:
    """Writes (name, array) pairs to `path`, one tensor in memory at a time.

    `tensors` is a list of (name, shape, dtype, produce) where produce() returns the
    array; the header is written first from shapes alone, so nothing is buffered.
    """
    with open(path, "wb") as f:
        f.write(header([(name, shape, dtype) for name, shape, dtype, _ in tensors], metadata))
        for name, shape, dtype, produce in tensors:
            arr = np.ascontiguousarray(produce())
            if arr.shape != tuple(shape) or arr.dtype != np.dtype(dtype):
                raise SafetensorsError(
                    f"{path}: tensor {name!r} produced {arr.shape}/{arr.dtype}, declared {shape}/{dtype}"
                )
            f.write(arr.reshape(-1).view(np.uint8).data)  # no copy
        f.flush()
        os.fsync(f.fileno())


# ----------------------------------------------------------------------------- a checkpoint folder


def plan_shards(items: list, size, max_bytes: int) -> list[list]:
    """`items`, in order, cut into shards of at most `max_bytes` as counted by size(item); an item larger
    than that has a shard of its own."""
    shards, current, total = [], [], 0
    for item in items:
        n = size(item)
        if current and total + n > max_bytes:
            shards.append(current)
            current, total = [], 0
        current.append(item)
        total += n
    return shards + [current] if current else shards


def shard_names(count: int) -> list[str]:
    """The file names of a checkpoint in `count` shards, as transformers names them."""
    if count == 1:
        return [SINGLE_NAME]
    return [f"model-{k + 1:05d}-of-{count:05d}.safetensors" for k in range(count)]


def write_index(folder: str | os.PathLike, shards: list[list[str]], total_size: int) -> None:
    """INDEX_NAME for tensors grouped by shard (tensor names, the files as `shard_names` names them),
    when there is more than one shard: a lone model.safetensors has no index."""
    if len(shards) < 2:
        return
    weight_map = {name: fname for fname, names in zip(shard_names(len(shards)), shards) for name in names}
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (Path(folder) / INDEX_NAME).write_text(json.dumps(index, indent=2))


def write_checkpoint(folder: str | os.PathLike, tensors, max_bytes: int) -> None:
    """`tensors` ((name, shape, dtype, produce), as for write_file) into `folder` as shards of at most
    `max_bytes`, plus the index when there is more than one."""
    size = lambda t: nbytes(t[1], t[2])
    shards = plan_shards(tensors, size, max_bytes)
    for fname, shard in zip(shard_names(len(shards)), shards):
        write_file(Path(folder) / fname, shard)
    write_index(folder, [[t[0] for t in shard] for shard in shards], sum(map(size, tensors)))
