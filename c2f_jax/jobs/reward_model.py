"""The reward job: a Bradley-Terry reward model trained on preference pairs (`job = 'reward'`)."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from c2f_jax import data
from c2f_jax.jobs import settings
from c2f_jax.jobs.setup import (
    _device_batch,
    _placed_state,
    check_inputs,
    config_dict,
    load_base,
    prepare_workdir,
    restore,
    save_run_model,
)
from c2f_jax.model import sharding
from c2f_jax.rl import programs, reward
from c2f_jax.runtime import backend, compilations, distributed, metrics, preemption, workdir, workdir_lock


def _reward_eval(margins_fn, params, mesh, tok, pairs, buckets, batch_size, system_prompt):
    """Held-out loss/accuracy/margin over all pairs, in fixed-size batches (the last one padded by repeats)."""
    totals, n = {"loss": 0.0, "accuracy": 0.0, "margin": 0.0}, len(pairs)
    for start in range(0, n, batch_size):
        chunk = pairs[start : start + batch_size]
        padded = chunk + [chunk[-1]] * (batch_size - len(chunk))
        batch = _device_batch(mesh, data.preference_batch(tok, padded, buckets, system_prompt))
        margin = sharding.to_host(margins_fn(params, batch))[: len(chunk)]
        totals["loss"] += float(np.sum(np.logaddexp(0.0, -margin)))
        totals["accuracy"] += float(np.sum(margin > 0))
        totals["margin"] += float(np.sum(margin))
    return {f"eval/{k}": v / n for k, v in totals.items()}


def run_reward(config, path: Path, show_progress: bool = True) -> dict:
    """Trains the reward model; returns the last eval metrics."""
    # --- every input checked before the workdir is touched
    job, resolved = settings.reward(config), config_dict(config)
    check_inputs(config, path)
    pairs, skipped = data.load_pairs(config.data.source, config.data.data_dir or None, config.data.split)
    train_pairs, eval_pairs = data.train_eval_split(pairs, config.data.eval_fraction, config.seed)
    order = data.BatchIterator(len(train_pairs), job.batch_size, config.seed)
    mesh = sharding.make_mesh(**settings.mesh_shape(config))

    ckpt = prepare_workdir(config, path)
    base_config, base_params, tok = load_base(config)
    rm_config, rm_params = reward.init_from_base(base_config, base_params, jax.random.key(config.seed + 1))
    system = config.data.system_prompt or None
    state = _placed_state(mesh, rm_params, job.optim)
    progs = programs.reward_programs(mesh, config=rm_config, optim_config=job.optim, state=state)
    start = 0
    if ckpt.latest_step() is not None:
        restored, meta = restore(ckpt, path, {"reward": state})
        state, start = restored["reward"], meta["step"]
        order.restore(meta["data"])
    # Written once the checkpoint has read back: a refused resume changes nothing.
    workdir.write_json(path / workdir.RUN_CONFIG, resolved, overwrite=True)
    save_run_model(path, rm_config, tok)
    writer = metrics.MetricsWriter(path, resume_step=start)
    bar = metrics.progress(config.steps, start, show_progress and distributed.writes_here(), desc="reward")
    last_eval, stop = {}, False
    for step in range(start + 1, config.steps + 1):
        batch = data.preference_batch(tok, [train_pairs[i] for i in order.next()], job.seq_buckets, system)
        state, stats = backend.of_mesh(mesh).wait(progs.train(state, _device_batch(mesh, batch)))
        row = {
            "loss": float(stats["loss"]),
            "accuracy": float(stats["accuracy"]),
            "grad_norm": float(stats["grad_norm"]),
            "skipped_updates": int(stats["skipped"]),
            "compilations": compilations.total(),
            "data/skipped_rows": skipped,
        }
        if step % config.eval_every == 0 or step == config.steps:
            last_eval = _reward_eval(
                progs.margins, state.params, mesh, tok, eval_pairs, job.seq_buckets, job.batch_size, system
            )
            row.update(last_eval)
        writer.write(step, row)
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{last_eval.get('eval/accuracy', float('nan')):.2f}")
        stop = preemption.requested()
        if stop or step % config.checkpoint_every == 0 or step == config.steps:
            ckpt.save(step, {"reward": state}, {"step": step, "data": order.state(), "job": "reward"})
        if stop:
            break
    bar.close()
    writer.close()
    ckpt.close()  # waits until the last save is committed
    workdir_lock.release(path)
    if stop:
        raise preemption.Stopped(step)
    return last_eval
