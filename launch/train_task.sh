#!/bin/bash
# One task of a job: `python -m c2f_jax.train` with the run's settings from the environment.
#   CONFIG   config file (default configs/coarse.py)     WORKDIR  run folder (on storage every node sees)
#   BASE     HF folder of the base model (optional)      REWARD   HF folder of the reward model (optional)
# Arguments are passed on (`--config.key=value` overrides; a later one wins over an earlier one).
# Under srun with several tasks, c2f_jax.runtime.distributed joins them from SLURM's variables (coordinator: the
# step's first node; process id: SLURM_PROCID; process count: SLURM_NTASKS).
set -euo pipefail
args=(--config "${CONFIG:-configs/coarse.py}" --workdir "${WORKDIR:?set WORKDIR=/shared/path/to/run}")
if [ -n "${BASE:-}" ]; then args+=("--config.model.base=$BASE"); fi
if [ -n "${REWARD:-}" ]; then args+=("--config.reward_model.path=$REWARD"); fi
exec python -m c2f_jax.train "${args[@]}" "$@"
