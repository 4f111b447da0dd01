"""Shared test setup: fake CPU devices for sharding tests, a persistent compile cache, tiny HF models."""

import os

# Must precede the first `import jax` anywhere in the test session.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import jax
import numpy as np
import pytest
import torch

_CACHE = Path(__file__).resolve().parent.parent / ".jax_cache"
jax.config.update("jax_compilation_cache_dir", str(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
torch.set_num_threads(2)


def hf_config(**kw):
    """A tiny transformers MistralConfig; keyword arguments override."""
    from transformers import MistralConfig

    base = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=8,
        rms_norm_eps=1e-5,
        max_position_embeddings=512,
    )
    base.update(kw)
    return MistralConfig(**base)


def hf_model(cls_name="MistralForCausalLM", seed=0, dtype=torch.float32, **kw):
    import transformers

    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(hf_config(**kw)).eval().to(dtype)
    # Random norm weights, so a transposed or skipped norm cannot hide behind all-ones.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
    return model


def left_padded_batch(vocab, batch=3, length=24, pads=(0, 5, 11), seed=0):
    """int64 ids [B, T], mask [B, T] with row b left-padded by pads[b], position ids [B, T]."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(3, vocab, (batch, length))
    mask = np.ones_like(ids)
    for b, p in enumerate(pads[:batch]):
        mask[b, :p] = 0
        ids[b, :p] = 0
    positions = np.maximum(mask.cumsum(-1) - 1, 0)
    return ids, mask, positions


@pytest.fixture(scope="session")
def tmp_root(tmp_path_factory):
    return tmp_path_factory.mktemp("c2f")


ROOT = Path(__file__).resolve().parent.parent
# A short demo: 3 buckets, CM allowed to move every 2 steps, a checkpoint after every step.
SHORT = [
    "--config.steps=8",
    "--config.checkpoint_every=1",
    "--config.keep_checkpoints=8",
    "--config.model.pretrain_steps=30",
    "--config.reward_model.train.steps=20",
    "--config.cm.buckets=(8, 12, 16)",
    "--config.cm.window=2",
    "--config.cm.min_steps=2",
    "--config.cm.threshold=0.01",
    "--config.data.prompt_buckets=(128,)",
    "--config.mesh.data=2",
    "--config.mesh.fsdp=2",
    "--config.mesh.tensor=2",
]  # sharded over 8 fake devices


TIMING_KEYS = ("time/", "compilations")


def comparable(rows):
    """Metrics rows without the wall-clock and compile-count entries, which differ between equal runs."""
    return [{k: v for k, v in r.items() if not k.startswith(TIMING_KEYS)} for r in rows]


def assert_ends_as(path, reference) -> None:
    """The run in `path` logged the same metrics and holds the same final state as `reference`, bit for bit."""
    from c2f_jax.runtime import checkpoint, metrics

    assert comparable(metrics.read_metrics(path)) == comparable(metrics.read_metrics(reference))
    a, _ = checkpoint.Checkpointer(path).restore()
    b, _ = checkpoint.Checkpointer(reference).restore()
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b and len(leaves_a) > 10
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(leaves_a, leaves_b))


def cli_env():
    env = dict(os.environ)
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(ROOT / ".jax_cache"))
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
    return env


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """One uninterrupted short demo run, in process, on 8 devices (shared by the single- and multi-process tests)."""
    from c2f_jax import train
    from c2f_jax.jobs import coarse

    workdir = tmp_path_factory.mktemp("demo") / "run"
    config, _ = train.parse_args(["--config", "tiny_coarse.py", *SHORT])
    rows = coarse.run_coarse(config, workdir, show_progress=False)
    return workdir, rows


@pytest.fixture
def small_disk(tmp_path):
    """A 100 MB tmpfs (mounting needs root; skipped, saying why, where refused), for full-disk tests."""
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=100M", "tmpfs", str(disk)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"a full disk is a small tmpfs, and `mount -t tmpfs` was refused: {done.stderr.strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk: Path, leave: int = 0) -> Path:
    """Takes all of `disk`'s free space but `leave` bytes, in one file (returned: unlink it to free the space)."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        st = os.statvfs(disk)
        size = st.f_bavail * st.f_frsize - leave
        while size > 0:
            try:
                os.posix_fallocate(fd, os.fstat(fd).st_size, size)
                break
            except OSError:  # the filesystem's own bookkeeping takes a little: take a little less
                size -= 1 << 16
    finally:
        os.close(fd)
    return filler
