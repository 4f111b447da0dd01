"""What every job does before its loop: check its inputs, open its workdir, load and place its models."""

from __future__ import annotations

import json
from pathlib import Path

import jax

from c2f_jax.jobs import settings
from c2f_jax.model import hf, model, sharding, tokenizer
from c2f_jax.rl import optim
from c2f_jax.runtime import checkpoint, distributed, metrics, workdir, workdir_lock


class TrainError(ValueError):
    """A config, workdir or input that the run cannot use."""


def config_dict(config) -> dict:
    return json.loads(config.to_json())


def check_inputs(config, path: Path) -> None:
    """What a run reads, checked before it creates or changes anything: the workdir, the model folders and,
    on a resume, the config the workdir was started with and the files of its latest checkpoint."""
    if path.exists() and not path.is_dir():
        raise TrainError(f"workdir {path}: is a file, not a folder")
    reads = {"model.base": config.model.base, "data.source": config.data.source}
    if config.job == "coarse":
        reads["reward_model.path"] = config.reward_model.path
    workdir.check_apart(path, reads, "--workdir")
    base = model.TINY if config.model.base == "tiny" else check_model_folder("model.base", config.model.base, True)
    if config.job == "coarse":
        longest = ("data.prompt_buckets + cm.buckets", max(config.data.prompt_buckets) + max(config.cm.buckets))
        fits = [(*longest, "model.base", base)]
        if config.reward_model.path:
            rm = check_model_folder("reward_model.path", config.reward_model.path, causal=False)
            fits.append((*longest, "reward_model.path", rm))
        else:
            fits.append(
                (
                    "reward_model.train.data.seq_buckets",
                    max(config.reward_model.train.data.seq_buckets),
                    "model.base",
                    base,
                )
            )
    else:
        fits = [("data.seq_buckets", max(config.data.seq_buckets), "model.base", base)]
    for fit in fits:
        check_positions(*fit)
    if checkpoint.step_dirs(path):
        workdir.check_resumable(path, config_dict(config))
        checkpoint.latest_checked(path)
        metrics.read_metrics(path, drop_torn_last_line=True)  # any other bad row stops the resume here


def check_positions(key: str, longest: int, model_key: str, found: model.MistralConfig) -> None:
    """The longest sequence the buckets make must fit the model's positions (the rollout would refuse it only
    after the base and reward model had trained)."""
    if longest > found.max_position_embeddings:
        raise TrainError(
            f"{key}: the longest sequence, {longest} tokens, is more than the "
            f"{found.max_position_embeddings} positions of {model_key}"
        )


def check_model_folder(key: str, folder: str, causal: bool) -> model.MistralConfig:
    """An HF folder with a readable config.json and safetensors headers that hold the tensors it implies, of the
    right architecture; its config."""
    if not Path(folder).is_dir():
        raise TrainError(f"{key}={str(folder)!r}: model folder not found")
    try:
        found = hf.read_config(folder)
        hf.check_tensors(hf.CheckpointReader(folder), hf.tensor_specs(found))  # headers only: no weight is read
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
        workdir_lock.hold(path)  # for every process of the job
    distributed.barrier("workdir")
    return checkpoint.Checkpointer(path, keep=config.get("keep_checkpoints", 3), writer=True)


def restore(ckpt: checkpoint.Checkpointer, path: Path, target: dict) -> tuple[dict, dict]:
    """The latest checkpoint onto `target`; a broken one is an error that says how to go on."""
    step = ckpt.latest_step()
    try:
        return ckpt.restore(step, target=target)
    except checkpoint.CheckpointError as e:
        raise checkpoint.with_hint(path, step, e) from None


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
