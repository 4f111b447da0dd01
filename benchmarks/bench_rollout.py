"""Rollout throughput: our compiled `generate` against transformers' `generate`, side by side.

  python benchmarks/bench_rollout.py                      # the CPU sizes: (4 layers, d=256) and (8 layers, d=512)
  python benchmarks/bench_rollout.py --sizes 16x2048 --batch 64 --new-tokens 512 --dtype bfloat16 --hf-device cuda
                                                     # a ~1B model on one GPU, with the memory-bandwidth bound

Same random weights and shapes on both sides (vocab 32000, sampling at temperature 1,
every response forced to the full length). Prints a Markdown table; the ratio is
ours / transformers in generated tokens per second. On a GPU it also measures the
card's copy bandwidth and prints the fraction of the memory-bandwidth bound: every
decode step must read each weight once (not the embedding table, of which it
gathers B rows) and the filled part of the KV cache, on average prompt + new / 2
positions.

A second table (ours only, on the first size) shows how decoding scales with the
response length: tokens/s at the two `--lengths` with EOS suppressed, the per-token
time of the longer against the shorter beside the ratio the bytes per step allow,
a batch whose rows all stop at their first token (EOS allowed) against the full
decode, and a long-context row (`--long`, prompt 512 + 1024 new tokens) against
the bandwidth bound, with the memory bandwidth measured on this device.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from c2f_jax.model import hf, model
from c2f_jax.rl import rollout
from c2f_jax.runtime import backend


def bench_config(layers: int, d: int, kv_heads: int = 0) -> model.MistralConfig:
    heads = max(d // 64, 1)
    return model.MistralConfig(
        vocab_size=32000,
        hidden_size=d,
        intermediate_size=int(3.5 * d),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or max(heads // 4, 1),
        head_dim=64,
        max_position_embeddings=8192,
    )


def time_it(fn, repeats: int) -> float:
    fn()  # warm-up (compilation on our side, allocator warm-up on theirs)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def memory_bandwidth() -> float:
    """Bytes per second the default device's memory moves, median of 10: on a GPU read + written by a 1 GiB
    device-to-device copy; on CPU read by a reduction over 256 MiB (XLA:CPU's elementwise copy ran at a third
    of that, a bound the decode step itself beat)."""
    on_gpu = jax.devices()[0].platform == "gpu"
    x = jax.random.normal(jax.random.key(0), ((1 << 28) if on_gpu else (1 << 26),), jnp.float32)
    if on_gpu:
        moved, run = 2 * x.nbytes, jax.jit(lambda a: a * 1.0)  # not a no-op: XLA must read and write every element
    else:
        moved, run = x.nbytes, jax.jit(lambda a: jnp.max(a.reshape(-1, 8192), axis=1))
    jax.block_until_ready(run(x))
    times = []
    for _ in range(10):
        start = time.perf_counter()
        jax.block_until_ready(run(x))
        times.append(time.perf_counter() - start)
    return moved / float(np.median(times))


def bytes_per_step(config: model.MistralConfig, params, batch: int, prompt: int, new: int) -> float:
    """Fewest bytes one decode step reads: weights bar the embedding table, plus the average filled KV cache."""
    weights = sum(x.nbytes for x in jax.tree.leaves(params))
    if not config.tie_word_embeddings:
        weights -= params["embed"].nbytes
    itemsize = jnp.dtype(config.compute_dtype).itemsize
    kv = 2 * config.num_hidden_layers * batch * (prompt + new / 2) * config.num_key_value_heads * config.head_dim
    return weights + kv * itemsize


def matmul_step_seconds(config: model.MistralConfig, params, batch: int, repeats: int = 10) -> float:
    """Seconds for one decode step's weight matmuls alone (every weight matrix but the embedding table against
    [batch, in] inputs, each in the orientation the rollout uses), in one compiled program, best of `repeats`:
    the floor XLA's own matmuls put under a step."""
    weights, out_major = [], []  # each [in, out], or [out, in] where the rollout stores it so (down_t)
    for path, w in jax.tree_util.tree_leaves_with_path(params):
        name = getattr(path[-1], "key", "")
        if w.ndim < 2 or (name == "embed" and not config.tie_word_embeddings):
            continue
        weights.append(
            w.T if name == "embed" else w.reshape(-1, w.shape[-1]) if name == "o" else w.reshape(w.shape[0], -1)
        )
        out_major.append(name == "down_t")

    def product(w, transposed):
        x = jnp.ones((batch, w.shape[1] if transposed else w.shape[0]), w.dtype)
        return (jnp.einsum("oi,bi->ob", w, x) if transposed else x @ w)[0, 0]

    step = jax.jit(lambda ws: sum(product(w, t) for w, t in zip(ws, out_major)))
    return time_it(lambda: jax.block_until_ready(step(weights)), repeats)


def decode_seconds(config, params, batch: int, prompt: int, new: int, repeats: int, stop_at_once: bool = False):
    """Best-of-`repeats` seconds of one `generate` call: EOS suppressed, or (stop_at_once) every vocabulary id an
    EOS, so every row stops at its first token and the decode can end there."""
    ids = np.random.RandomState(0).randint(3, config.vocab_size, (batch, prompt)).astype(np.int32)
    eos = {"eos_token_ids": tuple(range(config.vocab_size))} if stop_at_once else {"suppress_token_ids": (2,)}

    def run():
        out = rollout.generate(config, params, ids, np.ones_like(ids), jax.random.key(1), max_new_tokens=new, **eos)
        jax.block_until_ready(out.tokens)

    return time_it(run, repeats)


def length_table(
    config, params, batch: int, prompt: int, lengths: tuple[int, int], long: tuple[int, int], repeats: int
) -> None:
    """The second table: decode time against response length, early stop, and a long-context row."""
    short, full = lengths
    per_token = {n: decode_seconds(config, params, batch, prompt, n, repeats) / n for n in lengths}
    ideal = bytes_per_step(config, params, batch, prompt, full) / bytes_per_step(config, params, batch, prompt, short)
    stop = decode_seconds(config, params, batch, prompt, full, repeats, stop_at_once=True)
    long_prompt, long_new = long
    long_s = decode_seconds(config, params, batch, long_prompt, long_new, repeats)
    bandwidth = memory_bandwidth()
    long_bound = batch * bandwidth / bytes_per_step(config, params, batch, long_prompt, long_new)
    long_tps = batch * long_new / long_s
    print(
        f"\nDecode length and early stop, ours only ({config.num_hidden_layers} layers, d={config.hidden_size}, "
        f"{config.num_key_value_heads} kv heads, batch {batch}); memory bandwidth {bandwidth / 1e9:,.1f} GB/s "
        f"({'copy, read + write' if jax.devices()[0].platform == 'gpu' else 'read'}):\n"
    )
    print(
        "| case | prompt + new | s | tok/s | per-token time vs the first row | bytes per step allow | "
        "bandwidth bound tok/s | ours / bound |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for n in lengths:
        vs = f"{per_token[n] / per_token[short]:.2f}x"
        allow = f"{ideal:.2f}x" if n == full else "1.00x"
        print(
            f"| EOS suppressed | {prompt} + {n} | {per_token[n] * n:.3f} | {batch / per_token[n]:,.0f} | {vs} | "
            f"{allow} | - | - |"
        )
    print(
        f"| every row stops at its first token | {prompt} + {full} | {stop:.3f} | - | "
        f"{stop / (per_token[full] * full):.3f} of the full decode | - | - | - |"
    )
    print(
        f"| long context, EOS suppressed | {long_prompt} + {long_new} | {long_s:.3f} | {long_tps:,.0f} | - | - | "
        f"{long_bound:,.0f} | {long_tps / long_bound:.0%} |",
        flush=True,
    )
    print(
        "\nbytes per step: every weight but the embedding table plus the KV cache filled on average "
        "(prompt + new / 2 positions); the bound is the batch over those bytes at the memory bandwidth."
    )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="4x256,8x512", help="comma-separated LAYERSxWIDTH")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="float32", help="our compute and param dtype")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers side")
    p.add_argument("--hf-device", default="cpu", help="torch device of the transformers side (cpu or cuda)")
    p.add_argument("--lengths", default="128,1024", help="SHORT,FULL new tokens of the decode-length table")
    p.add_argument("--long", default="512+1024", help="PROMPT+NEW of the long-context row")
    p.add_argument("--no-lengths", action="store_true", help="skip the decode-length table")
    p.add_argument("--kv-heads", type=int, default=0, help="kv heads (default: a quarter of the heads)")
    args = p.parse_args(argv)
    lengths = tuple(int(x) for x in args.lengths.split(","))
    long = tuple(int(x) for x in args.long.split("+"))
    if len(lengths) != 2 or len(long) != 2 or min(*lengths, *long) < 1:
        p.error(f"--lengths {args.lengths!r} must be SHORT,FULL and --long {args.long!r} PROMPT+NEW, positive")

    print(
        f"device: {jax.devices()[0].device_kind} ({platform.processor() or platform.machine()}), "
        f"batch {args.batch}, prompt {args.prompt}, {args.new_tokens} new tokens, vocab 32000\n"
    )
    on_gpu = jax.devices()[0].platform == "gpu"
    bandwidth = memory_bandwidth() if on_gpu else float("nan")
    if on_gpu:
        print(f"measured copy bandwidth: {bandwidth / 1e12:.2f} TB/s (read + write)\n")
    print(
        "| size | params | ours tok/s | loaded params tok/s | transformers tok/s | ratio | bandwidth bound tok/s "
        "| ours / bound | matmul bound tok/s | ours / matmul bound |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    first = None  # the rollout model of the first size, for the decode-length table
    for size in args.sizes.split(","):
        layers, d = (int(x) for x in size.split("x"))
        config = bench_config(layers, d, args.kv_heads).replace(param_dtype=args.dtype, compute_dtype=args.dtype)
        params = model.init_params(config, jax.random.key(0))
        n_params = sum(x.size for x in jax.tree.leaves(params))
        rng = np.random.RandomState(0)
        ids = rng.randint(3, 32000, (args.batch, args.prompt)).astype(np.int32)
        mask = np.ones_like(ids)
        new = args.batch * args.new_tokens

        r_config = rollout.rollout_layout(config, backend.of(jax.default_backend()))
        r_params = rollout.rollout_params(r_config, params)

        def ours():
            out = rollout.generate(
                r_config,
                r_params,
                ids,
                mask,
                jax.random.key(1),
                max_new_tokens=args.new_tokens,
                suppress_token_ids=(2,),
            )
            jax.block_until_ready(out.tokens)

        ours_tps = new / time_it(ours, args.repeats)

        def loaded():  # the public call on params as loaded: the program makes the rollout copy itself
            out = rollout.generate(
                config, params, ids, mask, jax.random.key(1), max_new_tokens=args.new_tokens, suppress_token_ids=(2,)
            )
            jax.block_until_ready(out.tokens)

        loaded_tps = new / time_it(loaded, args.repeats)
        theirs_tps = float("nan")
        if not args.no_hf:
            import torch
            import transformers

            with tempfile.TemporaryDirectory() as tmp:
                hf.save_pretrained(f"{tmp}/m", config, params)
                hm = transformers.MistralForCausalLM.from_pretrained(f"{tmp}/m", dtype=getattr(torch, args.dtype))
                hm = hm.to(args.hf_device).eval()
            t_ids = torch.tensor(ids, dtype=torch.long, device=args.hf_device)
            t_mask = torch.tensor(mask, device=args.hf_device)

            def theirs():
                with torch.no_grad():
                    hm.generate(
                        input_ids=t_ids,
                        attention_mask=t_mask,
                        do_sample=True,
                        top_k=0,
                        top_p=1.0,
                        max_new_tokens=args.new_tokens,
                        min_new_tokens=args.new_tokens,
                        pad_token_id=0,
                    )
                if args.hf_device != "cpu":
                    torch.cuda.synchronize()

            theirs_tps = new / time_it(theirs, args.repeats)
            del hm
        bound = args.batch * bandwidth / bytes_per_step(r_config, r_params, args.batch, args.prompt, args.new_tokens)
        bound_cells = f"{bound:,.0f} | {ours_tps / bound:.0%}" if on_gpu else "- | -"
        matmul_bound = args.batch / matmul_step_seconds(r_config, r_params, args.batch)
        print(
            f"| {layers} layers, d={d} | {n_params / 1e6:.1f}M | {ours_tps:,.0f} | {loaded_tps:,.0f} | {theirs_tps:,.0f} | "
            f"{ours_tps / theirs_tps:.2f}x | {bound_cells} | {matmul_bound:,.0f} | {ours_tps / matmul_bound:.0%} |",
            flush=True,
        )
        first = first or (r_config, r_params)
    print(
        "\nours: generate on the rollout copy made once (what the coarse job and the tools do); loaded params: "
        "generate(config, params) on params as hf.load_pretrained returns them."
    )
    print(
        "\nmatmul bound: the batch over the time of one decode step's weight matmuls alone (every weight matrix "
        "but the embedding table against [batch, in], each as the rollout orients it, one compiled program): "
        "what XLA's matmuls at this batch allow before attention, norms and sampling."
    )
    if not args.no_lengths:
        length_table(*first, args.batch, args.prompt, lengths, long, args.repeats)


if __name__ == "__main__":
    main()
