"""HF folders <-> our params: bit-exact round trips, streaming, and one-line errors."""

import json
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from conftest import hf_model, left_padded_batch

from c2f_jax.model import hf, model
from c2f_jax.model.hf import HFError
from c2f_jax.model.safetensors_io import SafetensorsFile


def all_tensors(folder) -> dict:
    reader = hf.CheckpointReader(folder)
    return {name: np.array(reader.get(name)) for name in reader.names()}


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A sharded fp32 MistralForCausalLM folder written by transformers."""
    path = tmp_path_factory.mktemp("hf") / "tiny"
    hf_model().save_pretrained(path, max_shard_size="40KB")
    return path


@pytest.mark.parametrize("torch_dtype, dtype", [(torch.float32, "float32"), (torch.bfloat16, "bfloat16")])
def test_round_trip_is_bit_exact(torch_dtype, dtype, tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    hf_model(dtype=torch_dtype, num_hidden_layers=3).save_pretrained(src, max_shard_size="40KB")
    config, params = hf.load_pretrained(src, dtype=dtype)
    hf.save_pretrained(out, config, params, max_shard_size="40KB")
    a, b = all_tensors(src), all_tensors(out)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert np.array_equal(a[name].view(np.uint8), b[name].view(np.uint8)), name
    index = json.loads((out / hf.INDEX_NAME).read_text())
    assert len(set(index["weight_map"].values())) > 1
    shard = SafetensorsFile(out / next(iter(index["weight_map"].values())))
    assert shard.metadata == {"format": "pt"}
    assert json.loads((out / "config.json").read_text())["dtype"] == dtype


def test_transformers_loads_what_we_save(tmp_path):
    config = model.TINY.replace(vocab_size=128, sliding_window=8)
    params = model.init_params(config, jax.random.key(3))
    hf.save_pretrained(tmp_path / "out", config, params, dtype="float32", max_shard_size="100KB")
    hm = transformers.MistralForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids, mask, pos = left_padded_batch(128)
    with torch.no_grad():
        ref = hm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos)).logits
    ours = np.asarray(model.forward(config, params, ids, mask))
    assert np.abs(ours - ref.numpy())[mask > 0].max() <= 1e-4


def test_sequence_classification_round_trip(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    hf_model("MistralForSequenceClassification", pad_token_id=0, num_labels=1).save_pretrained(src)
    config, params = hf.load_pretrained(src)
    hf.save_pretrained(out, config, params)
    assert (out / "model.safetensors").exists() and not (out / hf.INDEX_NAME).exists()
    a, b = all_tensors(src), all_tensors(out)
    assert "score.weight" in b and all(np.array_equal(a[n], b[n]) for n in a)
    assert type(transformers.AutoModelForSequenceClassification.from_pretrained(out)).__name__ == model.SEQ_CLS


def test_load_places_params_on_given_shardings(hf_folder):
    mesh = jax.make_mesh((2,), ("fsdp",), axis_types=(jax.sharding.AxisType.Explicit,))
    config = hf.read_config(hf_folder)
    shapes = model.param_shapes(config)
    spec = jax.sharding.PartitionSpec
    shardings = jax.tree.map(
        lambda x: jax.sharding.NamedSharding(mesh, spec(None, "fsdp") if x.ndim == 3 else spec()), shapes
    )
    _, params = hf.load_pretrained(hf_folder, shardings=shardings)
    placed = jax.tree.map(lambda x, s: x.sharding == s, params, shardings)
    assert all(jax.tree.leaves(placed))
    gate = params["layers"]["mlp"]["gate"]  # [L, D, F], D split over 2 devices
    assert {s.data.shape for s in gate.addressable_shards} == {(2, 32, 96)}


def test_save_refuses_existing_folder_and_leaves_no_temp(hf_folder, tmp_path):
    config, params = hf.load_pretrained(hf_folder)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(HFError, match="already exists"):
        hf.save_pretrained(out, config, params)
    hf.save_pretrained(out, config, params, overwrite=True)
    assert (out / "config.json").exists()
    broken = dict(params, embed=params["embed"][:10])
    with pytest.raises(HFError, match="param embed has shape"):
        hf.save_pretrained(tmp_path / "bad", config, broken)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_save_copies_tokenizer_files(hf_folder, tmp_path):
    src = tmp_path / "tok"
    src.mkdir()
    (src / "tokenizer.model").write_bytes(b"spm")
    (src / "tokenizer_config.json").write_text("{}")
    config, params = hf.load_pretrained(hf_folder)
    hf.save_pretrained(tmp_path / "out", config, params, tokenizer_source=src)
    assert (tmp_path / "out" / "tokenizer.model").read_bytes() == b"spm"
    gen = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == config.eos_token_id


# ----------------------------------------------------------------------------- bad inputs


def broken_copy(hf_folder, tmp_path, edit):
    dst = tmp_path / "broken"
    shutil.copytree(hf_folder, dst)
    edit(dst)
    return dst


def _index(folder):
    return json.loads((folder / hf.INDEX_NAME).read_text())


def _shard_names(folder):
    return sorted(set(_index(folder)["weight_map"].values()))


def _remove_shard(d):
    (d / _shard_names(d)[1]).unlink()


def _index_names_absent_tensor(d):
    idx = _index(d)
    idx["weight_map"]["model.layers.0.mlp.extra.weight"] = _shard_names(d)[0]
    (d / hf.INDEX_NAME).write_text(json.dumps(idx))


def _shape_disagrees(d):
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 100
    (d / "config.json").write_text(json.dumps(cfg))


def _unsupported_architecture(d):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (d / "config.json").write_text(json.dumps(cfg))


def _truncate(d):
    shard = d / _shard_names(d)[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])


def _garbage_header(d):
    (d / _shard_names(d)[0]).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")


def _pickle_only(d):
    for f in d.glob("*.safetensors*"):
        f.unlink()
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")


def _no_config(d):
    (d / "config.json").unlink()


def _missing_tensor(d):
    idx = _index(d)
    del idx["weight_map"]["model.norm.weight"]
    (d / hf.INDEX_NAME).write_text(json.dumps(idx))


@pytest.mark.parametrize(
    "edit, words",
    [
        (_remove_shard, r"names shard model-00002-of-\d+\.safetensors, which is missing"),
        (_index_names_absent_tensor, r"says model\.layers\.0\.mlp\.extra\.weight is in .* does not hold it"),
        (
            _shape_disagrees,
            r"tensor model\.layers\.0\.mlp\.gate_proj\.weight has shape \(96, 64\), config\.json implies \(100, 64\)",
        ),
        (_unsupported_architecture, r"config\.json: unsupported model"),
        (_truncate, r"truncated"),
        (_garbage_header, r"truncated or corrupt|corrupt header"),
        (_pickle_only, r"never unpickle"),
        (_no_config, r"config\.json: missing"),
        (_missing_tensor, r"tensor model\.norm\.weight is missing"),
    ],
    ids=[
        "missing-shard",
        "index-names-absent-tensor",
        "shape-vs-config",
        "architecture",
        "truncated",
        "garbage-header",
        "pickle-only",
        "no-config",
        "missing-tensor",
    ],
)
def test_bad_folders_are_one_line_errors(hf_folder, tmp_path, edit, words):
    bad = broken_copy(hf_folder, tmp_path, edit)
    with pytest.raises(HFError, match=words) as e:
        hf.load_pretrained(bad)
    assert "\n" not in str(e.value)


def test_parse_size():
    assert hf.parse_size("5GB") == 5_000_000_000
    assert hf.parse_size("500MiB") == 500 * 2**20
    assert hf.parse_size(123) == 123
    with pytest.raises(HFError, match="not a size"):
        hf.parse_size("lots")


# ----------------------------------------------------------------------------- dtypes in any spelling


def test_load_takes_a_jax_dtype(hf_folder):
    config, params = hf.load_pretrained(hf_folder, dtype=jnp.float32)
    assert config.param_dtype == "float32" and params["embed"].dtype == jnp.float32
    config, params = hf.load_pretrained(hf_folder, dtype=jnp.bfloat16)
    assert config.param_dtype == "bfloat16" and params["embed"].dtype == jnp.bfloat16


def test_save_takes_a_jax_dtype_and_writes_its_name(hf_folder, tmp_path):
    config, params = hf.load_pretrained(hf_folder)
    hf.save_pretrained(tmp_path / "out", config, params, dtype=jnp.bfloat16)
    assert {x.dtype for x in all_tensors(tmp_path / "out").values()} == {np.dtype(ml_dtypes.bfloat16)}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    with pytest.raises(ValueError, match=r"^dtype='bf17' is not a dtype$"):
        hf.save_pretrained(tmp_path / "bad", config, params, dtype="bf17")
