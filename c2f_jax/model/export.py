"""A workdir's trained model: read back from its latest (or a given) checkpoint, and exported as an HF folder.

JAX and Orbax are imported here, not by c2f_jax.runtime.workdir, which the merger and the file tools use.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from c2f_jax.model import hf, safetensors_io
from c2f_jax.model.config import ConfigError, MistralConfig, float_dtype
from c2f_jax.runtime import checkpoint, workdir


def load_model(path: str | os.PathLike, step: int | None = None):
    """(MistralConfig, params, tokenizer folder) of a workdir's trained model at `step` (default latest):
    the actor of a coarse run, the reward model of a reward run. Params as saved, NumPy on the host.

    Only that model's params are read from the checkpoint: the critic and the optimizer
    moments stay on disk."""
    path = Path(path)
    keys = workdir.TRAINED_MODEL[workdir.job(path)]
    if not (path / workdir.MODEL_CONFIG).is_file():
        raise workdir.WorkdirError(f"{path}: no {workdir.MODEL_CONFIG}; not a c2f_jax training workdir")
    config = MistralConfig.from_hf(json.loads((path / workdir.MODEL_CONFIG).read_text()))
    ckpt = checkpoint.Checkpointer(path)
    try:
        params, _ = ckpt.restore_subtree(keys, step)
        where = path / workdir.CHECKPOINTS / str(step if step is not None else ckpt.latest_step())
    finally:
        ckpt.close()
    for name, leaf in workdir.flatten(params).items():
        try:
            safetensors_io.check_finite(leaf, "/".join(keys) + "/" + name.replace(".", "/"), where)
        except safetensors_io.SafetensorsError as e:
            raise workdir.WorkdirError(str(e)) from None
    return config, params, path / workdir.TOKENIZER


def export(
    path: str | os.PathLike, out: str | os.PathLike, step: int | None = None, dtype=None, overwrite: bool = False
) -> Path:
    """Writes a workdir's trained model as an HF folder: the actor of a coarse run (MistralForCausalLM)
    or the reward model of a reward run (MistralForSequenceClassification), with the run's tokenizer."""
    try:
        dtype = None if dtype is None else float_dtype(dtype, "dtype").name
    except ConfigError as e:
        raise workdir.WorkdirError(str(e)) from None
    if dtype is not None and dtype not in hf.HF_DTYPES:
        raise workdir.WorkdirError(
            f"dtype={dtype!r}: an HF folder that transformers loads stores one of {', '.join(hf.HF_DTYPES)}"
        )
    workdir.check_output(out, {"--checkpoint": path}, overwrite=overwrite)
    if not Path(out).absolute().parent.is_dir():
        raise workdir.WorkdirError(f"{Path(out).absolute().parent}: parent folder does not exist")
    config, params, tokenizer_dir = load_model(path, step)
    hf.save_pretrained(out, config, params, dtype=dtype, tokenizer_source=tokenizer_dir, overwrite=overwrite)
    return Path(out)
