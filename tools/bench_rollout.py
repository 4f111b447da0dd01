"""Rollout throughput: our compiled `generate` against transformers' `generate`, side by side.

  python tools/bench_rollout.py                      # the CPU sizes: (4 layers, d=256) and (8 layers, d=512)
  python tools/bench_rollout.py --sizes 16x2048 --batch 64 --new-tokens 512 --dtype bfloat16 --hf-device cuda
                                                     # a ~1B model on one GPU, with the memory-bandwidth bound

Same random weights and shapes on both sides (vocab 32000, sampling at temperature 1,
every response forced to the full length). Prints a Markdown table; the ratio is
ours / transformers in generated tokens per second. On a GPU it also measures the
card's copy bandwidth and prints the fraction of the memory-bandwidth bound: every
decode step must read each weight once (not the embedding table, of which it
gathers B rows) and the filled part of the KV cache, on average prompt + new / 2
positions.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from c2f_jax import hf, model, rollout


def bench_config(layers: int, d: int) -> model.MistralConfig:
    heads = max(d // 64, 1)
    return model.MistralConfig(vocab_size=32000, hidden_size=d, intermediate_size=int(3.5 * d), num_hidden_layers=layers,
                               num_attention_heads=heads, num_key_value_heads=max(heads // 4, 1), head_dim=64,
                               max_position_embeddings=8192)


def time_it(fn, repeats: int) -> float:
    fn()  # warm-up (compilation on our side, allocator warm-up on theirs)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def copy_bandwidth() -> float:
    """Bytes read + written per second by a 1 GiB device-to-device copy (median of 10)."""
    x = jax.random.normal(jax.random.key(0), (1 << 28,), jnp.float32)
    copy = jax.jit(lambda a: a * 1.0)  # not a no-op: XLA must read and write every element
    jax.block_until_ready(copy(x))
    times = []
    for _ in range(10):
        start = time.perf_counter()
        jax.block_until_ready(copy(x))
        times.append(time.perf_counter() - start)
    return 2 * x.nbytes / float(np.median(times))


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
        weights.append(w.T if name == "embed" else w.reshape(-1, w.shape[-1]) if name == "o"
                       else w.reshape(w.shape[0], -1))
        out_major.append(name == "down_t")

    def product(w, transposed):
        x = jnp.ones((batch, w.shape[1] if transposed else w.shape[0]), w.dtype)
        return (jnp.einsum("oi,bi->ob", w, x) if transposed else x @ w)[0, 0]

    step = jax.jit(lambda ws: sum(product(w, t) for w, t in zip(ws, out_major)))
    return time_it(lambda: jax.block_until_ready(step(weights)), repeats)


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
    args = p.parse_args(argv)

    print(f"device: {jax.devices()[0].device_kind} ({platform.processor() or platform.machine()}), "
          f"batch {args.batch}, prompt {args.prompt}, {args.new_tokens} new tokens, vocab 32000\n")
    on_gpu = jax.devices()[0].platform == "gpu"
    bandwidth = copy_bandwidth() if on_gpu else float("nan")
    if on_gpu:
        print(f"measured copy bandwidth: {bandwidth / 1e12:.2f} TB/s (read + write)\n")
    print("| size | params | ours tok/s | transformers tok/s | ratio | bandwidth bound tok/s | ours / bound "
          "| matmul bound tok/s | ours / matmul bound |")
    print("|---|---|---|---|---|---|---|---|---|")
    for size in args.sizes.split(","):
        layers, d = (int(x) for x in size.split("x"))
        config = bench_config(layers, d).replace(param_dtype=args.dtype, compute_dtype=args.dtype)
        params = model.init_params(config, jax.random.key(0))
        n_params = sum(x.size for x in jax.tree.leaves(params))
        rng = np.random.RandomState(0)
        ids = rng.randint(3, 32000, (args.batch, args.prompt)).astype(np.int32)
        mask = np.ones_like(ids)
        new = args.batch * args.new_tokens

        r_config = rollout.rollout_layout(config, jax.default_backend())
        r_params = rollout.rollout_params(r_config, params)

        def ours():
            out = rollout.generate(r_config, r_params, ids, mask, jax.random.key(1), max_new_tokens=args.new_tokens,
                                   suppress_token_ids=(2,))
            jax.block_until_ready(out.tokens)

        ours_tps = new / time_it(ours, args.repeats)
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
                    hm.generate(input_ids=t_ids, attention_mask=t_mask, do_sample=True, top_k=0, top_p=1.0,
                                max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, pad_token_id=0)
                if args.hf_device != "cpu":
                    torch.cuda.synchronize()

            theirs_tps = new / time_it(theirs, args.repeats)
            del hm
        bound = args.batch * bandwidth / bytes_per_step(r_config, r_params, args.batch, args.prompt, args.new_tokens)
        bound_cells = f"{bound:,.0f} | {ours_tps / bound:.0%}" if on_gpu else "- | -"
        matmul_bound = args.batch / matmul_step_seconds(r_config, r_params, args.batch)
        print(f"| {layers} layers, d={d} | {n_params / 1e6:.1f}M | {ours_tps:,.0f} | {theirs_tps:,.0f} | "
              f"{ours_tps / theirs_tps:.2f}x | {bound_cells} | {matmul_bound:,.0f} | {ours_tps / matmul_bound:.0%} |",
              flush=True)
    print("\nmatmul bound: the batch over the time of one decode step's weight matmuls alone (every weight matrix "
          "but the embedding table against [batch, in], each as the rollout orients it, one compiled program): "
          "what XLA's matmuls at this batch allow before attention, norms and sampling.")


if __name__ == "__main__":
    main()
