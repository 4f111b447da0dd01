"""One Coarse Actor PPO iteration: ours against a plain PyTorch loop of the same iteration, side by side.

  python benchmarks/bench_ppo.py                   # (4 layers, d=256) and (8 layers, d=512), batch 16, prompt 64, 128 new

Both sides start from the same random weights (actor = reference, critic = reward
model with a scalar head), sample exactly `--new-tokens` tokens with EOS
suppressed, score them (old and reference logprobs, values, reward), compute
GAE advantages and run one PPO epoch with AdamW for actor and critic. The
PyTorch side is what TRL's PPOTrainer ran before TRL dropped PPO: transformers'
`generate`, then forward passes, then a Python-loop GAE and the updates.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from bench_rollout import (  # the same model shapes as the rollout benchmark (the script folder is on sys.path)
    bench_config,
    time_it,
)

from c2f_jax.model import hf, model
from c2f_jax.rl import optim, ppo, reward, rollout
from c2f_jax.runtime import backend

# The coarse job compiles ppo.iteration with shardings (rl/programs.py); on one device a plain jit is the same.
ppo_iteration = jax.jit(
    ppo.iteration, static_argnames=("actor_config", "ref_config", "critic_config", "ppo"), donate_argnums=(0, 1)
)


def ours(config, actor, critic_config, critic, ids, mask, new_tokens, iterations):
    pc = ppo.PPOConfig(actor=optim.OptimConfig(lr=5e-6), critic=optim.OptimConfig(lr=5e-7))
    actor_state, critic_state = optim.create_state(actor, pc.actor), optim.create_state(critic, pc.critic)
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    times = []
    for it in range(iterations + 1):  # the first iteration compiles
        t0 = time.perf_counter()
        r_config = rollout.rollout_layout(config, backend.of(jax.default_backend()))
        r_params = rollout.rollout_params(r_config, actor_state.params)
        out = rollout.generate(
            r_config, r_params, ids, mask, jax.random.key(it), max_new_tokens=new_tokens, suppress_token_ids=(2,)
        )
        jax.block_until_ready(out.tokens)
        t1 = time.perf_counter()
        seq, seq_mask = ppo.join(ids, mask, out.tokens, out.mask)
        score = jax.block_until_ready(reward.score_sequences(critic, seq, seq_mask, config=critic_config))
        t2 = time.perf_counter()
        # Old/reference logprobs, values, advantages and the update: one program (ppo.iteration).
        actor_state, critic_state, _, _ = jax.block_until_ready(
            ppo_iteration(
                actor_state,
                critic_state,
                actor,
                seq,
                seq_mask,
                out.mask,
                score,
                jax.random.key(it),
                actor_config=config,
                ref_config=config,
                critic_config=critic_config,
                ppo=pc,
            )
        )
        t3 = time.perf_counter()
        if it:
            times.append((t1 - t0, t2 - t1, t3 - t2))
    return np.min(np.array(times), axis=0)


def torch_loop(actor_dir, critic_dir, ids, mask, new_tokens, iterations, device="cpu"):
    import torch
    import transformers

    torch.manual_seed(0)
    load = lambda cls, path: cls.from_pretrained(path, dtype=torch.float32).to(device)
    actor = load(transformers.MistralForCausalLM, actor_dir)
    reference = load(transformers.MistralForCausalLM, actor_dir).eval()
    critic = load(transformers.MistralForSequenceClassification, critic_dir)
    reward_model = load(transformers.MistralForSequenceClassification, critic_dir).eval()
    actor_opt = torch.optim.AdamW(actor.parameters(), lr=5e-6, betas=(0.9, 0.95), weight_decay=0.0)
    critic_opt = torch.optim.AdamW(critic.parameters(), lr=5e-7, betas=(0.9, 0.95), weight_decay=0.0)
    ids = torch.tensor(ids, dtype=torch.long, device=device)
    mask = torch.tensor(mask, dtype=torch.long, device=device)
    sync = torch.cuda.synchronize if device != "cpu" else (lambda: None)
    P, R = ids.shape[1], new_tokens

    def logprobs(m, seq, seq_mask, pos):
        logits = m(input_ids=seq, attention_mask=seq_mask, position_ids=pos).logits[:, P - 1 : -1]
        return torch.log_softmax(logits.float(), -1).gather(-1, seq[:, P:, None])[..., 0]

    def values(m, seq, seq_mask, pos):
        hidden = m.model(input_ids=seq, attention_mask=seq_mask, position_ids=pos).last_hidden_state
        return m.score(hidden)[:, P - 1 : -1, 0]

    times = []
    for it in range(iterations + 1):
        t0 = time.perf_counter()
        actor.eval()
        with torch.no_grad():
            seq = actor.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=True,
                top_k=0,
                max_new_tokens=R,
                min_new_tokens=R,
                suppress_tokens=[2],
                pad_token_id=0,
            )
        sync()
        t1 = time.perf_counter()
        seq_mask = torch.cat([mask, torch.ones_like(seq[:, P:])], 1)
        pos = (seq_mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            old = logprobs(actor, seq, seq_mask, pos)
            ref = logprobs(reference, seq, seq_mask, pos)
            old_values = values(critic, seq, seq_mask, pos)
            score = reward_model(input_ids=seq, attention_mask=seq_mask, position_ids=pos).logits[:, 0]
            rewards = -0.05 * (old - ref)
            rewards[:, -1] += score.clamp(-5, 5)
            adv, running = torch.zeros_like(rewards), torch.zeros(seq.shape[0], device=device)
            for t in reversed(range(R)):
                next_value = old_values[:, t + 1] if t + 1 < R else 0.0
                running = rewards[:, t] + 0.95 * next_value - old_values[:, t] + 0.95 * 0.95 * running
                adv[:, t] = running
            returns = adv + old_values
            adv = (adv - adv.mean()) / (adv.std() + 1e-8)
        sync()
        t2 = time.perf_counter()
        actor.train()
        critic.train()
        new = logprobs(actor, seq, seq_mask, pos)
        ratio = torch.exp(new - old)
        loss = torch.max(-adv * ratio, -adv * ratio.clamp(0.8, 1.2)).mean()
        actor_opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(actor.parameters(), 1.0)
        actor_opt.step()
        v = values(critic, seq, seq_mask, pos)
        v_clipped = old_values + (v - old_values).clamp(-0.2, 0.2)
        v_loss = 0.5 * torch.max((v - returns) ** 2, (v_clipped - returns) ** 2).mean()
        critic_opt.zero_grad()
        v_loss.backward()
        torch.nn.utils.clip_grad_norm_(critic.parameters(), 1.0)
        critic_opt.step()
        sync()
        t3 = time.perf_counter()
        if it:
            times.append((t1 - t0, t2 - t1, t3 - t2))
    del actor, reference, critic, reward_model, actor_opt, critic_opt
    if device != "cpu":
        torch.cuda.empty_cache()  # hand the memory back before our side allocates
    return np.min(np.array(times), axis=0)


def body_flops(config, batch: int, length: int) -> float:
    """Matmul FLOPs of one decoder forward pass over [batch, length] tokens (the head not included).

    Attention scores and their use count 2 * 2 * B * T^2 * N * H per layer (the causal half not subtracted).
    """
    c = config
    per_token = (
        2
        * c.num_hidden_layers
        * (
            c.hidden_size * c.head_dim * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)
            + 3 * c.hidden_size * c.intermediate_size
        )
    )
    return per_token * batch * length + 4 * c.num_hidden_layers * batch * length**2 * c.num_attention_heads * c.head_dim


def after_rollout_flops(config, batch: int, prompt: int, new: int) -> tuple[float, float]:
    """Matmul FLOPs of scoring + update (one epoch, one minibatch) for (ours, torch); backward = 2x forward.

    Ours: reward and reference forward passes, actor and critic forward + backward once
    each (ppo.iteration reuses the scoring forward), the LM head over response
    positions only. Torch: four scoring forward passes and then the update's own
    forward + backward of actor and critic, the LM head over every position (HF's
    default logits).
    """
    length = prompt + new
    body = body_flops(config, batch, length)
    head = lambda tokens: 2 * config.hidden_size * config.vocab_size * tokens
    ours = body + (body + head(batch * new)) + 3 * (body + head(batch * new)) + 3 * body
    torch = 2 * (body + head(batch * length)) + 2 * body + 3 * (body + head(batch * length)) + 3 * body
    return ours, torch


def matmul_rate() -> tuple[float, float]:
    """This machine's float32 matmul FLOP/s, (jax, torch): a 2048^3 product of random matrices, best of 5."""
    import torch

    n = 2048
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    ta = torch.randn(n, n)
    best = (time_it(lambda: jax.block_until_ready(f(a)), 5), time_it(lambda: ta @ ta, 5))
    return 2 * n**3 / best[0], 2 * n**3 / best[1]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="4x256,8x512", help="comma-separated LAYERSxWIDTH")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--iterations", type=int, default=2, help="timed iterations per side (best is reported)")
    p.add_argument(
        "--torch-device",
        default="cpu",
        help="cpu or cuda; on cuda both sides may use TF32 for float32 "
        "matmuls (XLA's default precision on GPU, switched on for torch to match)",
    )
    p.add_argument(
        "--remat",
        default="none",
        help="our activation checkpointing: none, dots or full "
        "(full: a 1B model's update fits one 80 GB card beside the torch side)",
    )
    p.add_argument("--peak-tflops", type=float, default=0.0, help="the device's peak for the MFU column (0: none)")
    p.add_argument("--no-roofline", action="store_true", help="skip the CPU matmul-rate measurement and the bound")
    args = p.parse_args(argv)
    import torch

    if args.torch_device != "cpu":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    print(
        f"device: {jax.devices()[0].device_kind} ({platform.machine()}), torch threads {torch.get_num_threads()}, "
        f"batch {args.batch}, prompt {args.prompt}, {args.new_tokens} new tokens (EOS suppressed), vocab 32000, "
        f"1 PPO epoch; seconds per iteration, best of {args.iterations}\n"
    )
    rate = None
    if args.torch_device == "cpu" and not args.no_roofline:
        rate = matmul_rate()
        print(
            f"fp32 matmul rate of this machine (2048^3, best of 5): jax {rate[0] / 1e9:.0f} GFLOP/s, "
            f"torch {rate[1] / 1e9:.0f} GFLOP/s\n"
        )
    print(
        "| size | side | rollout s | scoring s | update s | total s | tokens/s | ours vs torch "
        "| scoring + update GFLOP/s | MFU |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    bounds = []
    for size in args.sizes.split(","):
        layers, d = (int(x) for x in size.split("x"))
        config = bench_config(layers, d).replace(remat=args.remat)
        actor = model.init_params(config, jax.random.key(0))
        critic_config, critic = reward.init_from_base(config, actor, jax.random.key(1))
        rng = np.random.RandomState(0)
        ids = rng.randint(3, 32000, (args.batch, args.prompt)).astype(np.int32)
        mask = np.ones_like(ids)
        with tempfile.TemporaryDirectory() as tmp:
            hf.save_pretrained(f"{tmp}/actor", config, actor)
            hf.save_pretrained(f"{tmp}/critic", critic_config.replace(pad_token_id=0), critic)
            theirs = torch_loop(
                f"{tmp}/actor", f"{tmp}/critic", ids, mask, args.new_tokens, args.iterations, args.torch_device
            )
        mine = ours(config, actor, critic_config, critic, ids, mask, args.new_tokens, args.iterations)
        generated = args.batch * args.new_tokens
        flops = after_rollout_flops(config, args.batch, args.prompt, args.new_tokens)
        for side, t, f in (("ours", mine, flops[0]), ("torch", theirs, flops[1])):
            ratio = f"{theirs.sum() / mine.sum():.2f}x" if side == "ours" else ""
            achieved = f / (t[1] + t[2])
            mfu = f"{achieved / (args.peak_tflops * 1e12):.1%}" if args.peak_tflops else ""
            print(
                f"| {layers} layers, d={d} | {side} | {t[0]:.2f} | {t[1]:.2f} | {t[2]:.2f} | {t.sum():.2f} | "
                f"{generated / t.sum():,.0f} | {ratio} | {achieved / 1e9:,.0f} | {mfu} |",
                flush=True,
            )
        if rate:
            floor = mine[0] + flops[0] / max(rate)
            bounds.append(
                f"{layers} layers, d={d}: scoring + update is {flops[0] / 1e9:,.0f} GFLOP of matmuls "
                f"(torch's loop: {flops[1] / 1e9:,.0f}); at the machine's matmul rate that alone takes "
                f"{flops[0] / max(rate):.2f} s, so with this rollout ({mine[0]:.2f} s) the ratio cannot "
                f"exceed {theirs.sum() / floor:.2f}x"
            )
    print(
        "\nOurs: 'scoring' is the reward model alone; the actor's, reference's and critic's scoring passes run in "
        "the update's program (ppo.iteration), which reuses the actor's and critic's forward pass for their "
        "gradients. Torch: every forward pass runs separately, as in TRL's loop."
    )
    for line in bounds:
        print("Bound, " + line + ".")


if __name__ == "__main__":
    main()
