#!/bin/bash
# Coarse Actor PPO on one node: 8 GPUs as fsdp=8 (a single process; no jax.distributed needed).
set -euo pipefail
WORKDIR=${WORKDIR:-$PWD/runs/coarse-1node}
BASE=${BASE:?set BASE=/path/to/Mistral-7B-v0.1 (HF folder)}
REWARD=${REWARD:?set REWARD=/path/to/exported/reward_model (HF folder)}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
python -m c2f_jax.train --config configs/coarse.py --workdir "$WORKDIR" \
  --config.model.base="$BASE" --config.reward_model.path="$REWARD" \
  --config.mesh.data=1 --config.mesh.fsdp=8 --config.mesh.tensor=1 --config.data.batch_size=32 "$@"
