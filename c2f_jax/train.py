"""`python -m c2f_jax.train --config configs/coarse.py [--config.a.b=value ...] [--workdir DIR]`

Runs the job the config names: `reward` (a Bradley-Terry reward model on
preference pairs) or `coarse` (the Coarse Actor: PPO with Continuous
Maximization). Restarting on a workdir that holds checkpoints resumes from the
latest one, exactly. The workdir's layout is c2f_jax.runtime.workdir's; the same command
runs as several processes (see c2f_jax.runtime.distributed and launch/).
"""

from __future__ import annotations

import ast
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

from c2f_jax import data
from c2f_jax.jobs import settings, sft
from c2f_jax.model import hf, model, sharding, tokenizer
from c2f_jax.rl import cm, optim, ppo, programs, reward
from c2f_jax.runtime import checkpoint, cli, compilations, distributed, metrics, workdir

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"  # a source checkout's configs/, for bare names
REQUIRED_KEYS = ("job", "steps", "seed", "checkpoint_every", "mesh.data", "mesh.fsdp", "mesh.tensor",
                 "rollout.temperature")


class TrainError(ValueError):
    """A config, workdir or input that the run cannot use."""


# ----------------------------------------------------------------------------- command line and workdir


def resolve_config_path(value: str) -> str:
    """A path as given, or a bare name such as `coarse.py` found in ./configs or the checkout's configs/."""
    path = Path(value.split(":")[0])
    if path.exists():
        return value
    for folder in (Path("configs"), CONFIG_DIR):
        if path.parent == Path(".") and (folder / path.name).exists():
            return str(folder / value)
    raise TrainError(f"config file {path} not found (nor in ./configs or {CONFIG_DIR})")


def _message(e: BaseException) -> str:
    """An absl/ml_collections error as plain text: some arrive as the repr of a repr of a multi-line string."""
    text = str(e)
    for _ in range(3):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            break
        if not isinstance(value, str):
            break
        text = value
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _bad_override(e: BaseException, argv: list[str]) -> str:
    """'--config.ppo.kl_coeff: no such key (Did you mean ...)' for ml_collections' KeyError on an override."""
    text = _message(e)
    first, _, rest = text.partition(" ")
    name = first.strip("'\"")
    overrides = [a.split("=", 1)[0] for a in argv if a.startswith("--config.")]
    flag = next((o for o in overrides if o.rsplit(".", 1)[-1] == name), None)
    if flag is None:
        return text
    return f"{flag}: no such key in the config" + (f"; {rest[0].lower()}{rest[1:]}" if rest else "")


def parse_args(argv: list[str]):
    """(config, workdir) from `--config FILE [--config.key=value ...] [--workdir DIR]`.

    A config file may import the config files beside it by module name (`import coarse`):
    their folder goes on the import path.
    """
    from absl import flags
    from ml_collections import config_flags

    joined, i, file = [], 0, None
    while i < len(argv):  # `--config X` -> `--config=X`, which overrides need
        arg = argv[i]
        if arg == "--config" and i + 1 < len(argv):
            arg, i = f"--config={argv[i + 1]}", i + 1
        if arg.startswith("--config="):
            path = resolve_config_path(arg.split("=", 1)[1])
            arg, file = "--config=" + path, path.split(":")[0]
            folder = str(Path(file).resolve().parent)
            if folder not in sys.path:
                sys.path.insert(0, folder)
        joined.append(arg)
        i += 1
    argv = ["c2f_jax.train", *joined]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "ml_collections config file", flag_values=fv,
                                    lock_config=True, sys_argv=argv)
    flags.DEFINE_string("workdir", None, "run directory (default runs/<config name>)", flag_values=fv)
    try:
        fv(argv)
    except SyntaxError as e:
        raise TrainError(f"config file {file}: syntax error at line {e.lineno}: {e.msg}") from None
    except (flags.Error, AttributeError, KeyError, ValueError, TypeError, ImportError) as e:
        if "has no attribute 'get_config'" in str(e):
            raise TrainError(f"config file {file}: defines no get_config()") from None
        raise TrainError(f"bad command line: {_bad_override(e, argv)}") from None
    except Exception as e:  # the config file's own code raised
        raise TrainError(f"config file {file}: {type(e).__name__}: {_message(e)}") from None
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


FLAGS_HELP = """flags:
  --config FILE          an ml_collections config file (a bare name such as tiny_coarse.py is looked up in
                         ./configs and the checkout's configs/); required
  --config.KEY=VALUE     override one config key (repeatable); `--config FILE --help` lists every key
  --workdir DIR          the run folder (default runs/<config name>); an existing one is resumed
  -h, --help             this text"""


def help_text(argv: list[str]) -> str:
    """The usage, the flags and, when a --config is given, every config key with its value."""
    text = f"{__doc__.strip()}\n\n{FLAGS_HELP}"
    rest = [a for a in argv if a not in ("-h", "--help")]
    if any(a == "--config" or a.startswith("--config=") for a in rest):
        config, _ = parse_args(rest)
        keys = workdir.flatten(config_dict(config))
        width = max(map(len, keys))
        text += "\n\nconfig keys (override with --config.KEY=VALUE):\n" + "\n".join(
            f"  {k.ljust(width)}  {json.dumps(v)}" for k, v in keys.items())
    return text


def config_dict(config) -> dict:
    return json.loads(config.to_json())


def check_inputs(config, path: Path) -> None:
    """What a run reads, checked before it creates or changes anything: the workdir, the model folders and,
    on a resume, the config the workdir was started with and the files of its latest checkpoint."""
    if path.exists() and not path.is_dir():
        raise TrainError(f"workdir {path}: is a file, not a folder")
    base = model.TINY if config.model.base == "tiny" else check_model_folder("model.base", config.model.base, True)
    if config.job == "coarse":
        longest = ("data.prompt_buckets + cm.buckets", max(config.data.prompt_buckets) + max(config.cm.buckets))
        fits = [(*longest, "model.base", base)]
        if config.reward_model.path:
            rm = check_model_folder("reward_model.path", config.reward_model.path, causal=False)
            fits.append((*longest, "reward_model.path", rm))
        else:
            fits.append(("reward_model.train.data.seq_buckets", max(config.reward_model.train.data.seq_buckets),
                         "model.base", base))
    else:
        fits = [("data.seq_buckets", max(config.data.seq_buckets), "model.base", base)]
    for fit in fits:
        check_positions(*fit)
    if checkpoint.step_dirs(path):
        workdir.check_resumable(path, config_dict(config))
        checkpoint.latest_checked(path)


def check_positions(key: str, longest: int, model_key: str, found: model.MistralConfig) -> None:
    """The longest sequence the buckets make must fit the model's positions (the rollout would refuse it only
    after the base and reward model had trained)."""
    if longest > found.max_position_embeddings:
        raise TrainError(f"{key}: the longest sequence, {longest} tokens, is more than the "
                         f"{found.max_position_embeddings} positions of {model_key}")


def check_model_folder(key: str, folder: str, causal: bool) -> model.MistralConfig:
    """An HF folder with a readable config.json and safetensors headers, of the right architecture; its config."""
    if not Path(folder).is_dir():
        raise TrainError(f"{key}={str(folder)!r}: model folder not found")
    try:
        found = hf.read_config(folder)
        hf.CheckpointReader(folder)
    except hf.HFError as e:
        raise TrainError(f"{key}: {e}") from None
    if found.has_lm_head != causal:
        want = model.CAUSAL_LM if causal else model.SEQ_CLS
        raise TrainError(f"{key}={str(folder)!r} is a {found.architecture}; it must be a {want}")
    return found


def prepare_workdir(config, path: Path) -> checkpoint.Checkpointer:
    """Creates the workdir (check_inputs has passed) and opens its checkpoints."""
    if distributed.writes_here():
        path.mkdir(parents=True, exist_ok=True)
    distributed.barrier("workdir")
    return checkpoint.Checkpointer(path, keep=config.get("keep_checkpoints", 3))


def restore(ckpt: checkpoint.Checkpointer, path: Path, target: dict) -> tuple[dict, dict]:
    """The latest checkpoint onto `target`; a broken one is an error that says how to go on."""
    step = ckpt.latest_step()
    try:
        return ckpt.restore(step, target=target)
    except checkpoint.CheckpointError as e:
        raise checkpoint.with_hint(path, step, e) from None


# ----------------------------------------------------------------------------- models


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
        params, loss = sft.fine_tune(base, params, texts, steps=config.model.pretrain_steps, batch_size=16,
                                     lr=3e-3, buckets=(128,), pad_id=tok.pad_token_id, seed=config.seed,
                                     progress="base" if show_progress else None)
        print(f"tiny base: {config.model.pretrain_steps} next-token steps on {len(texts)} dialogues, loss {loss:.3f}")
        hf.save_pretrained(tmp, base, params, tokenizer_source=tok, overwrite=True)

    # Process 0 trains it (on one device) and writes it; the others wait and read it.
    return workdir.write(out, train_and_save)


def load_base(config):
    """(MistralConfig, params, tokenizer) for model.base: an HF folder or the preset 'tiny' (random init)."""
    folder, runtime = config.model.base, settings.runtime(config)
    if folder == "tiny":
        base = model.TINY.replace(**runtime)
        return base, model.init_params(base, jax.random.key(config.seed)), tokenizer.load_tokenizer(None)
    check_model_folder("model.base", folder, causal=True)
    base, params = hf.load_pretrained(folder, dtype=runtime.pop("param_dtype"), **runtime)
    return base, params, tokenizer.load_tokenizer(folder)


def save_run_model(path: Path, config: model.MistralConfig, tok) -> None:
    """What export needs besides weights: the architecture and the tokenizer."""
    workdir.write_json(path / workdir.MODEL_CONFIG, config.to_hf())
    if not (path / workdir.TOKENIZER).exists():
        workdir.write(path / workdir.TOKENIZER, tok.save_pretrained, folder=True)


def inline_reward_model(config, path: Path, show_progress: bool) -> Path:
    """Runs reward_model.train (a reward job config) with this run's base, data, mesh and seed, in
    WORKDIR/reward_run, and exports it as WORKDIR/reward_model (the tiny demo's reward model)."""
    out = path / workdir.REWARD_MODEL
    if out.exists():
        return out
    run_reward(settings.inline_reward_config(config), path / workdir.REWARD_RUN, show_progress)
    return workdir.export(path / workdir.REWARD_RUN, out)


def _as_dtype(params, dtype: str):
    return jax.tree.map(lambda a: a.astype(dtype), params)


def _placed(mesh, params):
    """Params in the train layout of this mesh."""
    return sharding.place(params, sharding.param_shardings(mesh, params))


def _placed_state(mesh, params, oc: optim.OptimConfig) -> optim.TrainState:
    """A fresh train state with params and optimizer moments in the train layout."""
    state = optim.create_state(_placed(mesh, params), oc)
    return sharding.place(state, sharding.like_params(mesh, state, state.params))


def _device_batch(mesh, arrays: dict) -> dict:
    """Global host batch -> this host's rows -> one batch-sharded global array per key."""
    rows = sharding.host_slice(len(next(iter(arrays.values()))))
    return {k: sharding.global_batch(mesh, v[rows]) for k, v in arrays.items()}


# ----------------------------------------------------------------------------- the reward job


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
    last_eval = {}
    for step in range(start + 1, config.steps + 1):
        batch = data.preference_batch(tok, [train_pairs[i] for i in order.next()], job.seq_buckets, system)
        state, stats = jax.block_until_ready(progs.train(state, _device_batch(mesh, batch)))
        row = {"loss": float(stats["loss"]), "accuracy": float(stats["accuracy"]),
               "grad_norm": float(stats["grad_norm"]), "skipped_updates": int(stats["skipped"]), "compilations": compilations.total(),
               "data/skipped_rows": skipped}
        if step % config.eval_every == 0 or step == config.steps:
            last_eval = _reward_eval(progs.margins, state.params, mesh, tok, eval_pairs, job.seq_buckets,
                                     job.batch_size, system)
            row.update(last_eval)
        writer.write(step, row)
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{last_eval.get('eval/accuracy', float('nan')):.2f}")
        if step % config.checkpoint_every == 0 or step == config.steps:
            ckpt.save(step, {"reward": state}, {"step": step, "data": order.state(), "job": "reward"})
    bar.close()
    writer.close()
    ckpt.close()
    return last_eval


# ----------------------------------------------------------------------------- the coarse job


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
    return {"sampler_gap/mean": float(gap.mean()) if gap.size else 0.0,
            "sampler_gap/max": float(gap.max()) if gap.size else 0.0}


def _coarse_models(config, path: Path, mesh, job, base_config, base_params, tok, show_progress: bool):
    """The reward model (reward_model.path, or trained inline), the four roles placed on the mesh and the compiled
    programs: (rm_params, reference, actor_state, critic_state, programs)."""
    rm_path = config.reward_model.path or inline_reward_model(config, path, show_progress)
    check_model_folder("reward_model.path", rm_path, causal=False)
    rm_file_config = hf.read_config(rm_path, param_dtype=config.reward_model.dtype)
    roles = settings.coarse_models(config, base_config, rm_file_config)
    _, rm_params = hf.load_pretrained(rm_path, dtype=config.reward_model.dtype,
                                      shardings=sharding.param_shardings(mesh, model.param_shapes(roles.reward)),
                                      compute_dtype=roles.reward.compute_dtype)
    reference = _placed(mesh, _as_dtype(base_params, roles.reference.param_dtype))
    actor_state = _placed_state(mesh, base_params, job.ppo.actor)
    critic_state = _placed_state(mesh, _as_dtype(rm_params, roles.critic.param_dtype), job.ppo.critic)
    progs = programs.coarse_programs(
        mesh, actor_config=roles.actor, ref_config=roles.reference, critic_config=roles.critic,
        rm_config=roles.reward, pc=job.ppo, sampling=job.sampling, eos_token_ids=(tok.eos_token_id,),
        pad_id=tok.pad_token_id, actor_state=actor_state, critic_state=critic_state, reference=reference,
        rm_params=rm_params)
    return rm_params, reference, actor_state, critic_state, progs


def _iteration_metrics(score, out, exp, stats: dict, kl_coef: float) -> dict:
    """One iteration's reward, KL coefficient, PPO statistics, sampler-vs-trainer gap and response length."""
    score, mask = sharding.to_host(score), sharding.to_host(out.mask)
    return {"reward/mean": float(score.mean()), "reward/std": float(score.std()), "kl_coef": kl_coef,
            **{k: float(v) for k, v in stats.items()},
            **sampler_gap(sharding.to_host(out.logprobs), sharding.to_host(exp.old_logprobs), mask),
            "response/length": float(mask.sum(1).mean())}


def run_coarse(config, path: Path, show_progress: bool = True) -> list[dict]:
    """PPO with Continuous Maximization; returns the metrics rows of this process's steps."""
    # --- set up: settings, workdir, models, data, compiled programs, and a resumed state
    settings.coarse(config)  # every bad setting and input fails here, before the workdir is touched
    resolved = config_dict(config)
    check_inputs(config, path)
    pairs, skipped = data.load_pairs(config.data.source, config.data.data_dir or None, config.data.split)
    prompts = sorted({pair.prompt for pair in pairs})
    order = data.BatchIterator(len(prompts), int(config.data.batch_size), config.seed)
    mesh = sharding.make_mesh(**settings.mesh_shape(config))

    ckpt = prepare_workdir(config, path)
    if config.model.base == "tiny" and config.model.get("pretrain_steps", 0) > 0:
        config.unlock()
        config.model.base = str(tiny_base(config, path, show_progress and distributed.writes_here()))
        config.lock()
    base_config, base_params, tok = load_base(config)
    job = settings.coarse(config, tokenizer.stop_token_ids(tok))

    rm_params, reference, actor_state, critic_state, progs = _coarse_models(
        config, path, mesh, job, base_config, base_params, tok, show_progress)

    actor_prompts = [data.tokenize_prompt(tok, q, config.data.system_prompt or None) for q in prompts]
    rm_prompts = [data.tokenize_prompt(tok, q, None) for q in prompts]  # the reward model never saw the system prompt
    cm_state, kl_coef, start = cm.init_state(), job.ppo.kl_coef, 0
    if ckpt.latest_step() is not None:
        restored, meta = restore(ckpt, path, {"actor": actor_state, "critic": critic_state})
        actor_state, critic_state = restored["actor"], restored["critic"]
        start, cm_state, kl_coef = meta["step"], meta["cm"], meta.get("kl_coef", kl_coef)
        order.restore(meta["data"])
    # Written once the checkpoint has read back: a refused resume changes nothing.
    workdir.write_json(path / workdir.RUN_CONFIG, resolved, overwrite=True)
    save_run_model(path, base_config, tok)
    writer = metrics.MetricsWriter(path, resume_step=start)
    bar = metrics.progress(config.steps, start, show_progress and distributed.writes_here(), desc="coarse")
    key, rows = jax.random.key(config.seed), []

    # --- the loop: rollout at the CM length limit, score, PPO iteration, CM decides the next limit
    for step in range(start + 1, config.steps + 1):
        # Per-step keys from the step number: a resumed run draws exactly what an unbroken one would.
        rollout_key, update_key = jax.random.split(jax.random.fold_in(key, step))
        idx = order.next()
        prompt_ids, prompt_mask = _prompt_batch(mesh, [actor_prompts[i] for i in idx], job.prompt_buckets,
                                                tok.pad_token_id, config.data.truncate_prompts)
        rm_ids, rm_mask = _prompt_batch(mesh, [rm_prompts[i] for i in idx], job.prompt_buckets, tok.pad_token_id,
                                        True)
        length = cm.length_limit(job.cm, cm_state)

        # Each program completes before the next is dispatched: XLA's CPU client can deadlock when two
        # programs with collectives are in flight at once (on GPUs this costs nothing measurable: each
        # program runs for seconds).
        t0 = time.perf_counter()
        r_params = jax.block_until_ready(progs.to_rollout(actor_state.params))  # train -> rollout layout
        out = jax.block_until_ready(progs.generate(length)(r_params, prompt_ids, prompt_mask, rollout_key))
        del r_params
        t1 = time.perf_counter()
        seq, seq_mask = jax.block_until_ready(ppo.join(prompt_ids, prompt_mask, out.tokens, out.mask))
        score = jax.block_until_ready(progs.score(rm_params, *ppo.join(rm_ids, rm_mask, out.tokens, out.mask)))
        actor_state, critic_state, exp, stats = jax.block_until_ready(progs.iteration(
            actor_state, critic_state, reference, seq, seq_mask, out.mask, score, update_key, np.float32(kl_coef)))
        stats = jax.device_get(stats)
        t2 = time.perf_counter()

        row = _iteration_metrics(score, out, exp, stats, kl_coef)
        cm_state = cm.update(job.cm, cm_state, row["reward/mean"], row["loss/value"])
        row.update({
            "prompt/bucket": int(prompt_ids.shape[1]),
            "cm/length_limit": length, "cm/next_length_limit": cm.length_limit(job.cm, cm_state),
            "cm/p_advance": cm_state["p_advance"],
            "time/rollout_tokens_per_s": out.mask.size / (t1 - t0),
            "time/update_tokens_per_s": seq.size * job.ppo.epochs / (t2 - t1),
            "compilations": compilations.total(),
            "skipped_updates": int(actor_state.skipped) + int(critic_state.skipped), "data/skipped_rows": skipped})
        kl_coef = ppo.adapt_kl_coef(kl_coef, row["kl"], job.batch_size, job.ppo)
        writer.write(step, row)
        rows.append({"step": step, **row})
        bar.update(1)
        bar.set_postfix(reward=f"{row['reward/mean']:.3f}", kl=f"{row['kl']:.4f}", len=length,
                        tok_s=f"{row['time/rollout_tokens_per_s']:.0f}")
        if step % config.checkpoint_every == 0 or step == config.steps:
            ckpt.save(step, {"actor": actor_state, "critic": critic_state},
                      {"step": step, "cm": cm_state, "kl_coef": kl_coef, "data": order.state(), "job": "coarse"})
    bar.close()
    writer.close()
    ckpt.close()
    return rows


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(help_text(argv))
        return 0
    config, path = parse_args(argv)
    if config.job == "reward":
        run_reward(config, path)
    elif config.job == "coarse":
        run_coarse(config, path)
    else:
        raise TrainError(f"job={config.job!r}; expected 'reward' or 'coarse'")
    if distributed.writes_here():
        print(f"done: {path}")
    return 0


if __name__ == "__main__":
    cli.run(main)
