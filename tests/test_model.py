"""The Flax Mistral computes what transformers' MistralForCausalLM computes."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from conftest import hf_config, hf_model, left_padded_batch

from c2f_jax.model import hf, model
from c2f_jax.model.model import ConfigError, MistralConfig

PARITY_ATOL = 1e-4


def hf_logits(hm, ids, mask, positions):
    with torch.no_grad():
        out = hm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions))
    return out.logits.float().numpy()


def ours_from_hf(hm, tmp_path, dtype="float32", **runtime):
    hm.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    return hf.load_pretrained(tmp_path / "hf", dtype=dtype, **runtime)


@pytest.mark.parametrize(
    "kw",
    [
        dict(num_key_value_heads=1),
        dict(num_key_value_heads=2),
        dict(num_key_value_heads=4),
        dict(rope_theta=1e6, sliding_window=None),  # Instruct-v0.2-like
        dict(tie_word_embeddings=True),
    ],
    ids=["kv1", "kv2", "kv4", "v0.2-like", "tied"],
)
def test_logits_match_transformers(kw, tmp_path):
    if "rope_theta" in kw:
        kw = dict(kw, rope_parameters={"rope_type": "default", "rope_theta": kw.pop("rope_theta")})
    hm = hf_model(**kw)
    config, params = ours_from_hf(hm, tmp_path)
    # 24 tokens over a window of 8, three rows with different left padding.
    ids, mask, pos = left_padded_batch(hm.config.vocab_size)
    ours = np.asarray(model.forward(config, params, jnp.asarray(ids), jnp.asarray(mask)))
    ref = hf_logits(hm, ids, mask, pos)
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    assert np.abs(ours - ref)[mask > 0].max() <= PARITY_ATOL


def test_sliding_window_matters(tmp_path):
    # Guard against a parity test that passes because the window never bites.
    hm = hf_model()
    config, params = ours_from_hf(hm, tmp_path)
    ids, mask, _ = left_padded_batch(hm.config.vocab_size)
    windowed = model.forward(config, params, ids, mask)
    unwindowed = model.forward(config.replace(sliding_window=None), params, ids, mask)
    assert np.abs(np.asarray(windowed - unwindowed))[:, -1].max() > 1e-3


def test_bf16_compute_close_to_fp32_reference(tmp_path):
    hm = hf_model()
    config, params = ours_from_hf(hm, tmp_path, compute_dtype="bfloat16")
    ids, mask, pos = left_padded_batch(hm.config.vocab_size)
    ours = np.asarray(model.forward(config, params, ids, mask))
    ref = hf_logits(hm, ids, mask, pos)
    rel = np.abs(ours - ref)[mask > 0].max() / np.abs(ref).max()
    assert rel < 2e-2


def test_bf16_params_load_and_run(tmp_path):
    hm = hf_model(dtype=torch.bfloat16)
    config, params = ours_from_hf(hm, tmp_path, dtype="bfloat16", compute_dtype="bfloat16")
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
    ids, mask, pos = left_padded_batch(hm.config.vocab_size)
    ours = np.asarray(model.forward(config, params, ids, mask))
    ref = hf_logits(hm, ids, mask, pos)
    assert np.abs(ours - ref)[mask > 0].max() / np.abs(ref).max() < 3e-2


def test_sequence_classification_head_matches(tmp_path):
    hm = hf_model("MistralForSequenceClassification", pad_token_id=0, num_labels=1)
    config, params = ours_from_hf(hm, tmp_path)
    assert not config.has_lm_head and params["score"].shape == (64, 1)
    ids, mask, pos = left_padded_batch(hm.config.vocab_size)
    ref = hf_logits(hm, ids, mask, pos)  # [B, 1]: HF pools at the last non-pad token
    scores = np.asarray(model.sequence_scores(config, params, ids, mask))
    assert np.abs(scores - ref).max() <= PARITY_ATOL
    values = np.asarray(model.forward_values(config, params, ids, mask))
    assert values.shape == ids.shape and np.allclose(values[:, -1], scores[:, 0], atol=1e-6)


def test_remat_and_scan_do_not_change_results():
    config = model.TINY.replace(vocab_size=128)
    params = model.init_params(config, jax.random.key(1))
    ids, mask, _ = left_padded_batch(128, length=12, pads=(0, 3, 6))

    def loss(p, c):
        return jnp.mean(model.forward(c, p, ids, mask) ** 2)

    base = jax.grad(loss)(params, config)
    for policy in ("full", "dots"):
        other = jax.grad(loss)(params, config.replace(remat=policy))
        diffs = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), base, other)
        assert max(jax.tree.leaves(diffs)) < 1e-6


def test_per_layer_params_compute_the_same():
    config = model.TINY.replace(vocab_size=128)
    params = model.init_params(config, jax.random.key(2))
    per_layer = model.unstack_layers(params)
    assert sorted(k for k in per_layer if k.startswith("layers")) == ["layers_0", "layers_1"]
    ids, mask, _ = left_padded_batch(128, length=12, pads=(0, 3, 6))
    a = model.forward(config, params, ids, mask)
    b = model.forward(config.replace(scan_layers=False), per_layer, ids, mask)
    assert float(jnp.max(jnp.abs(a - b))) < 1e-5
    back = model.stack_layers(per_layer)
    assert all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)), params, back)))


def test_param_dtype_and_compute_dtype_are_independent():
    config = model.TINY.replace(vocab_size=128, param_dtype="float32", compute_dtype="bfloat16")
    params = model.init_params(config, jax.random.key(0))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    logits = model.forward(config, params, jnp.ones((1, 4), jnp.int32))
    assert logits.dtype == jnp.float32


def test_param_shapes_match_the_hf_mapping():
    shapes = model.param_shapes(model.MISTRAL_7B_V01)
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    assert n == 7_241_732_096  # Mistral-7B v0.1
    assert shapes["layers"]["attn"]["k"].shape == (32, 4096, 8, 128)


def test_config_round_trips_through_transformers(tmp_path):
    for ours in (
        model.MISTRAL_7B_V01,
        model.MISTRAL_7B_INSTRUCT_V02,
        model.TINY.replace(architecture=model.SEQ_CLS, num_labels=1, pad_token_id=0, eos_token_id=(2, 5)),
    ):
        (tmp_path / "config.json").write_text(json.dumps(ours.to_hf()))
        theirs = transformers.AutoConfig.from_pretrained(tmp_path)
        assert theirs.rope_parameters["rope_theta"] == ours.rope_theta
        assert theirs.sliding_window == ours.sliding_window
        if ours.architecture == model.SEQ_CLS:
            assert theirs.num_labels == ours.num_labels
        assert MistralConfig.from_hf(theirs.to_dict()) == ours


def test_v4_style_config_is_read():
    d = hf_config().to_dict()
    d.pop("rope_parameters")
    d.pop("head_dim")
    d["rope_theta"] = 1e6
    c = MistralConfig.from_hf(d)
    assert c.rope_theta == 1e6 and c.head_dim == 16


@pytest.mark.parametrize(
    "change, words",
    [
        ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, "unsupported model"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope_type"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ],
)
def test_bad_configs_are_one_line_errors(change, words):
    d = dict(hf_config().to_dict(), **change)
    with pytest.raises(ConfigError, match=words) as e:
        MistralConfig.from_hf(d)
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- dtypes in any spelling


@pytest.mark.parametrize("spelling", ["bfloat16", jnp.bfloat16, jnp.dtype("bfloat16"), np.dtype(jnp.bfloat16)])
def test_config_dtype_spellings_are_stored_by_name_and_hash_equal(spelling):
    config = MistralConfig(param_dtype=spelling, compute_dtype=np.float32)
    assert config.param_dtype == "bfloat16" and config.compute_dtype == "float32"
    same = MistralConfig(param_dtype="bfloat16", compute_dtype="float32")
    assert config == same and hash(config) == hash(same)


@pytest.mark.parametrize("bad", ["bfloat17", None, object])
def test_a_bad_dtype_is_a_one_line_error_naming_the_field(bad):
    with pytest.raises(ConfigError, match=r"^compute_dtype=.* is not a dtype$"):
        MistralConfig(compute_dtype=bad)
