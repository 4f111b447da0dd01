"""The Knowledge Residue Merger: exact values, sweeps, the pytree merge, and every bad input as a one-line error."""

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from conftest import hf_model, left_padded_batch

from c2f_jax.merge import merge, merge_io
from c2f_jax.merge.merge import MergeError
from c2f_jax.model import hf, model
from c2f_jax.model.safetensors_io import SafetensorsFile, write_file

ROOT = Path(__file__).resolve().parent.parent
from c2f_jax.cli import merge as merge_tool  # noqa: E402

TOKENIZER = {"version": "1.0", "model": {"type": "BPE", "vocab": {"<unk>": 0, "a": 1}, "merges": []}}
BF16 = np.dtype(ml_dtypes.bfloat16)


def tensors(folder) -> dict:
    reader = hf.CheckpointReader(folder)
    return {name: np.array(reader.get(name)) for name in reader.names()}


def expected(a, b, gamma):
    """The reference computation: float32 products and sum."""
    return np.float32(gamma) * a.astype(np.float32) + np.float32(1 - gamma) * b.astype(np.float32)


def bits(x):
    return x.view(np.uint16 if x.dtype.itemsize == 2 else np.uint32)


def run(*argv):
    return merge_tool.main([str(a) for a in argv])


def save(folder, seed, dtype=torch.float32, tokenizer=TOKENIZER, **kw):
    hf_model(seed=seed, dtype=dtype, **kw).save_pretrained(folder, max_shard_size="40KB")
    if tokenizer is not None:
        (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
        (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 512 + seed}))
    return folder


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("merge")


@pytest.fixture(scope="module")
def fp32(root):
    """(coarse, sft): two sharded fp32 tiny Mistral folders with the same tokenizer (formatted differently)."""
    coarse, sft = save(root / "coarse", 0), save(root / "sft", 1)
    tok = dict(TOKENIZER, padding={"strategy": "BatchLongest"})
    (coarse / "tokenizer.json").write_text(json.dumps(tok, indent=2))  # same ids, other formatting and padding
    return coarse, sft


@pytest.fixture(scope="module")
def bf16(root):
    return save(root / "coarse16", 2, torch.bfloat16), save(root / "sft16", 3, torch.bfloat16)


@pytest.fixture(scope="module")
def merged(root, fp32):
    """fp32 inputs merged at gamma 0.7 into several shards."""
    run("--coarse", fp32[0], "--sft", fp32[1], "--gamma", "0.7", "--out", root / "merged", "--max-shard-size", "60KB")
    return root / "merged"


# ----------------------------------------------------------------------------- values


def test_fp32_merge_equals_numpy_exactly(fp32, merged):
    a, b, out = tensors(fp32[0]), tensors(fp32[1]), tensors(merged)
    assert sorted(out) == sorted(b) and len(out) == 21
    for name in out:
        assert out[name].dtype == np.float32
        np.testing.assert_array_equal(bits(out[name]), bits(expected(a[name], b[name], 0.7)), err_msg=name)
    index = json.loads((merged / hf.INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and SafetensorsFile(merged / shards[0]).metadata == {"format": "pt"}
    assert index["metadata"]["total_size"] == sum(x.nbytes for x in out.values())


def test_output_folder_has_sft_config_tokenizer_and_provenance(fp32, merged):
    coarse, sft = fp32
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (merged / name).read_bytes() == (sft / name).read_bytes(), name
    prov = json.loads((merged / merge.PROVENANCE_NAME).read_text())
    assert prov["gamma"] == 0.7 and prov["tensors"] == 21 and prov["warnings"] == []
    assert prov["coarse"]["path"] == str(coarse.resolve()) and prov["sft"]["path"] == str(sft.resolve())
    # The documented hash: name|dtype|shape line, then the bytes, tensor by tensor in name order.
    h = hashlib.sha256()
    reader = hf.CheckpointReader(sft)
    for name in sorted(reader.names(), key=merge._natural_key):
        x = np.ascontiguousarray(reader.get(name))
        h.update(f"{name}|F32|{list(x.shape)}\n".encode())
        h.update(x.view(np.uint8))
    assert prov["sft"]["sha256"] == h.hexdigest()


def test_bf16_inputs_give_bf16_outputs_within_rounding(bf16, root):
    run("--coarse", bf16[0], "--sft", bf16[1], "--gamma", "0.3", "--out", root / "merged16")
    a, b, out = tensors(bf16[0]), tensors(bf16[1]), tensors(root / "merged16")
    for name in out:
        assert out[name].dtype == BF16, name
        np.testing.assert_array_equal(bits(out[name]), bits(expected(a[name], b[name], 0.3).astype(BF16)))
        # Half a bfloat16 ulp of the exact result, plus float32 error in the coefficients and products.
        x, y = 0.3 * a[name].astype(np.float64), 0.7 * b[name].astype(np.float64)
        bound = 2.0**-8 * np.abs(x + y) + 2.0**-22 * (np.abs(x) + np.abs(y))
        assert np.all(np.abs(out[name].astype(np.float64) - (x + y)) <= bound), name
    assert json.loads((root / "merged16" / "config.json").read_text())["dtype"] == "bfloat16"


def test_dtype_flag_casts_the_float32_result(fp32, root):
    run("--coarse", fp32[0], "--sft", fp32[1], "--gamma", "0.7", "--out", root / "as16", "--dtype", "bfloat16")
    a, b, out = tensors(fp32[0]), tensors(fp32[1]), tensors(root / "as16")
    for name in out:
        np.testing.assert_array_equal(bits(out[name]), bits(expected(a[name], b[name], 0.7).astype(BF16)))
    assert json.loads((root / "as16" / "config.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((root / "as16" / merge.PROVENANCE_NAME).read_text())["dtype"] == "bfloat16"


def rewrite_tensor(folder, name, edit):
    """Replaces tensor `name` in an HF folder by edit(old array), rewriting the shard that holds it."""
    shard = hf.CheckpointReader(folder).where(name)
    f = SafetensorsFile(shard)
    arrays = {n: np.array(f.get(n)) for n in f.names()}
    arrays[name] = edit(arrays[name])
    entries = [(n, x.shape, x.dtype, lambda x=x: x) for n, x in arrays.items()]
    write_file(shard, entries, f.metadata)


@pytest.mark.parametrize("pair", ["fp32", "bf16"])
def test_gamma_0_and_1_return_the_inputs_bit_exactly(pair, request, root, tmp_path):
    coarse, sft = (tmp_path / "coarse", tmp_path / "sft")
    for src, dst in zip(request.getfixturevalue(pair), (coarse, sft)):
        shutil.copytree(src, dst)
    # Values that 0 * x + y would not keep: -0.0 next to a positive value on the other side, and the smallest
    # subnormals (NaN and inf are refused as inputs: test_non_finite_weights_are_refused_naming_tensor_and_file).
    special = lambda x, v: np.concatenate([np.array(v, x.dtype), x.reshape(-1)[len(v) :]]).reshape(x.shape)
    tiny = float(np.finfo(np.float32).smallest_subnormal)
    rewrite_tensor(coarse, "model.norm.weight", lambda x: special(x, [1.0, tiny, -tiny, -0.0]))
    rewrite_tensor(sft, "model.norm.weight", lambda x: special(x, [-0.0, -tiny, tiny, 2.0]))
    run("--coarse", coarse, "--sft", sft, "--gamma", "0,1", "--out", tmp_path / "out")
    for gamma, source in ((0, sft), (1, coarse)):
        src, out = tensors(source), tensors(tmp_path / "out" / f"gamma_{gamma}")
        for name in src:
            assert out[name].dtype == src[name].dtype
            assert out[name].tobytes() == src[name].tobytes(), (gamma, name)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_weights_are_refused_naming_tensor_and_file(value, fp32, root, tmp_path):
    sft = tmp_path / "sft"
    shutil.copytree(fp32[1], sft)
    rewrite_tensor(sft, "model.norm.weight", lambda x: np.concatenate([[value], x.reshape(-1)[1:]]).astype(x.dtype))
    with pytest.raises(
        MergeError, match=r"sft/model-\d+-of-\d+\.safetensors: tensor model\.norm\.weight holds NaN or inf"
    ):
        run("--coarse", fp32[0], "--sft", sft, "--gamma", "0.5", "--out", tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_sweep_equals_separate_merges(fp32, root, tmp_path):
    run(
        "--coarse",
        fp32[0],
        "--sft",
        fp32[1],
        "--gamma",
        "0.1,0.7",
        "--out",
        tmp_path / "sweep",
        "--max-shard-size",
        "60KB",
    )
    for gamma, single in ((0.1, tmp_path / "single"), (0.7, root / "merged")):
        if gamma != 0.7:
            run("--coarse", fp32[0], "--sft", fp32[1], "--gamma", gamma, "--out", single, "--max-shard-size", "60KB")
        folder = tmp_path / "sweep" / f"gamma_{gamma}"
        names = sorted(p.name for p in single.iterdir())
        assert names == sorted(p.name for p in folder.iterdir())
        for name in names:
            assert (folder / name).read_bytes() == (single / name).read_bytes(), (gamma, name)


def test_content_hash_does_not_depend_on_sharding(fp32, merged, tmp_path):
    # gamma 1 with a large shard size re-writes the coarse model as one file, tensor for tensor.
    run("--coarse", fp32[0], "--sft", fp32[1], "--gamma", "1", "--out", tmp_path / "copy")
    assert (tmp_path / "copy" / hf.SINGLE_NAME).exists() and not (tmp_path / "copy" / hf.INDEX_NAME).exists()
    run(
        "--coarse",
        tmp_path / "copy",
        "--sft",
        fp32[1],
        "--gamma",
        "0.7",
        "--out",
        tmp_path / "again",
        "--allow-tokenizer-mismatch",
    )  # the copy carries the SFT's tokenizer
    first = json.loads((merged / merge.PROVENANCE_NAME).read_text())
    second = json.loads((tmp_path / "again" / merge.PROVENANCE_NAME).read_text())
    assert first["coarse"]["sha256"] == second["coarse"]["sha256"]


# ----------------------------------------------------------------------------- the merged model runs


def test_transformers_loads_the_merge_and_matches_our_forward(merged):
    hm = transformers.MistralForCausalLM.from_pretrained(merged).eval()
    config, params = hf.load_pretrained(merged)
    ids, mask, pos = left_padded_batch(config.vocab_size)
    with torch.no_grad():
        ref = hm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos)).logits
    ours = np.asarray(model.forward(config, params, ids, mask))
    assert np.abs(ours - ref.numpy())[mask > 0].max() <= 1e-4


# ----------------------------------------------------------------------------- the pytree merge


def test_merge_params_equals_the_streaming_merge(fp32, merged):
    _, coarse = hf.load_pretrained(fp32[0])
    _, sft = hf.load_pretrained(fp32[1])
    _, streamed = hf.load_pretrained(merged)
    out = merge.merge_params(coarse, sft, 0.7)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(bits(np.asarray(x)), bits(np.asarray(y))), out, streamed)


def test_merge_params_keeps_shardings_and_gamma_endpoints(fp32):
    _, coarse = hf.load_pretrained(fp32[0])
    _, sft = hf.load_pretrained(fp32[1], dtype="bfloat16")
    mesh = jax.make_mesh((2,), ("fsdp",), axis_types=(jax.sharding.AxisType.Explicit,))
    spec = jax.sharding.PartitionSpec
    shard = lambda x: jax.device_put(x, jax.sharding.NamedSharding(mesh, spec(None, "fsdp") if x.ndim == 3 else spec()))
    coarse, sft = jax.tree.map(shard, coarse), jax.tree.map(shard, sft)
    out = merge.merge_params(coarse, sft, 0.25)
    same = jax.tree.map(lambda o, s: o.sharding.is_equivalent_to(s.sharding, o.ndim) and o.dtype == s.dtype, out, sft)
    assert all(jax.tree.leaves(same))
    jax.tree.map(
        lambda o, a, b: np.testing.assert_array_equal(
            bits(np.asarray(o)), bits(expected(np.asarray(a), np.asarray(b), 0.25).astype(BF16))
        ),
        out,
        coarse,
        sft,
    )
    jax.tree.map(
        lambda o, s: np.testing.assert_array_equal(bits(np.asarray(o)), bits(np.asarray(s))),
        merge.merge_params(coarse, sft, 0.0),
        sft,
    )
    jax.tree.map(
        lambda o, c: np.testing.assert_array_equal(bits(np.asarray(o)), bits(np.asarray(c))),
        merge.merge_params(coarse, sft, 1.0, dtype="float32"),
        coarse,
    )


@pytest.mark.parametrize("spelling", [np.float32, jax.numpy.float32, "float32"])
def test_merge_params_takes_any_dtype_spelling(spelling):
    a, b = np.ones((4, 3), BF16), np.zeros((4, 3), BF16)
    out = merge.merge_params({"w": a}, {"w": b}, 0.25, dtype=spelling)
    assert out["w"].dtype == np.float32 and np.all(np.asarray(out["w"]) == 0.25)
    with pytest.raises(MergeError, match=r"dtype='f33' is not a dtype"):
        merge.merge_params({"w": a}, {"w": b}, 0.25, dtype="f33")


@pytest.mark.parametrize(
    "edit, words",
    [
        (
            lambda p: {k: v for k, v in p.items() if k != "lm_head"},
            r"param \['lm_head'\] is in the coarse tree but not",
        ),
        (lambda p: dict(p, embed=p["embed"][:5]), r"param \['embed'\]: coarse shape \(128, 64\), SFT shape \(5, 64\)"),
        (lambda p: dict(p, embed=p["embed"].astype(np.int32)), r"param \['embed'\]: not floating point"),
    ],
    ids=["missing-leaf", "shape", "integer"],
)
def test_merge_params_names_the_mismatching_path(edit, words):
    params = {"embed": np.ones((128, 64), np.float32), "lm_head": np.ones((64, 128), np.float32)}
    with pytest.raises(MergeError, match=words):
        merge.merge_params(params, edit(params), 0.5)
    with pytest.raises(MergeError, match="outside"):
        merge.merge_params(params, params, 1.5)


# ----------------------------------------------------------------------------- bad inputs


def copy_of(folder, tmp_path, edit, name="bad"):
    dst = tmp_path / name
    shutil.copytree(folder, dst)
    edit(dst)
    return dst


def _shards(d):
    return sorted(set(json.loads((d / hf.INDEX_NAME).read_text())["weight_map"].values()))


def _truncate(d):
    shard = d / _shards(d)[0]
    shard.write_bytes(shard.read_bytes()[:-100])


def _corrupt_header(d):
    (d / _shards(d)[0]).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")


def _remove_shard(d):
    (d / _shards(d)[1]).unlink()


def _unlisted_shard(d):
    (d / "model-00009-of-00009.safetensors").write_bytes((d / _shards(d)[0]).read_bytes())


def _other_tokenizer(d):
    (d / "tokenizer.json").write_text(json.dumps(dict(TOKENIZER, model={"type": "BPE", "vocab": {"<unk>": 0, "b": 1}})))


def _no_tokenizer(d):
    (d / "tokenizer.json").unlink()


def _no_config(d):
    (d / "config.json").unlink()


def _workdir(d):
    for f in list(d.iterdir()):
        f.unlink()
    (d / "run_config.json").write_text("{}")
    (d / "checkpoints").mkdir()


def _classifier(d):
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["MistralForSequenceClassification"]
    (d / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "edit, words",
    [
        (_truncate, r"truncated"),
        (_corrupt_header, r"corrupt"),
        (_remove_shard, r"names shard model-00002-of-\d+\.safetensors, which is missing"),
        (_unlisted_shard, r"model-00009-of-00009\.safetensors: shard not named in model\.safetensors\.index\.json"),
        (_other_tokenizer, r"tokenizers differ: .*tokenizer\.json .*--allow-tokenizer-mismatch"),
        (_no_tokenizer, r"has no tokenizer files but .* has; pass --allow-tokenizer-mismatch"),
        (_no_config, r"not an HF model folder \(no config\.json\); a training workdir has run_config\.json"),
        (
            _workdir,
            r"is a training workdir; only --coarse takes one \(export it with c2f-export "
            r"--checkpoint \S+bad ",
        ),
        (_classifier, r"is a MistralForSequenceClassification; the merger takes MistralForCausalLM"),
    ],
    ids=[
        "truncated",
        "corrupt",
        "shard-missing",
        "shard-not-in-index",
        "tokenizer",
        "no-tokenizer",
        "no-config",
        "workdir",
        "classifier",
    ],
)
def test_bad_sft_folder_is_refused_before_writing(fp32, tmp_path, edit, words):
    bad = copy_of(fp32[1], tmp_path, edit)
    with pytest.raises(MergeError, match=words):
        run("--coarse", fp32[0], "--sft", bad, "--gamma", "0.5", "--out", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]


@pytest.mark.parametrize(
    "kw, words",
    [
        (dict(vocab_size=130), r"tensor lm_head\.weight has shape \(128, 64\) in \S+ but \(130, 64\) in \S+"),
        (dict(num_hidden_layers=3), r"tensor model\.layers\.2\.input_layernorm\.weight is in \S+sft \S+ but not in"),
    ],
    ids=["vocab", "layers"],
)
def test_shape_and_name_mismatches_name_the_tensor(fp32, tmp_path, kw, words):
    sft = save(tmp_path / "sft", 1, **kw)
    with pytest.raises(MergeError, match=words):
        run("--coarse", fp32[0], "--sft", sft, "--gamma", "0.5", "--out", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "gamma, words",
    [("1.5", "outside"), ("-0.1", "outside"), ("nan", "outside"), ("0.2,x", "not a number"), ("0.5,0.5", "repeat")],
)
def test_gamma_must_lie_in_0_1(fp32, tmp_path, gamma, words):
    with pytest.raises(MergeError, match=words):
        run("--coarse", fp32[0], "--sft", fp32[1], "--gamma", gamma, "--out", tmp_path / "out")


def test_missing_input_and_existing_output(fp32, tmp_path):
    with pytest.raises(MergeError, match=r"nowhere: not found"):
        run("--coarse", tmp_path / "nowhere", "--sft", fp32[1], "--gamma", "0.5", "--out", tmp_path / "out")
    with pytest.raises(MergeError, match=r"config\.json: not a folder"):
        run("--coarse", fp32[0] / "config.json", "--sft", fp32[1], "--gamma", "0.5", "--out", tmp_path / "out")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old").write_text("x")
    with pytest.raises(ValueError, match=r"already exists \(pass --overwrite to replace it\)"):
        run("--coarse", fp32[0], "--sft", fp32[1], "--gamma", "0.5", "--out", tmp_path / "out")
    with pytest.raises(ValueError, match="is the input --sft"):
        run("--coarse", fp32[0], "--sft", fp32[1], "--gamma", "0.5", "--out", fp32[1], "--overwrite")
    with pytest.raises(MergeError, match="not a size"):
        run("--coarse", fp32[0], "--sft", fp32[1], "--gamma", "0.5", "--out", tmp_path / "x", "--max-shard-size", "big")
    run("--coarse", fp32[0], "--sft", fp32[1], "--gamma", "0.5", "--out", tmp_path / "out", "--overwrite")
    assert (tmp_path / "out" / hf.SINGLE_NAME).exists() and not (tmp_path / "out" / "old").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_warnings_for_config_differences_and_allowed_tokenizer_mismatch(fp32, tmp_path, capsys):
    def v02(d):  # Instruct-v0.2 changed RoPE and dropped the sliding window
        cfg = json.loads((d / "config.json").read_text())
        cfg["rope_parameters"]["rope_theta"], cfg["sliding_window"] = 1e6, None
        (d / "config.json").write_text(json.dumps(cfg))
        _other_tokenizer(d)

    sft = copy_of(fp32[1], tmp_path, v02, "v02")
    run("--coarse", fp32[0], "--sft", sft, "--gamma", "0.5", "--out", tmp_path / "out", "--allow-tokenizer-mismatch")
    err = capsys.readouterr().err.splitlines()
    assert any("rope_theta is 10000.0 in" in w and "1000000.0 in" in w for w in err), err
    assert any("sliding_window is 8 in" in w and "None in" in w for w in err), err
    assert any(w.startswith("warning: tokenizers differ") for w in err), err
    assert len(json.loads((tmp_path / "out" / merge.PROVENANCE_NAME).read_text())["warnings"]) == 3


@pytest.mark.parametrize("error", [OSError("disk full"), SystemExit(143)], ids=["error", "sigterm"])
def test_a_failed_merge_leaves_nothing_behind(fp32, tmp_path, monkeypatch, error):
    # SystemExit is what tools/merge.py's SIGTERM handler raises.
    calls = []

    def failing(a, b, gamma, dtype, scratch=None, out=None):
        calls.append(1)
        if len(calls) > 5:
            raise error
        return np.asarray(a)

    monkeypatch.setattr(merge, "lerp", failing)
    with pytest.raises(type(error)):
        run("--coarse", fp32[0], "--sft", fp32[1], "--gamma", "0.5", "--out", tmp_path / "out")
    assert len(calls) == 6 and list(tmp_path.iterdir()) == []


def test_a_failed_write_on_the_writer_thread_fails_the_merge_and_leaves_nothing(fp32, tmp_path, monkeypatch):
    """Writes run behind the arithmetic on a thread; a disk-full there still ends the merge with that error."""
    real, calls = merge_io._write_all, []

    def failing(f, x):
        calls.append(1)
        if len(calls) > 7:
            raise OSError(28, "No space left on device")
        return real(f, x)

    monkeypatch.setattr(merge_io, "_write_all", failing)
    with pytest.raises(OSError, match="No space left"):
        run("--coarse", fp32[0], "--sft", fp32[1], "--gamma", "0.3,0.6", "--out", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_cli_error_is_one_line_and_exit_2(fp32, tmp_path):
    bad = copy_of(fp32[1], tmp_path, _truncate)
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "merge.py"),
            "--coarse",
            str(fp32[0]),
            "--sft",
            str(bad),
            "--gamma",
            "0.5",
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        env={"JAX_PLATFORMS": "cpu", "PATH": ""},
        cwd=ROOT,
    )
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith("error: ") and "truncated" in r.stderr
    assert not (tmp_path / "out").exists()


def test_coarse_workdir_merges_like_its_exported_actor(root, fp32, merged, tmp_path):
    """A Coarse Actor training workdir as --coarse: its checkpointed actor, exported to a scratch folder
    that is gone afterwards, merges to the same bits as the HF folder it came from."""
    from c2f_jax.runtime import checkpoint

    config, params = hf.load_pretrained(fp32[0])
    wd = tmp_path / "run"
    (wd / "tokenizer").mkdir(parents=True)
    (wd / "run_config.json").write_text(json.dumps({"job": "coarse"}))
    (wd / "model_config.json").write_text(json.dumps(config.to_hf()))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(fp32[0] / name, wd / "tokenizer" / name)
    ckpt = checkpoint.Checkpointer(wd, async_save=False)
    ckpt.save(3, {"actor": {"params": params}}, {"step": 3})
    ckpt.close()
    with pytest.raises(ValueError, match=r"no checkpoint for step 5"):
        run("--coarse", wd, "--coarse-step", "5", "--sft", fp32[1], "--gamma", "0.7", "--out", tmp_path / "bad")
    run("--coarse", wd, "--coarse-step", "3", "--sft", fp32[1], "--gamma", "0.7", "--out", tmp_path / "out")
    ours, reference = tensors(tmp_path / "out"), tensors(root / "merged")
    assert ours.keys() == reference.keys()
    for name in ours:
        np.testing.assert_array_equal(bits(ours[name]), bits(reference[name]), err_msg=name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "run"]  # the scratch export is gone
