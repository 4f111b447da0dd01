"""The merger's threaded I/O: input chunks read (and hashed) one ahead, results written behind, and the
work buffers the arithmetic reuses. c2f_jax.merge.merge decides what to read and write; this moves the bytes.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from c2f_jax.model import safetensors_io
from c2f_jax.model.safetensors_io import CODES, SafetensorsError

# Read and merged this many bytes of float32 at a time: big enough that per-chunk overhead vanishes,
# small enough that every buffer in flight (two reads per input, scratch, three writes) stays in the
# CPU's last-level cache (the sizes tried are in the README, "Measurements behind the code's choices").
CHUNK_BYTES = 2 << 20


class Scratch:
    """Work buffers that `merge.lerp` reuses for chunks of up to `size` elements.

    A fresh multi-MB array per chunk costs a page fault per 4 KiB, which is more than the arithmetic.
    """

    def __init__(self, size: int):
        # Two float32 products, and the result in the output dtype (8 bytes, should that be float64).
        self.buffers = [np.empty(size * 4, np.uint8), np.empty(size * 4, np.uint8), np.empty(size * 8, np.uint8)]

    def take(self, i: int, shape: tuple[int, ...], dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        return self.buffers[i][: math.prod(shape) * dtype.itemsize].view(dtype).reshape(shape)


def reuse_freed_memory() -> None:
    """Has glibc's malloc keep freed blocks of up to 32 MiB for reuse rather than hand them back to the system.

    The recipe methods' NumPy temporaries, a few per chunk, would otherwise each be fresh pages: one page fault
    per 4 KiB, 245,000 in a 1 GB SLERP (README, "Beyond linear"). Process-wide, and a no-op where malloc is not
    glibc's.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_TRIM_THRESHOLD, 128 << 20)  # set, these also fix the dynamic mmap threshold...
        libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)  # ...so it is raised too (32 MiB is glibc's ceiling)
    except (OSError, AttributeError):
        pass


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h


class ChunkReader:
    """One input's tensor chunks, in merge order, read and hashed one chunk ahead on a worker thread.

    Reads go through pread into two alternating buffers rather than through the memmaps: the pages a memmap
    has touched count towards RSS until it is unmapped, which for the embedding alone is a noticeable slice
    of a model. Hashing on the worker keeps sha256, the costliest step, off the main thread.
    """

    def __init__(self, reader, dtypes: dict[str, np.dtype], chunk: int):
        """reader: an hf.CheckpointReader; dtypes: each tensor's stored dtype; chunk: elements per read."""
        self.reader, self.dtypes = reader, dtypes
        itemsize = max((d.itemsize for d in dtypes.values()), default=1)
        self.buffers = [np.empty(chunk * itemsize, np.uint8) for _ in range(2)]
        self.sha = hashlib.sha256()
        self.fds: dict[Path, int] = {}
        self.places: dict[str, tuple[Path, int]] = {}
        self.pool = ThreadPoolExecutor(1)

    def close(self) -> None:
        self.pool.shutdown(cancel_futures=True)
        for fd in self.fds.values():
            os.close(fd)

    def chunks(self, jobs: list[tuple], hashed: list[bool] | None = None):
        """Yields the stored-dtype array of each (tensor, start, count) job (tensor: anything with the name and
        shape of the tensor); each array is valid until the next. `hashed` says which jobs count towards
        `sha` (default all; a tensor read more than once counts once)."""
        hashed = hashed or [True] * len(jobs)
        pending = self.pool.submit(self._load, 0, *jobs[0], hashed[0]) if jobs else None
        for i in range(len(jobs)):
            chunk = pending.result()
            if i + 1 < len(jobs):  # the consumer is done with the other buffer: fill it meanwhile
                pending = self.pool.submit(self._load, (i + 1) % 2, *jobs[i + 1], hashed[i + 1])
            yield chunk

    def _load(self, slot: int, t, start: int, count: int, hashed: bool) -> np.ndarray:
        dtype = self.dtypes[t.name]
        if start == 0 and hashed:
            self.sha.update(f"{t.name}|{CODES[dtype]}|{list(t.shape)}\n".encode())
        if t.name not in self.places:
            m = self.reader.get(t.name)  # a memmap, used only for its file name and data offset; no page is touched
            self.places[t.name] = (Path(m.filename), m.offset)
        path, offset = self.places[t.name]
        if path not in self.fds:
            self.fds[path] = os.open(path, os.O_RDONLY)
        raw = self.buffers[slot][: count * dtype.itemsize]
        view, done, offset = memoryview(raw), 0, offset + start * dtype.itemsize
        try:
            while done < raw.nbytes:
                n = os.preadv(self.fds[path], [view[done:]], offset + done)
                if n == 0:
                    raise SafetensorsError(f"{path}: truncated while reading tensor {t.name}")
                done += n
        except OSError as e:
            raise SafetensorsError(f"{path}: cannot read tensor {t.name}: {e}") from None
        if hashed:  # once per tensor chunk, on this worker, where the hash already reads every byte
            self.sha.update(raw)
            safetensors_io.check_finite(raw.view(dtype), t.name, path)
        return raw.view(dtype)


class ChunkWriter:
    """Writes behind the arithmetic on one thread, in order: the merge computes chunk i+1 while chunk i is
    written, and a finished shard is fsync'd and closed there too.

    Results go into a small ring of output buffers; taking a buffer waits for the write that last used it.
    """

    RING = 3

    def __init__(self, nbytes: int):
        self.pool = ThreadPoolExecutor(1)
        self.ring = [np.empty(nbytes, np.uint8) for _ in range(self.RING)]
        self.busy = [None] * self.RING  # the write future that last used each buffer
        self.next = 0
        self.futures: list = []
        self.files: list = []

    def open(self, path: Path):
        self.files.append(open(path, "wb", buffering=0))
        return self.files[-1]

    def buffer(self, shape: tuple[int, ...], dtype) -> np.ndarray:
        """The next ring buffer as an array of `shape` and `dtype`, once its last write is done."""
        k, self.next = self.next, (self.next + 1) % self.RING
        if self.busy[k] is not None:
            self.busy[k].result()
            self.busy[k] = None
        dtype = np.dtype(dtype)
        return self.ring[k][: math.prod(shape) * dtype.itemsize].view(dtype).reshape(shape)

    def write(self, f, x: np.ndarray) -> None:
        """Queues x for f; x must stay untouched until written (a ring buffer, or memory nobody reuses)."""
        future = self.pool.submit(_write_all, f, x)
        for k, r in enumerate(self.ring):
            if np.shares_memory(x, r):
                self.busy[k] = future
        self._track(future)

    def finish(self, f, size: int) -> None:
        self._track(self.pool.submit(self._finish, f, size))

    @staticmethod
    def _finish(f, size: int) -> None:
        try:
            if f.tell() != size:
                raise RuntimeError(f"{f.name}: wrote {f.tell()} bytes, planned {size} (a bug)")
            os.fsync(f.fileno())
        finally:
            f.close()

    def _track(self, future) -> None:
        self.futures.append(future)
        # Surface a failed write early (disk full) instead of after the whole model.
        while self.futures and self.futures[0].done():
            self.futures.pop(0).result()

    def drain(self) -> None:
        while self.futures:
            self.futures.pop(0).result()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        for f in self.files:  # after an error: files whose shard never finished
            f.close()


def _write_all(f, x: np.ndarray) -> None:
    view, done = memoryview(x.reshape(-1).view(np.uint8)), 0
    while done < len(view):  # a raw file may write less than asked
        done += f.write(view[done:])
