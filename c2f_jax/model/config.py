"""MistralConfig: the architecture (mirrors HF config.json) and how to run it.

Kept free of JAX and Flax so that file-level tools (the merger, HF folder
checks) start in a fraction of a second.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

Params = dict[str, Any]


def _numpy_dtype(dtype) -> np.dtype | None:
    try:
        return None if dtype is None else np.dtype(dtype)  # np.dtype(None) would be float64
    except (TypeError, ValueError):
        return None


def np_dtype(dtype, field: str = "dtype") -> np.dtype:
    """The NumPy dtype of any spelling a user types: "bfloat16", np.float32, jnp.bfloat16 (a class whose
    `.dtype` NumPy reads), jnp.dtype("bfloat16"). A ConfigError naming `field` for anything else."""
    d = _numpy_dtype(dtype)
    if d is None and isinstance(dtype, str):
        # bfloat16 and the float8 types are ml_dtypes', whose import teaches NumPy their names. Imported only
        # when a name needs it: the import costs 0.57 s (ml_dtypes 0.7, NumPy 2.3), more than a 1 GB float32
        # merge's arithmetic.
        import ml_dtypes  # noqa: F401

        d = _numpy_dtype(dtype)
    if d is None or (d.kind not in "biufc" and d.type.__module__ != "ml_dtypes"):
        raise ConfigError(f"{field}={dtype!r} is not a dtype")
    return d


class DtypeTable(Mapping):
    """key -> np.dtype, read as a dict is, from {key: dtype name}; a dtype is made on its first lookup (so
    that a table naming bfloat16 does not import ml_dtypes: np_dtype)."""

    def __init__(self, names: dict[str, str]):
        self.names = names

    def __getitem__(self, key: str) -> np.dtype:
        return np_dtype(self.names[key])

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def float_dtype(dtype, field: str = "dtype") -> np.dtype:
    """np_dtype, for the places only a floating-point type can go (weights, compute, exports)."""
    d = np_dtype(dtype, field)
    if d.kind != "f" and not (d.type.__module__ == "ml_dtypes" and d.name.startswith(("bfloat", "float"))):
        raise ConfigError(f"{field}={dtype!r} is not a floating-point dtype (float32, bfloat16, float16, ...)")
    return d


def dtype_name(dtype, field: str = "dtype") -> str:
    """The one spelling we store and write to files: "float32", "bfloat16", ..."""
    return np_dtype(dtype, field).name


CAUSAL_LM = "MistralForCausalLM"
SEQ_CLS = "MistralForSequenceClassification"
ARCHITECTURES = (CAUSAL_LM, SEQ_CLS)
REMAT_POLICIES = ("none", "full", "dots")


class ConfigError(ValueError):
    """A config.json or MistralConfig value that we cannot run."""


@dataclasses.dataclass(frozen=True)
class MistralConfig:
    """Architecture (mirrors HF config.json) plus how to run it (dtypes, remat).

    Frozen and hashable, so it can be a static argument of `jax.jit`.
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    rope_theta: float = 10000.0
    sliding_window: int | None = 4096
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    pad_token_id: int | None = None
    architecture: str = CAUSAL_LM
    num_labels: int = 1
    # How to run it; not part of the architecture.
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    remat: str = "none"
    # Stacked layers under a scan (params["layers"]) or one subtree per layer
    # (params["layers_0"], ...); see unstack_layers.
    scan_layers: bool = True
    # The MLP down projection stored output-major ([D, F], params "down_t") instead of [F, D]: the rollout
    # copy's layout where the backend says so (runtime.backend; applied by rollout.rollout_params).
    transposed_down: bool = False

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise ConfigError(f"unsupported architecture {self.architecture!r}; expected one of {ARCHITECTURES}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"remat={self.remat!r}; expected one of {REMAT_POLICIES}")
        for field in ("param_dtype", "compute_dtype"):  # stored by name, so equal configs hash equal
            object.__setattr__(self, field, float_dtype(getattr(self, field), field).name)

    @property
    def has_lm_head(self) -> bool:
        return self.architecture == CAUSAL_LM

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    def replace(self, **kw) -> "MistralConfig":
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_hf(cls, d: dict, **runtime) -> "MistralConfig":
        """Builds a config from a parsed HF `config.json` (transformers v4 or v5 names)."""
        archs = d.get("architectures") or [CAUSAL_LM]
        arch = archs[0]
        if d.get("model_type", "mistral") != "mistral" or arch not in ARCHITECTURES:
            raise ConfigError(
                f"unsupported model: model_type={d.get('model_type')!r}, architectures={archs}; "
                f"expected model_type 'mistral' with one of {ARCHITECTURES}"
            )
        if d.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"unsupported hidden_act={d['hidden_act']!r}; Mistral uses 'silu'")
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ConfigError(f"unsupported rope_type={rope_type!r}; only 'default' rotary embeddings are ported")
        theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if key not in d:
                raise ConfigError(f"config.json has no {key!r}")
        heads = d["num_attention_heads"]
        eos = d.get("eos_token_id", 2)
        num_labels = 1  # meaningless for the LM head; HF's default there is 2
        if arch == SEQ_CLS:
            num_labels = len(d["id2label"]) if d.get("id2label") else d.get("num_labels", 1)
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            rope_theta=float(theta),
            sliding_window=d.get("sliding_window"),
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            max_position_embeddings=d.get("max_position_embeddings", 32768),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            pad_token_id=d.get("pad_token_id"),
            architecture=arch,
            num_labels=num_labels,
            **runtime,
        )

    def to_hf(self, dtype: str | None = None) -> dict:
        """The HF `config.json` dict (transformers v5 names; `rope_theta` also top-level for v4 readers)."""
        eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        d = {
            "architectures": [self.architecture],
            "model_type": "mistral",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "rope_theta": self.rope_theta,
            "sliding_window": self.sliding_window,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": self.pad_token_id,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "use_cache": True,
            "dtype": dtype or self.param_dtype,
        }
        if self.architecture == SEQ_CLS:
            d["id2label"] = {str(i): f"LABEL_{i}" for i in range(self.num_labels)}
            d["label2id"] = {f"LABEL_{i}": i for i in range(self.num_labels)}
        return d


# Presets. Instruct-v0.1 shares v0.1's config; Instruct-v0.2 changed RoPE and the window.
MISTRAL_7B_V01 = MistralConfig()
MISTRAL_7B_INSTRUCT_V02 = MistralConfig(rope_theta=1e6, sliding_window=None)
# Real Mistral vocabulary (so the bundled v0.1 tokenizer works), everything else tiny.
TINY = MistralConfig(
    hidden_size=64,
    intermediate_size=192,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=4096,
)
PRESETS = {"mistral-7b-v0.1": MISTRAL_7B_V01, "mistral-7b-instruct-v0.2": MISTRAL_7B_INSTRUCT_V02, "tiny": TINY}
