"""The compiled rollout: same tokens as transformers' generate, EOS handling, filters, static shapes."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import hf_model, left_padded_batch

from c2f_jax import data
from c2f_jax.data import DataError
from c2f_jax.model import hf, model
from c2f_jax.rl import rollout
from c2f_jax.rl.rollout import RolloutError, SamplingConfig
from c2f_jax.runtime import backend, compilations

ROOT = Path(__file__).resolve().parent.parent
P, R = 12, 20  # prompt 12 + response 20 > sliding window 8


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    hm = hf_model(pad_token_id=0)
    path = tmp_path_factory.mktemp("gen") / "hf"
    hm.save_pretrained(path)
    config, params = hf.load_pretrained(path)
    return hm, config, params


@pytest.fixture(scope="module")
def prompts():
    ids, mask, _ = left_padded_batch(128, length=P, pads=(0, 3, 7))
    return ids, mask


def hf_generate(hm, ids, mask, **kw):
    with torch.no_grad():
        out = hm.generate(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            do_sample=False,
            max_new_tokens=R,
            pad_token_id=0,
            **kw,
        )
    return out[:, ids.shape[1] :].numpy()


def greedy(config, params, ids, mask, **kw):
    return rollout.generate(config, params, ids, mask, jax.random.key(0), max_new_tokens=R, temperature=0.0, **kw)


def laid_out(config, params, layout):
    """(config, params) as loaded ("stacked") or as the rollout copy ("per-layer")."""
    if layout == "stacked":
        return config, params
    config = rollout.rollout_layout(config, backend.of(jax.default_backend()))
    return config, rollout.rollout_params(config, params)


@pytest.mark.parametrize("layout", ["stacked", "per-layer"])
def test_greedy_matches_transformers_with_eos_suppressed(tiny, prompts, layout):
    hm, config, params = tiny
    config, params = laid_out(config, params, layout)
    if layout == "per-layer":
        assert "layers" not in params and params["layers_1"]["mlp"]["up"].shape == (64, 96)
        down = "down_t" if config.transposed_down else "down"  # transposed on CPU only
        assert set(params["layers_1"]["mlp"]) == {"gate", "up", down}
    ours = greedy(config, params, *prompts, suppress_token_ids=[2])
    ref = hf_generate(hm, *prompts, min_new_tokens=R, suppress_tokens=[2])
    np.testing.assert_array_equal(np.asarray(ours.tokens), ref)
    assert np.asarray(ours.mask).all()


STATIC = ("config", "max_new_tokens", "sampling", "eos_token_ids", "pad_id", "chunk")
decode = jax.jit(rollout.decode, static_argnames=STATIC)


def decode_greedy(config, params, ids, mask, *, chunk, eos=(2,), suppress=()):
    """rollout.decode at temperature 0 with a given chunk size: (tokens, mask, decode steps run) as numpy."""
    out, ran = decode(
        params,
        jnp.asarray(ids, jnp.int32),
        jnp.asarray(mask, jnp.int32),
        jax.random.key(0),
        config=config,
        max_new_tokens=R,
        sampling=SamplingConfig(0.0, 0, 1.0, tuple(suppress)),
        eos_token_ids=tuple(eos),
        pad_id=0,
        chunk=chunk,
    )
    return np.asarray(out.tokens), np.asarray(out.mask), int(ran)


def test_decode_chunks_cover_every_step_once():
    for new, chunk in [(1, 128), (2, 128), (20, 4), (129, 128), (1024, 128), (4096, 128), (20, 1)]:
        chunks = rollout.decode_chunks(new, chunk)
        steps = [t for first, end in chunks for t in range(first, end)]
        assert steps == list(range(1, new)), (new, chunk)
        assert len(chunks) <= rollout.MAX_DECODE_CHUNKS
    assert rollout.decode_chunks(1024) == [(1 + 128 * i, min(129 + 128 * i, 1024)) for i in range(8)]


@pytest.mark.parametrize("layout", ["stacked", "per-layer"])
def test_chunked_decode_matches_transformers(tiny, prompts, layout):
    """Chunks of 4 steps attend over 16, 20, .. 31 cache positions: sliding window 8, left pads, 2 kv heads."""
    hm, config, params = tiny
    tokens, mask, ran = decode_greedy(*laid_out(config, params, layout), *prompts, chunk=4, suppress=(2,))
    np.testing.assert_array_equal(tokens, hf_generate(hm, *prompts, min_new_tokens=R, suppress_tokens=[2]))
    assert mask.all() and ran == R - 1


@pytest.mark.slow  # compiles decoding at several chunk sizes
def test_decoding_stops_between_chunks_once_every_row_has_stopped(tiny, prompts):
    _, config, params = tiny
    free, _, _ = decode_greedy(config, params, *prompts, chunk=4, eos=())  # nothing stops it
    eos = tuple(sorted({int(free[0, 2]), int(free[1, 5]), int(free[2, 8])}))  # rows stop by tokens 2, 5 and 8
    alive = np.cumsum(np.isin(free, eos), axis=1) - np.isin(free, eos) == 0  # [B, R]: no EOS before t
    for chunk in (1, 2, 4, 1000):
        tokens, mask, ran = decode_greedy(config, params, *prompts, chunk=chunk, eos=eos)
        np.testing.assert_array_equal(mask, alive.astype(np.int32))
        np.testing.assert_array_equal(tokens, np.where(alive, free, 0))
        expected = sum(end - first for first, end in rollout.decode_chunks(R, chunk) if alive[:, first].any())
        assert ran == expected, chunk
    assert ran == R - 1  # one chunk: it had begun before any row stopped
    assert decode_greedy(config, params, *prompts, chunk=2, eos=eos)[2] <= 9 < R - 1
    everything = tuple(range(config.vocab_size))  # every row stops at its first token: no decode step at all
    tokens, mask, ran = decode_greedy(config, params, *prompts, chunk=4, eos=everything)
    assert ran == 0 and (mask[:, 0] == 1).all() and not mask[:, 1:].any() and not tokens[:, 1:].any()


def test_rollout_copy_computes_the_same_logits(tiny, prompts):
    _, config, params = tiny
    expected = model.forward(config, params, *prompts)
    for platform in ("cpu", "gpu"):  # both layouts, whatever this machine is
        r_config = rollout.rollout_layout(config, backend.of(platform))
        r_params = rollout.rollout_params(r_config, params)
        assert r_config.transposed_down == (platform == "cpu") and not r_config.scan_layers
        ours = model.forward(r_config, r_params, *prompts)
        np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)
        # A copy of a copy is the same copy, and the train layout comes back unchanged.
        again = rollout.rollout_params(r_config, r_params)
        assert jax.tree.structure(again) == jax.tree.structure(r_params)
        back = rollout.rollout_params(config, r_params)
        jax.tree.map(np.testing.assert_array_equal, back, params)


def test_mask_ends_at_eos_like_transformers(tiny, prompts):
    hm, config, params = tiny
    free = np.asarray(greedy(config, params, *prompts, suppress_token_ids=[2]).tokens)
    eos = int(free[0, 3])  # a token row 0 greedily emits: call it EOS
    ours = greedy(config, params, *prompts, eos_token_ids=(eos,))
    ref = hf_generate(hm, *prompts, eos_token_id=eos)
    tokens, mask = np.asarray(ours.tokens), np.asarray(ours.mask)
    np.testing.assert_array_equal(tokens[:, : ref.shape[1]], ref)  # HF pads finished rows with pad_token_id
    first_eos = list(tokens[0]).index(eos)
    assert mask[0, : first_eos + 1].all() and not mask[0, first_eos + 1 :].any()
    assert (tokens[0, first_eos + 1 :] == 0).all()
    # Suppressed, the model's favourite token never appears and every response runs to the limit.
    held = greedy(config, params, *prompts, eos_token_ids=(eos,), suppress_token_ids=(eos,))
    assert eos not in np.asarray(held.tokens) and np.asarray(held.mask).all()


def test_suppressed_token_never_sampled_even_when_most_likely():
    logits = jnp.zeros((4, 10)).at[:, 2].set(8.0)  # EOS holds ~99% of the mass
    draws = jax.vmap(lambda k: rollout.sample_token(logits, k, SamplingConfig(suppress_token_ids=(2,))))(
        jax.random.split(jax.random.key(0), 500)
    )
    assert (np.asarray(draws) != 2).all()
    free = jax.vmap(lambda k: rollout.sample_token(logits, k, SamplingConfig()))(
        jax.random.split(jax.random.key(0), 50)
    )
    assert (np.asarray(free) == 2).mean() > 0.9


def test_top_k_and_top_p_keep_only_allowed_tokens():
    probs = np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
    logits = jnp.log(jnp.asarray(probs))[None].repeat(2, 0)[:, ::-1]  # best token last, to catch index slips
    keys = jax.random.split(jax.random.key(1), 2000)

    def allowed(s):
        filtered = np.isfinite(np.asarray(rollout.filter_logits(logits, s)))[0]
        draws = np.asarray(jax.vmap(lambda k: rollout.sample_token(logits, k, s))(keys)).ravel()
        return set(np.flatnonzero(filtered)), set(draws)

    kept, drawn = allowed(SamplingConfig(top_k=2))
    assert kept == {5, 4} and drawn == kept
    kept, drawn = allowed(SamplingConfig(top_p=0.7))  # 0.4 + 0.25 < 0.7: the third token completes the mass
    assert kept == {5, 4, 3} and drawn == kept
    kept, _ = allowed(SamplingConfig(top_p=0.3))  # the top token always survives
    assert kept == {5}
    kept, drawn = allowed(SamplingConfig(top_k=3, top_p=0.6))  # top-3 renormalised: 0.5, 0.31, 0.19
    assert kept == {5, 4} and drawn == kept


def test_same_rng_same_sample(tiny, prompts):
    _, config, params = tiny
    run = lambda seed: np.asarray(
        rollout.generate(config, params, *prompts, jax.random.key(seed), max_new_tokens=R, top_k=50).tokens
    )
    np.testing.assert_array_equal(run(7), run(7))
    assert (run(7) != run(8)).any()


def test_new_batches_of_a_bucket_do_not_recompile(tiny):
    _, config, params = tiny
    # params as loaded: the program that makes the rollout copy and samples (on the copy: jit(sample))
    compiled = lambda: sum(compilations.by_name().get(name, 0) for name in ("jit(sample)", "jit(_sample_loaded)"))

    def batch(seed):
        ids, mask, _ = left_padded_batch(128, length=16, pads=(seed % 5, 2, 9), seed=seed)
        return rollout.generate(
            config, params, ids, mask, jax.random.key(seed), max_new_tokens=8, suppress_token_ids=(2,)
        )

    jax.block_until_ready(batch(0))
    before = compiled()
    for seed in range(1, 4):
        jax.block_until_ready(batch(seed))
    assert compiled() == before
    jax.block_until_ready(
        rollout.generate(
            config,
            params,
            *left_padded_batch(128, length=16)[:2],
            jax.random.key(0),
            max_new_tokens=16,
            suppress_token_ids=(2,),
        )
    )
    assert compiled() == before + 1  # a new response bucket is a new program, once


def test_bucketing_and_truncation():
    ids, mask = data.left_pad([[5, 6, 7], [8]], buckets=(4, 8))
    np.testing.assert_array_equal(ids, [[0, 5, 6, 7], [0, 0, 0, 8]])
    np.testing.assert_array_equal(mask, [[0, 1, 1, 1], [0, 0, 0, 1]])
    with pytest.raises(DataError, match="longer than the largest bucket 8"):
        data.left_pad([list(range(1, 11))], buckets=(4, 8))
    ids, mask = data.left_pad([list(range(1, 11))], buckets=(4, 8), truncate=True)
    np.testing.assert_array_equal(ids[0], list(range(3, 11)))
    with pytest.raises(DataError, match="at least one token"):
        data.left_pad([[1], []], buckets=(4,))


def test_right_padded_prompts_are_refused(tiny):
    _, config, params = tiny
    with pytest.raises(RolloutError, match="left-padded"):
        rollout.generate(config, params, [[5, 6, 0]], [[1, 1, 0]], jax.random.key(0), max_new_tokens=2)
    with pytest.raises(RolloutError, match="top_p"):
        rollout.generate(config, params, [[5, 6]], [[1, 1]], jax.random.key(0), max_new_tokens=2, top_p=0.0)


# ----------------------------------------------------------------------------- c2f-generate


@pytest.mark.slow  # the command as a subprocess
def test_generate_cli_writes_jsonl(tiny, tmp_path):
    hm, _, _ = tiny
    from c2f_jax.model import tokenizer

    model_dir = tmp_path / "m"
    hm.save_pretrained(model_dir)
    tokenizer.load_tokenizer(None).save_pretrained(model_dir)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": q}) for q in ["Hello there", "What is RLHF?", "Why?"]))
    out = tmp_path / "out.jsonl"
    cmd = [
        sys.executable,
        "-m",
        "c2f_jax.cli.generate",
        "--model",
        str(model_dir),
        "--prompts-file",
        str(prompts),
        "--max-new-tokens",
        "6",
        "--suppress-eos",
        "--system-prompt",
        "coarse",
        "--batch-size",
        "2",
        "--out",
        str(out),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["Hello there", "What is RLHF?", "Why?"]
    assert all(r["num_tokens"] == 6 and not r["ended_with_eos"] for r in rows)
    bad = subprocess.run(cmd[:3] + ["--model", str(tmp_path / "nope"), "--prompt", "x"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "not a model folder" in bad.stderr


def test_bundled_tokenizer_is_mistral_v01():
    from c2f_jax.model import tokenizer

    tok = tokenizer.load_tokenizer(None)
    assert len(tok) == 32000 and (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    assert tok("Hello world").input_ids == [1, 22557, 1526]
    assert set(tokenizer.stop_token_ids(tok)) == {0, 1, 2}
    text = tokenizer.format_prompt("Why is the sky blue?", tokenizer.COARSE_SYSTEM_PROMPT)
    assert text.startswith("Below is an instruction") and text.endswith("\n\nHuman: Why is the sky blue?\n\nAssistant:")


def test_drawn_tokens_carry_their_logprob_under_the_filtered_distribution():
    logits = jax.random.normal(jax.random.key(3), (6, 700)) * 3
    for s in (
        SamplingConfig(temperature=0.7, suppress_token_ids=(2,)),
        SamplingConfig(top_k=5),
        SamplingConfig(top_p=0.8),
        SamplingConfig(temperature=0.0),
    ):
        token, logprob = rollout.draw(logits, jax.random.key(4), s)
        want = jax.nn.log_softmax(rollout.filter_logits(logits, s), axis=-1)
        np.testing.assert_allclose(logprob, jnp.take_along_axis(want, token[:, None], -1)[:, 0], atol=2e-5)
