"""Merge methods beyond linear (c2f_jax.merge.methods) against mergekit 0.1.5 on the same tiny Mistral folders,
tensor by tensor: SLERP, task arithmetic and TIES within 1e-6 in float32 and one bf16 ulp in bfloat16; DARE,
whose drops come from an RNG, statistically and by its seed.

mergekit pins its own torch and pydantic, so it lives in a venv of its own (ROOT/.mergekit/, made on first use
from the package registry, as benchmarks/bench_merge.py makes it); where that cannot be made the tests skip, saying
why."""

import importlib.util
import json
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from conftest import ROOT, hf_model

from c2f_jax.merge import merge, methods, recipe
from c2f_jax.model import hf

pytestmark = pytest.mark.slow  # mergekit in its own venv as the reference

BF16 = np.dtype(ml_dtypes.bfloat16)


def _bench_merge():
    spec = importlib.util.spec_from_file_location("bench_merge", ROOT / "benchmarks" / "bench_merge.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench_merge = _bench_merge()
merge_tool = importlib.import_module("c2f_jax.cli.merge")


@pytest.fixture(scope="module")
def mergekit():
    try:
        return bench_merge.mergekit_venv(ROOT / ".mergekit")
    except (subprocess.CalledProcessError, OSError) as e:
        pytest.skip(f"mergekit could not be installed into its own venv: {e}")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A base and two fine-tunes of it (base + small random deltas), float32 HF folders."""
    root = tmp_path_factory.mktemp("methods")
    base = hf_model(seed=0, vocab_size=128)
    out = {}
    for name, seed, scale in (("base", 0, 0.0), ("a", 1, 0.02), ("b", 2, 0.03)):
        torch.manual_seed(seed)
        with torch.no_grad():
            model = hf_model(seed=0, vocab_size=128)
            for p in model.parameters():
                p.add_(scale * torch.randn_like(p))
        model.save_pretrained(root / name)
        out[name] = root / name
    del base
    return out


def tensors(folder) -> dict:
    reader = hf.CheckpointReader(folder)
    return {name: np.array(reader.get(name)) for name in reader.names()}


def run_mergekit(exe, folder, config: str):
    """mergekit-yaml on `config` (written beside `folder` as FOLDER.yml) into `folder`: its tensors."""
    (folder.parent / f"{folder.name}.yml").write_text(config)
    done = subprocess.run(
        [
            str(exe),
            str(folder.parent / f"{folder.name}.yml"),
            str(folder),
            "--no-copy-tokenizer",
            "--no-write-model-card",
            "--quiet",
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return tensors(folder)


CASES = {  # method: mergekit's YAML body
    "linear": "models:\n  - model: {a}\n    parameters: {{weight: 0.7}}\n  - model: {b}\n    parameters: {{weight: 0.2}}\n",
    "slerp": "base_model: {a}\nmodels:\n  - model: {a}\n  - model: {b}\nparameters: {{t: [0.1, 0.8]}}\n",
    "task_arithmetic": "base_model: {base}\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.7}}\n"
    "  - model: {b}\n    parameters: {{weight: [0.2, 0.5]}}\n",
    "ties": "base_model: {base}\nmodels:\n  - model: {base}\n  - model: {a}\n    parameters: {{weight: 0.7, density: 0.4}}\n"
    "  - model: {b}\n    parameters: {{weight: 0.5, density: 0.6}}\n",
}


@pytest.mark.parametrize("method", list(CASES))
@pytest.mark.parametrize(
    "dtype, out_dtype", [("float32", "float32"), ("float32", "bfloat16"), ("bfloat16", "bfloat16")]
)
def test_a_recipe_merges_as_mergekit_does_tensor_by_tensor(mergekit, folders, tmp_path, method, dtype, out_dtype):
    """The same YAML through mergekit-yaml and through tools/merge.py --config (gradients over the layers
    included): float32 within 1e-6, bfloat16 within one ulp (the float32 values may straddle a rounding tie).
    With dtype bfloat16 the inputs are read as bfloat16 and the task-vector methods compute in it, step by step."""
    config = f"merge_method: {method}\n" + CASES[method].format(**folders) + f"dtype: {dtype}\nout_dtype: {out_dtype}\n"
    theirs = run_mergekit(mergekit, tmp_path / "theirs", config)
    assert merge_tool.main(["--config", str(tmp_path / "theirs.yml"), "--out", str(tmp_path / "ours")]) == 0
    mine = tensors(tmp_path / "ours")
    assert set(mine) == set(theirs)
    worst, tied, total = 0.0, 0, 0
    for name, want in theirs.items():
        got = mine[name]
        assert got.dtype == want.dtype, name
        if out_dtype == "float32":
            worst = max(worst, float(np.abs(got - want).max()))
        else:
            ulps = np.abs(got.view(np.int16).astype(np.int32) - want.view(np.int16).astype(np.int32))
            if method == "ties" and dtype == "bfloat16":
                # bfloat16 deltas repeat magnitudes, and which of those equal to the cut mergekit keeps is the
                # order of torch's unstable argsort; ours keeps the first. Every other entry must agree.
                at_cut = ties_at_the_cut(folders, name, densities=(0.4, 0.6))
                ulps, tied, total = ulps[~at_cut], tied + int(at_cut.sum()), total + at_cut.size
            worst = max(worst, float(ulps.max(initial=0)))
    print(
        f"{method} {dtype} -> {out_dtype}: max |ours - mergekit| = {worst:.3g}{' ulp' if out_dtype == 'bfloat16' else ''}"
        + (f", leaving out the {tied} of {total} entries tied at a model's magnitude cut" if tied else "")
    )
    assert worst <= (1e-6 if out_dtype == "float32" else 1)
    assert tied <= total / 50  # the ties are a sliver, not a way around the check
    provenance = json.loads((tmp_path / "ours" / "merge_provenance.json").read_text())
    assert provenance["method"].startswith(method) and provenance["seed"] == 0


def ties_at_the_cut(folders, name, densities):
    """bool [shape of tensor `name`]: entries whose bfloat16 delta, for some model, has the magnitude at that
    model's TIES cut (the max(1, int(density * n))-th largest)."""
    bf16 = lambda f: np.asarray(hf.CheckpointReader(f).get(name)).astype(BF16).astype(np.float32)
    base, out = bf16(folders["base"]), None
    for model, density in zip(("a", "b"), densities):
        magnitude = np.abs((bf16(folders[model]) - base).astype(BF16).astype(np.float32))
        cut = np.sort(magnitude, axis=None)[::-1][max(1, int(density * magnitude.size)) - 1]
        out = (magnitude == cut) if out is None else out | (magnitude == cut)
    return out


@pytest.mark.parametrize(
    "line, words",
    [
        ("slices: []\n", "unsupported key 'slices'"),
        ("parameters: {{t: 0.3, filter_wise: true}}\n", "parameters: unsupported key 'filter_wise' for slerp"),
        ("parameters: {{t: [{{filter: self_attn, value: 0.2}}]}}\n", "parameters.t: a list must hold numbers"),
        ("tokenizer_source: union\n", "tokenizer_source: 'union' is not supported"),
    ],
)
def test_an_unsupported_recipe_is_refused_in_one_line(folders, tmp_path, capsys, line, words):
    yml = tmp_path / "r.yml"
    yml.write_text("merge_method: slerp\nbase_model: {a}\nmodels:\n  - model: {b}\n".format(**folders) + line.format())
    with pytest.raises(merge.MergeError) as e:
        merge_tool.main(["--config", str(yml), "--out", str(tmp_path / "out")])
    assert str(e.value).startswith(f"{yml}: ") and words in str(e.value) and "\n" not in str(e.value), e.value
    assert not (tmp_path / "out").exists()


class SparsifyOnly:
    """A merger of one input that only sparsifies it (a methods sparsifier, as merge_whole runs mergers)."""

    def __init__(self, sparsifier):
        self.sparsifier, self.counting_passes = sparsifier, sparsifier.counting_passes

    def observe(self, p, start, chunks):
        self.sparsifier.observe(p, start, chunks[0])

    def merge(self, start, chunks):
        return self.sparsifier.apply(start, chunks[0])


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_keeps_its_density_rescales_to_the_l1_norm_and_follows_its_seed(mergekit, folders, tmp_path, method):
    ins = {k: tensors(v) for k, v in folders.items()}
    name = "model.layers.0.mlp.down_proj.weight"
    base, a = ins["base"][name], ins["a"][name]
    delta = a - base
    for density in (0.2, 0.5, 0.9):
        drops = methods.RandomDrops(density, rescale=True, seed=7, tensor=name, model=0)
        kept = methods.merge_whole(SparsifyOnly(drops), [delta])
        share = np.count_nonzero(kept) / delta.size
        assert abs(share - density) < 4 * np.sqrt(density * (1 - density) / delta.size), (density, share)
        assert np.abs(kept).sum() == pytest.approx(np.abs(delta).sum(), rel=1e-5)  # mergekit's L1 rescale
    run = lambda seed: methods.merge_whole(
        methods.TaskVectors(method, [0.7, 0.5], base.size, [0.5, 0.5], seed=seed, tensor=name),
        [base, a, ins["b"][name]],
    )
    assert np.array_equal(run(7), run(7)) and not np.array_equal(run(7), run(8))
    # mergekit's own drops (torch's RNG) on the same inputs: the merged delta has the same L1 mass
    config = (
        f"merge_method: {method}\nbase_model: {folders['base']}\nmodels:\n"
        f"  - model: {folders['a']}\n    parameters: {{weight: 0.7, density: 0.5}}\n"
        f"  - model: {folders['b']}\n    parameters: {{weight: 0.5, density: 0.5}}\n"
        "dtype: float32\nout_dtype: float32\n"
    )
    theirs = run_mergekit(mergekit, tmp_path / "out", config)[name]
    mass = lambda out: float(np.abs(out - base).sum())
    print(f"{method}: merged delta L1 mass, ours {mass(run(7)):.4g}, mergekit {mass(theirs):.4g}")
    assert mass(run(7)) == pytest.approx(mass(theirs), rel=0.05)


def test_the_in_memory_slerp_of_the_sweep_equals_the_recipe_folder(folders, tmp_path):
    """c2f-sweep --method slerp merges in memory for lm-eval (merge.merge_params on our stacked param
    trees) and through a recipe for its folders: the two agree, tensor for tensor."""
    (_, coarse), (_, sft) = hf.load_pretrained(folders["b"]), hf.load_pretrained(folders["a"])
    merged = merge.merge_params(coarse, sft, 0.3, method="slerp")
    made = recipe.write_recipe(recipe.slerp_recipe(folders["b"], folders["a"], 0.3), tmp_path / "r")
    _, written = hf.load_pretrained(tmp_path / "r")
    assert made["parameters"] == {"t": 0.3}
    worst = max(
        float(np.abs(np.asarray(x) - np.asarray(y)).max())
        for x, y in zip(jax.tree.leaves(merged), jax.tree.leaves(written), strict=True)
    )
    assert worst <= 1e-6, worst


def merge_in_chunks(merger, arrays, chunk):
    """`merger` run as the streaming merge runs it: every pass over chunks of `chunk` elements, in order."""
    flat = [a.reshape(-1).astype(np.float32) for a in arrays]
    pieces = lambda: [(s, [x[s : s + chunk] for x in flat]) for s in range(0, flat[0].size, chunk)]
    for p in range(merger.counting_passes):
        for start, chunks in pieces():
            merger.observe(p, start, chunks)
    return np.concatenate([merger.merge(start, chunks) for start, chunks in pieces()])


def tied_inputs(size=10_003, models=2, seed=0):
    """A base and `models` fine-tunes whose deltas take few distinct values (many equal magnitudes, zeros
    among them), as bfloat16 checkpoints make them: the hard case for a magnitude cut."""
    rng = np.random.default_rng(seed)
    base = np.round(rng.standard_normal(size, dtype=np.float32) * 64) / 64  # so that every delta is exact
    return [base] + [base + rng.integers(-4, 5, size).astype(np.float32) * np.float32(0.25) for _ in range(models)]


MERGERS = {
    "slerp": lambda size: methods.Slerp(0.3),
    "linear": lambda size: methods.Linear([0.7, 0.2, 0.4]),
    "task_arithmetic": lambda size: methods.TaskVectors("task_arithmetic", [0.7, 0.5], size, lam=0.8),
    "ties": lambda size: methods.TaskVectors("ties", [0.7, 0.5], size, [0.3, 0.61]),
    "dare_linear": lambda size: methods.TaskVectors("dare_linear", [0.7, 0.5], size, [0.3, 0.6], seed=3, tensor="x"),
    "dare_ties": lambda size: methods.TaskVectors("dare_ties", [0.7, 0.5], size, [0.3, 0.6], seed=3, tensor="x"),
}


@pytest.mark.parametrize("method", list(MERGERS))
@pytest.mark.parametrize("chunk", [64, 1000])
def test_a_method_merges_in_chunks_as_it_merges_whole(method, chunk):
    """Chunking changes nothing: bit for bit, or where a whole-tensor sum is added in another order (SLERP's
    norms and dot, DARE's L1 norms), within float32 rounding."""
    inputs = tied_inputs()[: 2 if method == "slerp" else 3]
    whole = methods.merge_whole(MERGERS[method](inputs[0].size), inputs)
    chunked = merge_in_chunks(MERGERS[method](inputs[0].size), inputs, chunk)
    if method in ("slerp", "dare_linear", "dare_ties"):  # whole-tensor sums, added in another order
        np.testing.assert_allclose(chunked, whole, rtol=1e-6, atol=1e-7)
    else:
        np.testing.assert_array_equal(chunked, whole)


@pytest.mark.parametrize("density", [0.0001, 0.3, 0.5, 0.99])
def test_ties_keeps_exactly_the_largest_magnitudes_when_many_are_equal(density):
    """The streaming cut keeps max(1, int(density * n)) entries, none smaller than one it drops (argsort's
    magnitudes, as mergekit keeps), and of the entries equal to the cut the first ones in index order."""
    values = np.array([-1, -0.75, -0.5, -0.25, 0.25, 0.5, 0.75, 1], np.float32)  # eight magnitudes: ties galore
    delta = np.random.default_rng(0).choice(values, 10_003)
    keep = max(1, int(density * delta.size))
    kept = merge_in_chunks(SparsifyOnly(methods.TopMagnitudes(delta.size, density)), [delta], 96)
    on, magnitude = kept != 0, np.abs(delta)
    assert on.sum() == keep
    np.testing.assert_array_equal(kept[on], delta[on])
    np.testing.assert_array_equal(np.sort(magnitude[on]), np.sort(magnitude)[-keep:])
    cut = magnitude[on].min()
    assert (~on).all() or magnitude[~on].max() <= cut
    equal_kept = np.flatnonzero(on & (magnitude == cut))
    np.testing.assert_array_equal(equal_kept, np.flatnonzero(magnitude == cut)[: len(equal_kept)])


def test_dare_draws_are_addressed_by_element_not_by_chunk():
    drops = methods.RandomDrops(0.4, rescale=True, seed=5, tensor="model.layers.0.mlp.up_proj.weight", model=1)
    whole = drops.kept(0, 10_002)
    assert np.array_equal(whole, np.concatenate([drops.kept(s, min(64, 10_002 - s)) for s in range(0, 10_002, 64)]))
    assert abs(whole.mean() - 0.4) < 4 * np.sqrt(0.4 * 0.6 / whole.size)
    other = methods.RandomDrops(0.4, rescale=True, seed=5, tensor="model.layers.0.mlp.up_proj.weight", model=0)
    assert not np.array_equal(whole, other.kept(0, 10_002))
    with pytest.raises(ValueError, match="not a multiple of 4"):
        drops.kept(6, 10)


@pytest.mark.parametrize("method", ["ties", "dare_ties", "slerp"])
def test_the_recipe_streams_in_chunks_and_hashes_each_input_once(folders, tmp_path, method):
    """A folder merged in 256-byte chunks equals the default (2 MiB) merge, tensor for tensor; each input's
    sha256 is the same whether the method reads it once or three times."""
    body = CASES.get(method) or CASES["ties"].replace("ties", method)
    config = tmp_path / "r.yml"
    config.write_text(f"merge_method: {method}\n" + body.format(**folders) + "dtype: float32\n")
    made = [
        recipe.write_recipe(recipe.read_recipe(config), tmp_path / name, seed=4, chunk_bytes=size)
        for name, size in (("small", 256), ("default", 2 << 20))
    ]
    small, default = tensors(tmp_path / "small"), tensors(tmp_path / "default")
    assert set(small) == set(default)
    for name in small:  # the whole-tensor sums (SLERP's dot, DARE's L1) are added in another order
        np.testing.assert_allclose(
            small[name],
            default[name],
            rtol=0 if method == "ties" else 1e-6,
            atol=0 if method == "ties" else 1e-7,
            err_msg=name,
        )
    assert made[0]["inputs"] == made[1]["inputs"]
    linear = recipe.write_recipe(recipe.read_recipe(_linear_recipe(tmp_path, folders)), tmp_path / "linear")
    digests = {e["path"]: e["sha256"] for e in linear["inputs"]}
    assert all(digests[e["path"]] == e["sha256"] for e in made[0]["inputs"] if e["path"] in digests)
    assert any(e["path"] in digests for e in made[0]["inputs"])


def _linear_recipe(tmp_path, folders):
    path = tmp_path / "linear.yml"
    path.write_text("merge_method: linear\n" + CASES["linear"].format(**folders))
    return path


def test_a_recipe_merge_holds_a_few_chunks_whatever_the_tensor_size(tmp_path):
    """Traced host memory (NumPy's buffers included) of a TIES merge of three models, with a 1 MB and with a
    16 MB embedding and LM head: the peak (reads, histograms, the write-behind ring, in 64 KiB chunks) does not
    grow with the tensors, where merging whole tensors held several float32 copies of the largest."""
    import tracemalloc

    from c2f_jax.model import model

    peaks = {}
    for vocab in (2048, 32768):
        config = model.MistralConfig(
            vocab_size=vocab,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
        )
        paths = [tmp_path / f"{name}-{vocab}" for name in ("base", "a", "b")]
        for seed, path in enumerate(paths):
            bench_merge.write_checkpoint(path, config, seed)
        yml = tmp_path / f"ties-{vocab}.yml"
        yml.write_text(
            f"merge_method: ties\nbase_model: {paths[0]}\nmodels:\n"
            + "".join(f"  - model: {p}\n    parameters: {{weight: 0.5, density: 0.4}}\n" for p in paths[1:])
        )
        tracemalloc.start()
        try:
            recipe.write_recipe(recipe.read_recipe(yml), tmp_path / f"out-{vocab}", chunk_bytes=64 << 10)
            peaks[vocab * 128 * 4] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    print(
        "TIES of 3 models, 64 KiB chunks: traced peak "
        + ", ".join(f"{p / 2**20:.2f} MiB with a {n / 2**20:.0f} MiB embedding" for n, p in peaks.items())
    )
    (small, small_peak), (large, large_peak) = peaks.items()
    assert large_peak - small_peak < (large - small) / 16 and large_peak < large / 4, peaks


def test_a_float32_merge_starts_without_jax_or_ml_dtypes(folders, tmp_path):
    """The merger's start-up is part of every merge's time: it imports neither JAX nor ml_dtypes (0.57 s to
    import on the CI VM) unless a tensor or the output is bfloat16 / float8."""

    def imported(extra: str, out: str) -> str:
        (tmp_path / f"{out}.yml").write_text("merge_method: slerp\n" + CASES["slerp"].format(**folders) + extra)
        script = (
            "import sys; from c2f_jax.cli import merge; "
            f"merge.main(['--config', {str(tmp_path / f'{out}.yml')!r}, '--out', {str(tmp_path / out)!r}]); "
            "print(sorted(m for m in ('jax', 'ml_dtypes', 'torch') if m in sys.modules))"
        )
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout.splitlines()[-1]

    assert imported("", "out") == "[]"
    assert imported("out_dtype: bfloat16\n", "out16") == "['ml_dtypes']"


def test_rounding_to_bfloat16_is_ml_dtypes_round_to_nearest_even():
    """The bit-level rounding the task vectors use for a bfloat16 dtype, against ml_dtypes' cast: random values,
    halfway cases, subnormals, the largest finite value (which rounds to inf), inf, -0.0 and NaN."""
    rng = np.random.default_rng(0)
    x = np.concatenate(
        [
            rng.standard_normal(100_000, dtype=np.float32)
            * np.float32(10) ** rng.integers(-40, 38, 100_000).astype(np.float32),
            np.array(
                [1 + 2**-8, 1 + 3 * 2**-8, 1e-40, -1e-41, np.finfo(np.float32).max, np.inf, -np.inf, -0.0, np.nan],
                np.float32,
            ),
            np.uint32([0x7F800001, 0xFFC00001, 0x7FFFFFFF, 0xFFFFFFFF, 0x7FFF8000]).view(np.float32),
        ]
    )
    with np.errstate(over="ignore", invalid="ignore"):  # ml_dtypes' cast warns of the NaN and the overflow
        got, want = methods.rounding(BF16)(x), x.astype(BF16).astype(np.float32)
    assert np.array_equal(np.isnan(got), np.isnan(want))
    finite = ~np.isnan(want)
    assert np.array_equal(got[finite].view(np.uint32), want[finite].view(np.uint32))


def test_linear_merges_its_models_not_a_base_model_beside_them(folders, tmp_path):
    """mergekit's linear ignores a base_model that is not among its models; so does ours (the base is neither
    weighted nor read)."""
    body = CASES["linear"].format(**folders)
    (tmp_path / "plain.yml").write_text("merge_method: linear\n" + body)
    (tmp_path / "based.yml").write_text(f"merge_method: linear\nbase_model: {folders['base']}\n" + body)
    made = [recipe.write_recipe(recipe.read_recipe(tmp_path / f"{n}.yml"), tmp_path / n) for n in ("plain", "based")]
    plain, based = tensors(tmp_path / "plain"), tensors(tmp_path / "based")
    assert all(np.array_equal(plain[n], based[n]) for n in plain)
    assert [e["path"] for e in made[1]["inputs"]] == [str(folders["a"].resolve()), str(folders["b"].resolve())]


def test_dare_in_float16_rescales_in_float32_as_mergekit_does():
    """A float16 delta's L1 norm overflows float16 (65504): mergekit drops and rescales it in float32 and rounds
    the result; rounding the norms to float16 made the merge inf and NaN."""
    base = np.zeros(200_000, np.float32)
    model = np.full(200_000, 0.5, np.float32)
    merged = methods.merge_whole(
        methods.TaskVectors("dare_linear", [1.0], base.size, [0.5], dtype=np.float16, tensor="x"), [base, model]
    )
    assert np.isfinite(merged).all()
    assert np.abs(merged).sum() == pytest.approx(np.abs(model).sum(), rel=1e-3)


def test_dare_without_rescale_keeps_the_kept_entries_as_they_are(folders, tmp_path):
    """parameters.rescale: false (mergekit's) is honoured: every entry is the delta or nothing."""
    (tmp_path / "r.yml").write_text(
        f"merge_method: dare_linear\nbase_model: {folders['base']}\nmodels:\n"
        f"  - model: {folders['a']}\n    parameters: {{weight: 1.0, density: 0.5}}\n"
        "parameters: {rescale: false}\n"
    )
    recipe.write_recipe(recipe.read_recipe(tmp_path / "r.yml"), tmp_path / "out", seed=3)
    base, a, out = tensors(folders["base"]), tensors(folders["a"]), tensors(tmp_path / "out")
    name = "model.layers.0.mlp.down_proj.weight"
    delta, kept = a[name] - base[name], out[name] - base[name]
    dropped = kept == 0
    assert 0.4 < dropped.mean() < 0.6
    np.testing.assert_allclose(kept[~dropped], delta[~dropped], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "line, words",
    [
        ("parameters: {{t: .nan}}\n", "parameters.t: nan is not a finite number"),
        ("dtype: [bfloat16]\n", "dtype: ['bfloat16'] is not a string"),
    ],
)
def test_a_recipe_value_of_the_wrong_kind_is_refused_in_one_line(folders, tmp_path, line, words):
    yml = tmp_path / "r.yml"
    yml.write_text("merge_method: slerp\nbase_model: {a}\nmodels:\n  - model: {b}\n".format(**folders) + line.format())
    with pytest.raises(merge.MergeError) as e:
        recipe.read_recipe(yml)
    assert words in str(e.value) and "\n" not in str(e.value), e.value
