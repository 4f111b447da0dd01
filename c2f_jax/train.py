"""`python -m c2f_jax.train --config configs/coarse.py [--config.a.b=value ...] [--workdir DIR]`

Runs the job the config names: `reward` (a Bradley-Terry reward model on
preference pairs) or `coarse` (the Coarse Actor: PPO with Continuous
Maximization). Restarting on a workdir that holds checkpoints resumes from the
latest one, exactly.

WORKDIR holds run_config.json (the resolved config), model_config.json,
tokenizer/, checkpoints/, metrics.jsonl, tensorboard/ and, when the coarse job
trains its own reward model first, reward_model/ (an HF folder).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import jax
import numpy as np

from c2f_jax import (checkpoint, cli, cm, compilations, data, hf, metrics, model, optim, ppo, programs, reward,
                     rollout, sft, sharding, tokenizer)

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
RUN_CONFIG, MODEL_CONFIG, TOKENIZER_DIR = "run_config.json", "model_config.json", "tokenizer"
REQUIRED_KEYS = ("job", "steps", "seed", "checkpoint_every", "mesh.data", "mesh.fsdp", "mesh.tensor",
                 "rollout.temperature")
# Keys that may change between a run and its resumption; any other difference is an incompatible config.
RESUMABLE_KEYS = ("steps", "checkpoint_every", "keep_checkpoints", "eval_every", "mesh.")


class TrainError(ValueError):
    """A config, workdir or input that the run cannot use."""


# ----------------------------------------------------------------------------- config and workdir


def resolve_config_path(value: str) -> str:
    """A path as given, or a bare name such as `coarse.py` found in configs/."""
    path = Path(value.split(":")[0])
    if path.exists():
        return value
    if (CONFIG_DIR / path.name).exists() and path.parent == Path("."):
        return str(CONFIG_DIR / value)
    raise TrainError(f"config file {path} not found (nor in {CONFIG_DIR})")


def parse_args(argv: list[str]):
    """(config, workdir) from `--config FILE [--config.key=value ...] [--workdir DIR]`."""
    from absl import flags
    from ml_collections import config_flags

    joined, i = [], 0
    while i < len(argv):  # `--config X` -> `--config=X`, which overrides need; bare names found in configs/
        arg = argv[i]
        if arg == "--config" and i + 1 < len(argv):
            arg, i = f"--config={argv[i + 1]}", i + 1
        if arg.startswith("--config="):
            arg = "--config=" + resolve_config_path(arg.split("=", 1)[1])
        joined.append(arg)
        i += 1
    argv = joined
    if str(CONFIG_DIR.parent) not in sys.path:  # so tiny configs can `from configs import coarse`
        sys.path.insert(0, str(CONFIG_DIR.parent))
    argv = ["c2f_jax.train", *argv]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "ml_collections config file", flag_values=fv,
                                    lock_config=True, sys_argv=argv)
    flags.DEFINE_string("workdir", None, "run directory (default runs/<config name>)", flag_values=fv)
    try:
        fv(argv)
    except (flags.Error, AttributeError, KeyError, ValueError, TypeError) as e:
        raise TrainError(f"bad command line: {str(e).splitlines()[0]}") from None
    if fv.config is None:
        raise TrainError("--config is required (e.g. --config configs/tiny_coarse.py)")
    config = fv.config
    for key in REQUIRED_KEYS:
        node = config
        for part in key.split("."):
            if part not in node:
                raise TrainError(f"config has no {key!r} (every config needs {', '.join(REQUIRED_KEYS)})")
            node = node[part]
    name = Path(fv["config"].config_filename).stem
    return config, Path(fv.workdir or Path("runs") / name)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def config_dict(config) -> dict:
    return json.loads(config.to_json())


def prepare_workdir(config, workdir: Path) -> checkpoint.Checkpointer:
    """Creates the workdir or checks that its checkpoints came from a compatible config; writes run_config.json."""
    workdir.mkdir(parents=True, exist_ok=True)
    saved_path = workdir / RUN_CONFIG
    ckpt = checkpoint.Checkpointer(workdir, keep=config.get("keep_checkpoints", 3))
    if ckpt.latest_step() is not None and saved_path.exists():
        saved, new = _flatten(json.loads(saved_path.read_text())), _flatten(config_dict(config))
        for key in sorted(set(saved) | set(new)):
            if key.startswith(RESUMABLE_KEYS) or saved.get(key) == new.get(key):
                continue
            raise TrainError(f"{workdir} holds checkpoints of an incompatible config: {key} was "
                             f"{saved.get(key)!r}, now {new.get(key)!r} (use another --workdir)")
    if sharding.is_main_process():
        _write_json(saved_path, config_dict(config))
    return ckpt


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.replace(path)


# ----------------------------------------------------------------------------- models


def tiny_base(config, workdir: Path) -> Path:
    """The demo's base model: the tiny preset, taught some language on the run's dialogues
    (model.pretrain_steps of next-token training), saved once as WORKDIR/base_model."""
    out = workdir / "base_model"
    if out.exists():
        return out
    tok = tokenizer.load_tokenizer(None)
    base = model.TINY.replace(compute_dtype=config.model.compute_dtype)
    params = model.init_params(base, jax.random.key(config.seed))
    d = config.data
    pairs, _ = data.load_pairs(d.source, d.data_dir or None, d.split)
    texts = [tok(pair.prompt + " " + pair.chosen).input_ids for pair in pairs]
    params, loss = sft.fine_tune(base, params, texts, steps=config.model.pretrain_steps, batch_size=16, lr=3e-3,
                                 buckets=(128,), pad_id=tok.pad_token_id, seed=config.seed)
    print(f"tiny base: {config.model.pretrain_steps} next-token steps on {len(texts)} dialogues, loss {loss:.3f}")
    hf.save_pretrained(out, base, params, tokenizer_source=tok)
    return out


def load_base(mc, seed: int):
    """(MistralConfig, params, tokenizer) for model.base: an HF folder or the preset 'tiny' (random init)."""
    runtime = dict(compute_dtype=mc.compute_dtype, remat=mc.remat)
    if mc.base == "tiny":
        config = model.TINY.replace(param_dtype=mc.param_dtype, **runtime)
        return config, model.init_params(config, jax.random.key(seed)), tokenizer.load_tokenizer(None)
    if not Path(mc.base).is_dir():
        raise TrainError(f"model.base={mc.base!r}: model folder not found")
    config, params = hf.load_pretrained(mc.base, dtype=mc.param_dtype, **runtime)
    if not config.has_lm_head:
        raise TrainError(f"model.base={mc.base!r} is a {config.architecture}; the base must be MistralForCausalLM")
    return config, params, tokenizer.load_tokenizer(mc.base)


def save_run_model(workdir: Path, config: model.MistralConfig, tok) -> None:
    """What export needs besides weights: the architecture and the tokenizer."""
    _write_json(workdir / MODEL_CONFIG, config.to_hf())
    if not (workdir / TOKENIZER_DIR).exists():
        with hf.atomic_dir(workdir / TOKENIZER_DIR, overwrite=False) as tmp:
            tok.save_pretrained(tmp)


def _as_dtype(params, dtype: str):
    return jax.tree.map(lambda a: a.astype(dtype), params)


def _placed(mesh, params):
    """Params in the train layout of this mesh."""
    return sharding.place(params, sharding.param_shardings(mesh, params))


def _placed_state(mesh, params, oc: optim.OptimConfig) -> optim.TrainState:
    """A fresh train state with params and optimizer moments in the train layout."""
    state = optim.create_state(_placed(mesh, params), oc)
    return sharding.place(state, sharding.like_params(mesh, state, state.params))


# ----------------------------------------------------------------------------- the reward job


def _device_batch(mesh, arrays: dict) -> dict:
    """Global host batch -> this host's rows -> one batch-sharded global array per key."""
    rows = sharding.host_slice(len(next(iter(arrays.values()))))
    return {k: sharding.global_batch(mesh, v[rows]) for k, v in arrays.items()}


def _reward_eval(margins_fn, params, mesh, tok, pairs, buckets, batch_size, system_prompt):
    """Held-out loss/accuracy/margin over all pairs, in fixed-size batches (the last one padded by repeats)."""
    totals, n = {"loss": 0.0, "accuracy": 0.0, "margin": 0.0}, len(pairs)
    for start in range(0, n, batch_size):
        chunk = pairs[start:start + batch_size]
        padded = chunk + [chunk[-1]] * (batch_size - len(chunk))
        batch = _device_batch(mesh, data.preference_batch(tok, padded, buckets, system_prompt))
        margin = sharding.to_host(margins_fn(params, batch))[: len(chunk)]
        totals["loss"] += float(np.sum(np.logaddexp(0.0, -margin)))
        totals["accuracy"] += float(np.sum(margin > 0))
        totals["margin"] += float(np.sum(margin))
    return {f"eval/{k}": v / n for k, v in totals.items()}


def run_reward(config, workdir: Path, show_progress: bool = True) -> dict:
    """Trains the reward model; returns the last eval metrics."""
    ckpt = prepare_workdir(config, workdir)
    mesh = sharding.make_mesh(**config.mesh)
    sharding.batch_size_check(mesh, config.data.batch_size)
    base_config, base_params, tok = load_base(config.model, config.seed)
    rm_config, rm_params = reward.init_from_base(base_config, base_params, jax.random.key(config.seed + 1))
    if sharding.is_main_process():
        save_run_model(workdir, rm_config, tok)
    oc = optim.OptimConfig(lr=config.optim.lr, warmup_steps=config.optim.warmup_steps,
                           weight_decay=config.optim.weight_decay, max_grad_norm=config.optim.max_grad_norm)
    d = config.data
    pairs, skipped = data.load_pairs(d.source, d.data_dir or None, d.split)
    train_pairs, eval_pairs = data.train_eval_split(pairs, d.eval_fraction, config.seed)
    system = d.system_prompt or None
    it = data.BatchIterator(len(train_pairs), d.batch_size, config.seed)
    state = _placed_state(mesh, rm_params, oc)
    progs = programs.reward_programs(mesh, config=rm_config, optim_config=oc, state=state)
    start = 0
    if ckpt.latest_step() is not None:
        restored, meta = ckpt.restore(target={"reward": state})
        state, start = restored["reward"], meta["step"]
        it.restore(meta["data"])
    main = sharding.is_main_process()
    writer = metrics.MetricsWriter(workdir, resume_step=start, enabled=main)
    bar = metrics.progress(config.steps, start, show_progress and main, desc="reward")
    last_eval = {}
    for step in range(start + 1, config.steps + 1):
        batch = data.preference_batch(tok, [train_pairs[i] for i in it.next()], d.seq_buckets, system)
        state, m = settle(progs.train(state, _device_batch(mesh, batch)))
        row = {"loss": float(m["loss"]), "accuracy": float(m["accuracy"]), "grad_norm": float(m["grad_norm"]),
               "skipped_updates": int(m["skipped"]), "compilations": compilations.total(),
               "data/skipped_rows": skipped}
        if step % config.eval_every == 0 or step == config.steps:
            last_eval = _reward_eval(progs.margins, state.params, mesh, tok, eval_pairs, d.seq_buckets,
                                     d.batch_size, system)
            row.update(last_eval)
        writer.write(step, row)
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{last_eval.get('eval/accuracy', float('nan')):.2f}")
        if step % config.checkpoint_every == 0 or step == config.steps:
            ckpt.save(step, {"reward": state}, {"step": step, "data": it.state(), "job": "reward"})
    bar.close()
    writer.close()
    ckpt.close()
    return last_eval


# ----------------------------------------------------------------------------- the coarse job


def _inline_reward_model(config, workdir: Path, show_progress: bool) -> Path:
    """Trains a reward model with this run's base and data (the tiny demo) and exports it into the workdir."""
    out = workdir / "reward_model"
    if out.exists():
        return out
    from configs import tiny_reward  # the same recipe the tiny reward job uses

    rc = tiny_reward.get_config()
    rc.unlock()
    rc.seed, rc.steps = config.seed, config.reward_model.train_steps
    rc.model.update(base=config.model.base, param_dtype="float32", compute_dtype=config.model.compute_dtype)
    rc.data.update(source=config.data.source, data_dir=config.data.data_dir, split=config.data.split)
    rc.mesh.update(config.mesh)
    rm_workdir = workdir / "reward_run"
    run_reward(rc, rm_workdir, show_progress)
    export(rm_workdir, out)
    return out


def settle(x):
    """Waits for a program's results."""
    return jax.block_until_ready(x)


def _prompt_batch(mesh, token_lists, buckets, pad_id, truncate):
    """Left-padded prompts as batch-sharded arrays; the bucket is chosen from the global batch so all hosts agree."""
    ids, mask = data.left_pad(token_lists, buckets, pad_id, truncate=truncate)
    b = _device_batch(mesh, {"ids": ids, "mask": mask})
    return b["ids"], b["mask"]


def run_coarse(config, workdir: Path, show_progress: bool = True) -> list[dict]:
    """PPO with Continuous Maximization; returns the metrics rows of this process's steps."""
    mesh = sharding.make_mesh(**config.mesh)
    sharding.batch_size_check(mesh, config.data.batch_size)
    minibatch = ppo.minibatch_size(config.data.batch_size, config.ppo.minibatches,
                                   ("data.batch_size", "ppo.minibatches"))
    # A minibatch that does not split over the devices would be scored and stepped replicated on all of them.
    sharding.batch_size_check(mesh, minibatch, "PPO minibatch (data.batch_size / ppo.minibatches)")
    ckpt = prepare_workdir(config, workdir)
    main = sharding.is_main_process()
    if config.model.base == "tiny" and config.model.get("pretrain_steps", 0) > 0:
        config.unlock()
        config.model.base = str(tiny_base(config, workdir))
        config.lock()
    actor_config, base_params, tok = load_base(config.model, config.seed)
    if main:
        save_run_model(workdir, actor_config, tok)
    ref_config = actor_config.replace(param_dtype=config.model.reference_dtype)
    reference = _placed(mesh, _as_dtype(base_params, config.model.reference_dtype))

    rm_path = config.reward_model.path
    if not rm_path:
        if config.reward_model.train_steps <= 0:
            raise TrainError("reward_model.path is empty and reward_model.train_steps is 0: no reward model")
        rm_path = _inline_reward_model(config, workdir, show_progress)
    if not Path(rm_path).is_dir():
        raise TrainError(f"reward_model.path={str(rm_path)!r}: model folder not found")
    rm_shapes = model.param_shapes(hf.read_config(rm_path, param_dtype=config.reward_model.dtype))
    rm_config, rm_params = hf.load_pretrained(rm_path, dtype=config.reward_model.dtype,
                                              shardings=sharding.param_shardings(mesh, rm_shapes),
                                              compute_dtype=config.model.compute_dtype)
    if rm_config.has_lm_head:
        raise TrainError(f"reward_model.path={str(rm_path)!r} is a causal LM, not MistralForSequenceClassification")
    critic_config = rm_config.replace(param_dtype=config.model.param_dtype, remat=config.model.remat)
    critic_init = _as_dtype(rm_params, config.model.param_dtype)

    p = config.ppo
    pc = ppo.PPOConfig(
        kl_coef=p.kl_coef, kl_estimator=p.kl_estimator, reward_clip=p.reward_clip, gamma=p.gamma, lam=p.lam,
        clip_ratio=p.clip_ratio, value_clip=p.value_clip, epochs=p.epochs, minibatches=p.minibatches,
        temperature=config.rollout.temperature,
        actor=optim.OptimConfig(lr=p.actor_lr, warmup_steps=p.warmup_steps, weight_decay=p.weight_decay,
                                max_grad_norm=p.max_grad_norm),
        critic=optim.OptimConfig(lr=p.critic_lr, warmup_steps=p.warmup_steps, weight_decay=p.weight_decay,
                                 max_grad_norm=p.max_grad_norm))
    cmc = cm.CMConfig(**{k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in config.cm.items()})
    d = config.data
    pairs, skipped = data.load_pairs(d.source, d.data_dir or None, d.split)
    prompts = sorted({pair.prompt for pair in pairs})
    system = d.system_prompt or None
    actor_prompts = [data.tokenize_prompt(tok, q, system) for q in prompts]
    rm_prompts = [data.tokenize_prompt(tok, q, None) for q in prompts]
    suppress = tokenizer.stop_token_ids(tok) if config.rollout.suppress_stop_tokens else ()

    actor_state = _placed_state(mesh, base_params, pc.actor)
    critic_state = _placed_state(mesh, critic_init, pc.critic)
    sampling = rollout.SamplingConfig(config.rollout.temperature, config.rollout.top_k, config.rollout.top_p,
                                      tuple(sorted(suppress)))
    progs = programs.coarse_programs(
        mesh, actor_config=actor_config, ref_config=ref_config, critic_config=critic_config, rm_config=rm_config,
        pc=pc, sampling=sampling, eos_token_ids=(tok.eos_token_id,), pad_id=tok.pad_token_id,
        actor_state=actor_state, critic_state=critic_state, reference=reference, rm_params=rm_params)
    it = data.BatchIterator(len(prompts), d.batch_size, config.seed)
    cm_state, start = cm.init_state(), 0
    if ckpt.latest_step() is not None:
        restored, meta = ckpt.restore(target={"actor": actor_state, "critic": critic_state})
        actor_state, critic_state = restored["actor"], restored["critic"]
        start, cm_state = meta["step"], meta["cm"]
        it.restore(meta["data"])
    writer = metrics.MetricsWriter(workdir, resume_step=start, enabled=main)
    bar = metrics.progress(config.steps, start, show_progress and main, desc="coarse")
    key, rows = jax.random.key(config.seed), []
    for step in range(start + 1, config.steps + 1):
        # Per-step keys from the step number: a resumed run draws exactly what an unbroken one would.
        rollout_key, update_key = jax.random.split(jax.random.fold_in(key, step))
        idx = it.next()
        prompt_ids, prompt_mask = _prompt_batch(mesh, [actor_prompts[i] for i in idx], d.prompt_buckets,
                                                tok.pad_token_id, d.truncate_prompts)
        rm_ids, rm_mask = _prompt_batch(mesh, [rm_prompts[i] for i in idx], d.prompt_buckets, tok.pad_token_id, True)
        length = cm.length_limit(cmc, cm_state)

        t0 = time.perf_counter()
        # Each program completes before the next is dispatched: XLA's CPU client can deadlock when two
        # programs with collectives are in flight at once (on GPUs this costs nothing measurable: each
        # program runs for seconds).
        r_params = settle(progs.to_rollout(actor_state.params))  # train -> rollout layout, once per iteration
        out = settle(progs.generate(length)(r_params, prompt_ids, prompt_mask, rollout_key))
        del r_params
        t1 = time.perf_counter()
        seq, seq_mask = settle(ppo.join(prompt_ids, prompt_mask, out.tokens, out.mask))
        # The reward model reads the dialogue without the system prompt, as it was trained.
        score = settle(progs.score(rm_params, *ppo.join(rm_ids, rm_mask, out.tokens, out.mask)))
        actor_state, critic_state, exp, m = settle(progs.iteration(actor_state, critic_state, reference, seq, seq_mask,
                                                                   out.mask, score, update_key))
        m = jax.device_get(m)
        t2 = time.perf_counter()

        score_np, mask_np = sharding.to_host(score), sharding.to_host(out.mask)
        kl_tokens = sharding.to_host(exp.old_logprobs) - sharding.to_host(exp.ref_logprobs)
        kl = float(np.sum(kl_tokens * mask_np) / max(mask_np.sum(), 1))
        cm_state = cm.update(cmc, cm_state, float(score_np.mean()), float(m["loss/value"]))
        row = {
            "reward/mean": float(score_np.mean()), "reward/std": float(score_np.std()), "kl": kl,
            **{k: float(v) for k, v in m.items()},
            "response/length": float(mask_np.sum(1).mean()), "prompt/bucket": int(prompt_ids.shape[1]),
            "cm/length_limit": length, "cm/next_length_limit": cm.length_limit(cmc, cm_state),
            "cm/p_advance": cm_state["p_advance"],
            "time/rollout_tokens_per_s": mask_np.size / (t1 - t0),
            "time/update_tokens_per_s": seq.size * pc.epochs / (t2 - t1),
            "compilations": compilations.total(),
            "skipped_updates": int(actor_state.skipped) + int(critic_state.skipped),
            "data/skipped_rows": skipped,
        }
        writer.write(step, row)
        rows.append({"step": step, **row})
        bar.update(1)
        bar.set_postfix(reward=f"{row['reward/mean']:.3f}", kl=f"{kl:.4f}", len=length,
                        tok_s=f"{row['time/rollout_tokens_per_s']:.0f}")
        if step % config.checkpoint_every == 0 or step == config.steps:
            ckpt.save(step, {"actor": actor_state, "critic": critic_state},
                      {"step": step, "cm": cm_state, "data": it.state(), "job": "coarse"})
    bar.close()
    writer.close()
    ckpt.close()
    return rows


# ----------------------------------------------------------------------------- export


def load_workdir_model(workdir: str | os.PathLike, step: int | None = None):
    """(MistralConfig, params, tokenizer folder) of a workdir's trained model at `step` (default latest):
    the actor of a coarse run, the reward model of a reward run. Params as saved, NumPy on the host.

    Only that model's params are read from the checkpoint: the critic and the optimizer
    moments stay on disk."""
    workdir = Path(workdir)
    for name in (RUN_CONFIG, MODEL_CONFIG):
        if not (workdir / name).exists():
            raise TrainError(f"{workdir}: no {name}; not a c2f_jax training workdir")
    job = json.loads((workdir / RUN_CONFIG).read_text())["job"]
    config = model.MistralConfig.from_hf(json.loads((workdir / MODEL_CONFIG).read_text()))
    ckpt = checkpoint.Checkpointer(workdir)
    try:
        params, _ = ckpt.restore_subtree(("actor" if job == "coarse" else "reward", "params"), step)
    finally:
        ckpt.close()
    return config, params, workdir / TOKENIZER_DIR


def export(workdir: str | os.PathLike, out: str | os.PathLike, step: int | None = None, dtype: str | None = None,
           overwrite: bool = False) -> Path:
    """Writes the trained model of a workdir as an HF folder: the actor of a coarse run
    (MistralForCausalLM) or the reward model of a reward run (MistralForSequenceClassification)."""
    config, params, tokenizer_dir = load_workdir_model(workdir, step)
    hf.save_pretrained(out, config, params, dtype=dtype, tokenizer_source=tokenizer_dir, overwrite=overwrite)
    return Path(out)


def main(argv=None) -> int:
    sharding.initialize_distributed()  # a no-op for a single process
    config, workdir = parse_args(sys.argv[1:] if argv is None else argv)
    if config.job == "reward":
        run_reward(config, workdir)
    elif config.job == "coarse":
        run_coarse(config, workdir)
    else:
        raise TrainError(f"job={config.job!r}; expected 'reward' or 'coarse'")
    print(f"done: {workdir}")
    return 0


if __name__ == "__main__":
    cli.run(main)
