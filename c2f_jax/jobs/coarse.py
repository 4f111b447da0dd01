"""The coarse job: the Coarse Actor, PPO with Continuous Maximization (`job = 'coarse'`)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import jax
import numpy as np

from c2f_jax import data
from c2f_jax.jobs import settings, sft
from c2f_jax.jobs.reward_model import run_reward
from c2f_jax.jobs.setup import (
    _as_dtype,
    _device_batch,
    _placed,
    _placed_state,
    check_inputs,
    check_model_folder,
    config_dict,
    load_base,
    prepare_workdir,
    restore,
    save_run_model,
)
from c2f_jax.model import export, hf, model, sharding, tokenizer
from c2f_jax.rl import cm, ppo, programs
from c2f_jax.runtime import backend, compilations, distributed, metrics, preemption, workdir, workdir_lock


def tiny_base(config, path: Path, show_progress: bool = True) -> Path:
    """The demo's base model: the tiny preset, taught some language on the run's dialogues
    (model.pretrain_steps of next-token training), saved once as WORKDIR/base_model."""
    out = path / workdir.BASE_MODEL
    if out.exists():
        return out

    def train_and_save(tmp: Path) -> None:
        tok = tokenizer.load_tokenizer(None)
        base = model.TINY.replace(compute_dtype=config.model.compute_dtype)
        params = model.init_params(base, jax.random.key(config.seed))
        pairs, _ = data.load_pairs(config.data.source, config.data.data_dir or None, config.data.split)
        texts = [tok(pair.prompt + " " + pair.chosen).input_ids for pair in pairs]
        params, loss = sft.fine_tune(
            base,
            params,
            texts,
            steps=config.model.pretrain_steps,
            batch_size=16,
            lr=3e-3,
            buckets=(128,),
            pad_id=tok.pad_token_id,
            seed=config.seed,
            progress="base" if show_progress else None,
        )
        print(f"tiny base: {config.model.pretrain_steps} next-token steps on {len(texts)} dialogues, loss {loss:.3f}")
        hf.save_pretrained(tmp, base, params, tokenizer_source=tok, overwrite=True)

    # Process 0 trains it (on one device) and writes it; the others wait and read it.
    return workdir.write(out, train_and_save)


def inline_reward_model(config, path: Path, show_progress: bool) -> Path:
    """Runs reward_model.train (a reward job config) with this run's base, data, mesh and seed, in
    WORKDIR/reward_run, and exports it as WORKDIR/reward_model (the tiny demo's reward model)."""
    out = path / workdir.REWARD_MODEL
    if out.exists():
        return out
    run_reward(settings.inline_reward_config(config), path / workdir.REWARD_RUN, show_progress)
    return export.export(path / workdir.REWARD_RUN, out)


def _prompt_batch(mesh, token_lists, buckets, pad_id, truncate):
    """Left-padded prompts as batch-sharded arrays; the bucket is chosen from the global batch so all hosts agree."""
    ids, mask = data.left_pad(token_lists, buckets, pad_id, truncate=truncate)
    b = _device_batch(mesh, {"ids": ids, "mask": mask})
    return b["ids"], b["mask"]


def sampler_gap(rollout_logprobs: np.ndarray, trainer_logprobs: np.ndarray, mask: np.ndarray) -> dict:
    """Mean and max |sampler - trainer| logprob of the sampled tokens (float32 [B, R] each, host arrays): the
    rollout copy (compute dtype, rollout layout) against the trainer's old logprobs. PPO's ratio assumes they
    are one policy; a gap here (a dtype, a kernel, a filter the trainer lacks) biases every update."""
    gap = np.abs(rollout_logprobs - trainer_logprobs)[mask > 0]
    return {
        "sampler_gap/mean": float(gap.mean()) if gap.size else 0.0,
        "sampler_gap/max": float(gap.max()) if gap.size else 0.0,
    }


@dataclasses.dataclass
class CoarseRun:
    """What the loop needs, from `setup`: the job's settings, the mesh, the tokenizer, the compiled programs,
    the frozen models, the trained states, the tokenized prompts and where the run resumes."""

    job: settings.Coarse
    mesh: object
    tok: object
    progs: programs.CoarsePrograms
    rm_params: dict
    reference: dict
    actor: object  # optim.TrainState
    critic: object
    actor_prompts: list  # token lists, with the system prompt
    rm_prompts: list  # the same prompts without it: the reward model never saw one
    order: data.BatchIterator
    skipped_rows: int
    ckpt: object  # checkpoint.Checkpointer
    start: int
    cm_state: dict
    kl_coef: float


def setup(config, path: Path, show_progress: bool = True) -> CoarseRun:
    """Checks every setting and input before the workdir is touched, then loads, places and compiles the models
    and resumes from the latest checkpoint, if any."""
    job = settings.coarse(config)
    resolved = config_dict(config)
    check_inputs(config, path)
    pairs, skipped = data.load_pairs(config.data.source, config.data.data_dir or None, config.data.split)
    prompts = sorted({pair.prompt for pair in pairs})
    order = data.BatchIterator(len(prompts), int(config.data.batch_size), config.seed)
    # The tiny base is made later, with the bundled tokenizer: its prompts tokenize the same way now.
    tok = tokenizer.load_tokenizer(None if config.model.base == "tiny" else config.model.base)
    actor_prompts = [data.tokenize_prompt(tok, q, config.data.system_prompt or None) for q in prompts]
    if not config.data.truncate_prompts:
        data.check_lengths(
            actor_prompts,
            job.prompt_buckets,
            f"data.source {config.data.source}",
            "data.prompt_buckets (or set data.truncate_prompts)",
        )
    mesh = sharding.make_mesh(**settings.mesh_shape(config))
    ckpt = prepare_workdir(config, path)
    if config.model.base == "tiny" and config.model.get("pretrain_steps", 0) > 0:
        config.unlock()
        config.model.base = str(tiny_base(config, path, show_progress and distributed.writes_here()))
        config.lock()
    base_config, base_params, tok = load_base(config)
    job = settings.with_stop_tokens(job, tokenizer.stop_token_ids(tok))
    run = CoarseRun(
        job,
        mesh,
        tok,
        *_models(config, path, mesh, job, base_config, base_params, tok, show_progress),
        actor_prompts=actor_prompts,
        rm_prompts=[data.tokenize_prompt(tok, q, None) for q in prompts],
        order=order,
        skipped_rows=skipped,
        ckpt=ckpt,
        start=0,
        cm_state=cm.init_state(),
        kl_coef=job.ppo.kl_coef,
    )
    if ckpt.latest_step() is not None:
        restored, meta = restore(ckpt, path, {"actor": run.actor, "critic": run.critic})
        run.actor, run.critic = restored["actor"], restored["critic"]
        run.start, run.cm_state, run.kl_coef = meta["step"], meta["cm"], meta.get("kl_coef", run.kl_coef)
        order.restore(meta["data"])
    # Written once the checkpoint has read back: a refused resume changes nothing.
    workdir.write_json(path / workdir.RUN_CONFIG, resolved, overwrite=True)
    save_run_model(path, base_config, tok)
    return run


def _models(config, path: Path, mesh, job, base_config, base_params, tok, show_progress: bool):
    """The compiled programs, the reward model (reward_model.path, or trained inline) and the other three roles
    placed on the mesh: (programs, rm_params, reference, actor_state, critic_state)."""
    rm_path = config.reward_model.path or inline_reward_model(config, path, show_progress)
    check_model_folder("reward_model.path", rm_path, causal=False)
    rm_file_config = hf.read_config(rm_path, param_dtype=config.reward_model.dtype)
    roles = settings.coarse_models(config, base_config, rm_file_config)
    _, rm_params = hf.load_pretrained(
        rm_path,
        dtype=config.reward_model.dtype,
        shardings=sharding.param_shardings(mesh, model.param_shapes(roles.reward)),
        compute_dtype=roles.reward.compute_dtype,
    )
    reference = _placed(mesh, _as_dtype(base_params, roles.reference.param_dtype))
    actor_state = _placed_state(mesh, base_params, job.ppo.actor)
    critic_state = _placed_state(mesh, _as_dtype(rm_params, roles.critic.param_dtype), job.ppo.critic)
    progs = programs.coarse_programs(
        mesh,
        actor_config=roles.actor,
        ref_config=roles.reference,
        critic_config=roles.critic,
        rm_config=roles.reward,
        pc=job.ppo,
        sampling=job.sampling,
        eos_token_ids=(tok.eos_token_id,),
        pad_id=tok.pad_token_id,
        actor_state=actor_state,
        critic_state=critic_state,
        reference=reference,
        rm_params=rm_params,
    )
    return progs, rm_params, reference, actor_state, critic_state


def _prompts(run: CoarseRun, idx, truncate: bool) -> tuple:
    """(actor ids, mask, reward-model ids, mask) of the prompts `idx`, left-padded to one prompt bucket."""
    pad = run.tok.pad_token_id
    return (
        *_prompt_batch(run.mesh, [run.actor_prompts[i] for i in idx], run.job.prompt_buckets, pad, truncate),
        *_prompt_batch(run.mesh, [run.rm_prompts[i] for i in idx], run.job.prompt_buckets, pad, True),
    )


def metrics_row(score, out, exp, stats: dict, kl_coef: float, seconds: tuple[float, float], epochs: int) -> dict:
    """One iteration's reward, KL coefficient, PPO statistics, sampler-vs-trainer gap, response length and
    throughput (seconds of the rollout and of scoring + update)."""
    score, mask, seq_tokens = sharding.to_host(score), sharding.to_host(out.mask), exp.seq_ids.size
    return {
        "reward/mean": float(score.mean()),
        "reward/std": float(score.std()),
        "kl_coef": kl_coef,
        **{k: float(v) for k, v in stats.items()},
        **sampler_gap(sharding.to_host(out.logprobs), sharding.to_host(exp.old_logprobs), mask),
        "response/length": float(mask.sum(1).mean()),
        "time/rollout_tokens_per_s": mask.size / seconds[0],
        "time/update_tokens_per_s": seq_tokens * epochs / seconds[1],
    }


def run_coarse(config, path: Path, show_progress: bool = True) -> list[dict]:
    """PPO with Continuous Maximization; returns the metrics rows of this process's steps."""
    run = setup(config, path, show_progress)
    job, progs, done = run.job, run.progs, backend.of_mesh(run.mesh).wait
    actor, critic, cm_state, kl_coef = run.actor, run.critic, run.cm_state, run.kl_coef
    writer = metrics.MetricsWriter(path, resume_step=run.start)
    bar = metrics.progress(config.steps, run.start, show_progress and distributed.writes_here(), desc="coarse")
    key, rows, stop = jax.random.key(config.seed), [], False
    for step in range(run.start + 1, config.steps + 1):
        # Per-step keys from the step number: a resumed run draws exactly what an unbroken one would.
        rollout_key, update_key = jax.random.split(jax.random.fold_in(key, step))
        ids, mask, rm_ids, rm_mask = _prompts(run, run.order.next(), config.data.truncate_prompts)
        length = cm.length_limit(job.cm, cm_state)
        t0 = time.perf_counter()
        out = done(progs.generate(length)(done(progs.to_rollout(actor.params)), ids, mask, rollout_key))
        t1 = time.perf_counter()
        seq, seq_mask = done(ppo.join(ids, mask, out.tokens, out.mask))
        score = done(progs.score(run.rm_params, *ppo.join(rm_ids, rm_mask, out.tokens, out.mask)))
        actor, critic, exp, stats = done(
            progs.iteration(
                actor, critic, run.reference, seq, seq_mask, out.mask, score, update_key, np.float32(kl_coef)
            )
        )
        row = metrics_row(
            score, out, exp, jax.device_get(stats), kl_coef, (t1 - t0, time.perf_counter() - t1), job.ppo.epochs
        )
        next_cm = cm.update(job.cm, cm_state, row["reward/mean"], row["loss/value"])
        row.update(
            {
                "prompt/bucket": int(ids.shape[1]),
                "cm/length_limit": length,
                "cm/next_length_limit": cm.length_limit(job.cm, next_cm),
                "cm/p_advance": next_cm["p_advance"],
                "compilations": compilations.total(),
                "data/skipped_rows": run.skipped_rows,
                "skipped_updates": int(actor.skipped) + int(critic.skipped),
            }
        )
        cm_state, kl_coef = next_cm, ppo.adapt_kl_coef(kl_coef, row["kl"], job.batch_size, job.ppo)
        writer.write(step, row)
        rows.append({"step": step, **row})
        bar.update(1)
        bar.set_postfix(reward=f"{row['reward/mean']:.3f}", kl=f"{row['kl']:.4f}", len=length)
        stop = preemption.requested()
        if stop or step % config.checkpoint_every == 0 or step == config.steps:
            run.ckpt.save(
                step,
                {"actor": actor, "critic": critic},
                {"step": step, "cm": cm_state, "kl_coef": kl_coef, "data": run.order.state(), "job": "coarse"},
            )
        if stop:
            break
    bar.close()
    writer.close()
    run.ckpt.close()  # waits until the last save is committed
    workdir_lock.release(path)
    if stop:
        raise preemption.Stopped(step)
    return rows
