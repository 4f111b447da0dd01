"""Per-device memory of a coarse job's compiled programs, from abstract shapes, on fake CPU devices or a TPU slice.

  c2f-plan --config configs/coarse.py --devices 16 [--json] [--config.key=value ...]
  c2f-plan --config configs/coarse.py --topology v5p:2x2x4 [--json] [...]

Nothing is allocated: params, optimizer states and batches are ShapeDtypeStructs;
each program (train -> rollout reshard, rollout at the largest response bucket,
reward scoring, PPO iteration) is lowered and compiled for the config's mesh, and
XLA's memory analysis is read per device. The devices are N fake CPU devices
(--devices), or with --topology the chips of a TPU topology, compiled ahead of time
by libtpu's compiler with no TPU present (the tpu extra: `pip install -e '.[tpu]'`). When
model.base is neither a local folder nor a preset name ("tiny") the Mistral-7B
v0.1 architecture is used. Then the time: FLOPs and bytes moved per program (counted from
the shapes by c2f_jax.rl.cost, which a test checks against XLA's count) and the seconds they
make on A100-40GB, A100-80GB, H100 and v5p chips, per iteration and for the config's steps.
With --json the last line is a JSON object
{program: {argument_bytes, output_bytes, temp_bytes, total_bytes}}.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import sys
import time

GB = 1e9
A100S = (("a 40 GB A100", 40 * GB), ("an 80 GB A100", 80 * GB))
# HBM per chip by device kind, as the Cloud TPU docs give it (v5p, v5e, v6e; read as GB, the lower reading).
TPU_HBM = {"TPU v5": 95 * GB, "TPU v5 lite": 16 * GB, "TPU v6 lite": 32 * GB}


def parse(argv):
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="--config FILE and --config.KEY=VALUE name the coarse job as c2f-train's do.",
    )
    p.add_argument("--devices", type=int, default=16, help="fake CPU devices to compile for (default 16)")
    p.add_argument("--topology", help="a TPU topology name (v5p:2x2x4, v5e:4x4, ...): compile for its chips instead")
    p.add_argument("--json", action="store_true")
    args, rest = p.parse_known_args(argv)
    if args.devices < 1:
        from c2f_jax.runtime import cli

        raise cli.UsageError(f"--devices={args.devices} must be >= 1")
    return args, rest


@contextlib.contextmanager
def quiet_stderr():
    """Silences C++ logging on file descriptor 2 (sys.stderr alone would not reach it)."""
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def tpu_devices(name: str) -> list:
    """The compile-only devices of TPU topology `name`: libtpu compiles for them with no TPU present."""
    import jax
    from jax.experimental import topologies

    from c2f_jax.runtime import cli

    if importlib.util.find_spec("libtpu") is None:
        raise cli.UsageError(f"--topology {name}: libtpu is not installed (the tpu extra: pip install -e '.[tpu]')")
    try:
        with quiet_stderr():  # libtpu warns that this machine is no TPU VM, which it need not be to compile
            return list(topologies.get_topology_desc(platform="tpu", topology_name=name).devices)
    except jax.errors.JaxRuntimeError as e:
        raise cli.UsageError(f"--topology {name}: {cli.one_line(e)}") from None


def main(argv=None) -> int:
    args, rest = parse(sys.argv[1:] if argv is None else argv)
    # Fake devices must be requested before JAX starts.
    if not args.topology:
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.devices}"
        ).strip()
    os.environ["JAX_PLATFORMS"] = "cpu"  # TPU topologies compile through libtpu without a TPU backend
    os.environ.setdefault("C2F_SHARDING_HINTS", "1")  # plan the programs the GPUs run (hints on)
    import jax
    import jax.numpy as jnp
    import numpy as np

    from c2f_jax import train
    from c2f_jax.jobs import settings
    from c2f_jax.model import hf, model, sharding
    from c2f_jax.rl import optim, programs, rollout
    from c2f_jax.runtime import backend, cli

    if args.topology:  # compile-only executables go into the persistent cache but cannot be read back
        jax.config.update("jax_enable_compilation_cache", False)
    config, _ = train.parse_args(rest)
    if config.job != "coarse":
        raise cli.UsageError(f"plan_memory plans the coarse job; this config's job is {config.job!r}")
    folder = config.model.base
    base = hf.read_config(folder) if os.path.isdir(folder) else model.PRESETS.get(folder, model.MISTRAL_7B_V01)
    # The job's own settings: Mistral's stop tokens (bos 1, eos 2, unk 0) stand in for its tokenizer's.
    devices = tpu_devices(args.topology) if args.topology else jax.devices()
    job = settings.coarse(config, (0, 1, 2), devices=len(devices))
    roles = settings.coarse_models(config, base)
    pc, actor_config, mc = job.ppo, roles.actor, config.model
    mesh = sharding.make_mesh(**settings.mesh_shape(config, len(devices)), devices=devices)
    kind = devices[0].device_kind
    hbm = TPU_HBM.get(kind, 0)
    capacity = A100S if not args.topology else ((f"a {kind} chip's {hbm / GB:.0f} GB", hbm),) if hbm else ()

    shapes = model.param_shapes(actor_config)
    actor_state = jax.eval_shape(lambda s: optim.create_state(s, pc.actor), shapes)
    critic_state = jax.eval_shape(lambda s: optim.create_state(s, pc.critic), model.param_shapes(roles.critic))
    reference, rm_params = model.param_shapes(roles.reference), model.param_shapes(roles.reward)
    progs = programs.coarse_programs(
        mesh,
        actor_config=actor_config,
        ref_config=roles.reference,
        critic_config=roles.critic,
        rm_config=roles.reward,
        pc=pc,
        sampling=job.sampling,
        eos_token_ids=(2,),
        pad_id=0,
        actor_state=actor_state,
        critic_state=critic_state,
        reference=reference,
        rm_params=rm_params,
    )

    B, P, R = job.batch_size, max(job.prompt_buckets), max(job.cm.buckets)
    i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)
    f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
    key = jax.eval_shape(lambda: jax.random.key(0))
    layout = rollout.rollout_layout(actor_config, backend.of_mesh(mesh))
    r_params = jax.eval_shape(lambda s: rollout.rollout_params(layout, s), shapes)
    plan = {
        f"rollout_{P}+{R}": (progs.generate(R), (r_params, i32(B, P), i32(B, P), key)),
        "reward_score": (progs.score, (rm_params, i32(B, P + R), i32(B, P + R))),
        "ppo_iteration": (
            progs.iteration,
            (actor_state, critic_state, reference, i32(B, P + R), i32(B, P + R), i32(B, R), f32(B), key, f32()),
        ),
    }
    n_params = sum(x.size for x in jax.tree.leaves(shapes))
    print(
        f"{n_params / 1e9:.2f}B params on {mesh.size} {kind} devices, mesh data={config.mesh.data} "
        f"fsdp={config.mesh.fsdp} tensor={config.mesh.tensor}, batch {B}, prompt {P}, response {R}, "
        f"compute {mc.compute_dtype}, remat {mc.remat}\n"
    )
    print("| program | arguments GB | outputs GB | temporaries GB | total GB | compile s |")
    print("|---|---|---|---|---|---|")
    result = {}

    def row(name: str, arg: int, out: int, tmp: int, total: int, took: float) -> None:
        result[name] = {"argument_bytes": arg, "output_bytes": out, "temp_bytes": tmp, "total_bytes": total}
        print(
            f"| {name} | {arg / GB:.2f} | {out / GB:.2f} | {tmp / GB:.2f} | {total / GB:.2f} | {took:.0f} |", flush=True
        )

    # The reshard is one program for the weights outside the layers and one for a layer, called once per layer:
    # its arguments are the train params, its outputs the whole copy, its temporaries the largest call's.
    start, parts = time.perf_counter(), {}
    for part, (fn, args_of) in progs.copy_programs.items():
        parts[part] = fn.lower(*args_of(shapes)).compile().memory_analysis()
    layers = actor_config.num_hidden_layers
    arg = sum(m.argument_size_in_bytes for m in parts.values())
    out = parts["copy_rest"].output_size_in_bytes + layers * parts["copy_layer"].output_size_in_bytes
    tmp = max(m.temp_size_in_bytes for m in parts.values())
    row("reshard_to_rollout", arg, out, tmp, arg + out + tmp, time.perf_counter() - start)
    for name, (fn, fargs) in plan.items():
        start = time.perf_counter()
        mem = fn.lower(*fargs).compile().memory_analysis()
        total = (
            mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
        )  # donated outputs reuse their inputs
        row(
            name,
            mem.argument_size_in_bytes,
            mem.output_size_in_bytes,
            mem.temp_size_in_bytes,
            total,
            time.perf_counter() - start,
        )

    def per_device(tree, layout_tree):
        shardings = sharding.like_params(mesh, tree, layout_tree)
        return sum(
            int(np.prod(sh.shard_shape(x.shape))) * x.dtype.itemsize
            for x, sh in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings))
        )

    ref, rm = per_device(reference, reference), per_device(rm_params, rm_params)
    trained = per_device(actor_state, actor_state.params) + per_device(critic_state, critic_state.params)
    # Beside each program stays whatever of the job's state is not its argument (the rollout copy lives
    # from the reshard to the end of the rollout).
    beside = {
        "reshard_to_rollout": trained + ref + rm - result["reshard_to_rollout"]["argument_bytes"],
        f"rollout_{P}+{R}": trained + ref + rm,
        "reward_score": trained + ref,
        "ppo_iteration": rm,
    }
    peak = max(result[name]["total_bytes"] + beside[name] for name in result)
    print(
        f"\nresident per device: train states {trained / GB:.2f} GB, reference + reward model {(ref + rm) / GB:.2f} GB"
    )
    fits = "".join(f"; fits {what}: {'yes' if peak < size else 'no'}" for what, size in capacity)
    print(
        f"\npeak per device (estimate, largest program plus what stays resident): {peak / GB:.1f} GB"
        f"{fits or f'; HBM of a {kind} not known here'}"
    )
    print_time_estimate(config, roles, pc, B, P, R, mesh.size)
    if args.json:
        print(json.dumps(result))
    return 0


def print_time_estimate(config, roles, pc, B: int, P: int, R: int, chips: int) -> None:
    """FLOPs and bytes per program (c2f_jax.rl.cost) and the time they make on each named chip, per iteration,
    for the config's steps, and per 1024 prompts beside OpenRLHF's published figure."""
    from c2f_jax.rl import cost

    costs = cost.iteration_cost(
        roles.actor, roles.critic, roles.reference, roles.reward, B, P, R, pc.epochs, pc.minibatches, chips
    )
    names = list(cost.HARDWARE)
    times = {hw: cost.seconds(costs, hw, chips) for hw in names}
    print(
        f"\ntime estimate on {chips} chips (rollout at {cost.ROLLOUT_BANDWIDTH_EFFICIENCY:.0%} of the bandwidth "
        f"bound, the rest at {cost.UPDATE_MFU:.1%} MFU; response at its longest bucket, {R}: an upper bound)\n"
    )
    print("| program | TFLOP (all chips) | GB moved per chip | " + " | ".join(f"{hw} s" for hw in names) + " |")
    print("|---|---|---|" + "---|" * len(names))
    for name, c in costs.items():
        print(
            f"| {name} | {c.flops / 1e12:,.0f} | {c.bytes / GB:,.0f} | "
            + " | ".join(f"{times[hw][name]:.1f}" for hw in names)
            + " |"
        )
    total = {hw: sum(times[hw].values()) for hw in names}
    print(
        "| iteration | "
        + f"{sum(c.flops for c in costs.values()) / 1e12:,.0f} | | "
        + " | ".join(f"{total[hw]:.1f}" for hw in names)
        + " |"
    )
    print(
        f"\n{config.steps} steps: "
        + "; ".join(
            f"{hw} {total[hw] * config.steps / 3600:.1f} h ({total[hw] * config.steps * chips / 3600:,.0f} chip-hours)"
            for hw in names
        )
    )
    print(
        f"per 1024 prompts on {chips} A100-80GB: {total['A100-80GB'] * 1024 / B:.0f} s "
        "(OpenRLHF publishes 471 s for 7B PPO on 16 A800s)"
    )


def command() -> None:
    """`c2f-plan`: main() on the command line, bad input as one line and exit status 2."""
    from c2f_jax.runtime import cli  # after main() has set XLA_FLAGS: nothing here may start JAX first

    cli.run(main)


if __name__ == "__main__":
    command()
