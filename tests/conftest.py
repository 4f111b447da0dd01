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
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=8, rms_norm_eps=1e-5, max_position_embeddings=512,
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
