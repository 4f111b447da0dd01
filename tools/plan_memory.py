"""Per-device memory of a coarse job's compiled programs, from abstract shapes on fake CPU devices.

  python tools/plan_memory.py --config configs/coarse.py --devices 16 [--json] [--config.key=value ...]

Nothing is allocated: params, optimizer states and batches are ShapeDtypeStructs;
each program (train -> rollout reshard, rollout at the largest response bucket,
reward scoring, PPO iteration) is lowered and compiled for the config's mesh on N fake CPU
devices, and XLA's memory analysis is read per device. When model.base is not a
local folder the Mistral-7B v0.1 architecture is used. With --json the last line
is a JSON object {program: {argument_bytes, output_bytes, temp_bytes, total_bytes}}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

GB = 1e9


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=16)
    p.add_argument("--json", action="store_true")
    args, rest = p.parse_known_args(argv)
    return args, rest


def main(argv=None) -> int:
    args, rest = parse(sys.argv[1:] if argv is None else argv)
    # Fake devices must be requested before JAX starts.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.devices}").strip()
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ.setdefault("C2F_SHARDING_HINTS", "1")  # plan the programs the GPUs run (hints on)
    import jax
    import jax.numpy as jnp
    import numpy as np

    from c2f_jax import cli, hf, model, optim, programs, rollout, settings, sharding, train

    config, _ = train.parse_args(rest)
    if config.job != "coarse":
        raise cli.UsageError(f"plan_memory plans the coarse job; this config's job is {config.job!r}")
    base = hf.read_config(config.model.base) if os.path.isdir(config.model.base) else model.MISTRAL_7B_V01
    # The job's own settings: Mistral's stop tokens (bos 1, eos 2, unk 0) stand in for its tokenizer's.
    job, roles = settings.coarse(config, (0, 1, 2)), settings.coarse_models(config, base)
    pc, actor_config, mc = job.ppo, roles.actor, config.model
    mesh = sharding.make_mesh(**settings.mesh_shape(config))

    shapes = model.param_shapes(actor_config)
    actor_state = jax.eval_shape(lambda s: optim.create_state(s, pc.actor), shapes)
    critic_state = jax.eval_shape(lambda s: optim.create_state(s, pc.critic), model.param_shapes(roles.critic))
    reference, rm_params = model.param_shapes(roles.reference), model.param_shapes(roles.reward)
    progs = programs.coarse_programs(
        mesh, actor_config=actor_config, ref_config=roles.reference, critic_config=roles.critic,
        rm_config=roles.reward, pc=pc, sampling=job.sampling, eos_token_ids=(2,), pad_id=0,
        actor_state=actor_state, critic_state=critic_state, reference=reference, rm_params=rm_params)

    B, P, R = job.batch_size, max(job.prompt_buckets), max(job.cm.buckets)
    i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)
    f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
    key = jax.eval_shape(lambda: jax.random.key(0))
    layout = rollout.rollout_layout(actor_config, mesh.devices.flat[0].platform)
    r_params = jax.eval_shape(lambda s: rollout.rollout_params(layout, s), shapes)
    plan = {
        "reshard_to_rollout": (progs.to_rollout, (shapes,)),
        f"rollout_{P}+{R}": (progs.generate(R), (r_params, i32(B, P), i32(B, P), key)),
        "reward_score": (progs.score, (rm_params, i32(B, P + R), i32(B, P + R))),
        "ppo_iteration": (progs.iteration, (actor_state, critic_state, reference, i32(B, P + R), i32(B, P + R),
                                            i32(B, R), f32(B), key)),
    }
    n_params = sum(x.size for x in jax.tree.leaves(shapes))
    print(f"{n_params / 1e9:.2f}B params, mesh data={config.mesh.data} fsdp={config.mesh.fsdp} "
          f"tensor={config.mesh.tensor}, batch {B}, prompt {P}, response {R}, compute {mc.compute_dtype}, "
          f"remat {mc.remat}\n")
    print("| program | arguments GB | outputs GB | temporaries GB | total GB | compile s |")
    print("|---|---|---|---|---|---|")
    result = {}
    for name, (fn, fargs) in plan.items():
        start = time.perf_counter()
        mem = fn.lower(*fargs).compile().memory_analysis()
        took = time.perf_counter() - start
        arg, out, tmp = mem.argument_size_in_bytes, mem.output_size_in_bytes, mem.temp_size_in_bytes
        total = arg + out + tmp - mem.alias_size_in_bytes  # donated outputs reuse their inputs
        result[name] = {"argument_bytes": arg, "output_bytes": out, "temp_bytes": tmp, "total_bytes": total}
        print(f"| {name} | {arg / GB:.2f} | {out / GB:.2f} | {tmp / GB:.2f} | {total / GB:.2f} | {took:.0f} |",
              flush=True)
    def per_device(tree, layout_tree):
        shardings = sharding.like_params(mesh, tree, layout_tree)
        return sum(int(np.prod(sh.shard_shape(x.shape))) * x.dtype.itemsize
                   for x, sh in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)))

    frozen = per_device(reference, reference) + per_device(rm_params, rm_params)
    trained = per_device(actor_state, actor_state.params) + per_device(critic_state, critic_state.params)
    # Whatever is not an argument of a program stays resident beside it.
    peak = max(trained + frozen + result[f"rollout_{P}+{R}"]["total_bytes"],
               per_device(rm_params, rm_params) + result["ppo_iteration"]["total_bytes"])
    print(f"\nresident per device: train states {trained / GB:.2f} GB, reference + reward model {frozen / GB:.2f} GB")
    print(f"\npeak per device (estimate, largest program plus what stays resident): {peak / GB:.1f} GB; "
          f"fits 40 GB A100: {'yes' if peak < 40 * GB else 'no'}; fits 80 GB A100: {'yes' if peak < 80 * GB else 'no'}")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    from c2f_jax import cli

    cli.run(main)
