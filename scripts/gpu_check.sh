#!/usr/bin/env bash
# The GPU checks, as one script for a short lease on one card (H100/H200 with JAX + CUDA and torch installed):
#   1. the rollout benchmark at the ~1B size (16 layers, width 2048) against transformers on the same card, with the
#      fraction of the memory-bandwidth bound;
#   2. the PPO iteration benchmark (ours vs the PyTorch loop, both on the card) with the MFU of scoring + update;
#   3. the model parity tests on the GPU at full float32 precision.
# Writes logs to $OUT (or ./gpu_out); every step has its own time limit so a slow one cannot eat the rest.
#   bash scripts/gpu_check.sh [PEAK_TFLOPS]     # PEAK_TFLOPS: dense TF32 peak for the MFU column (H100 SXM: 495)
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
PEAK=${1:-495}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# torch and JAX share the card in one process: no 75% up-front grab by JAX.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
PY=${PYTHON:-python3}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
$PY -c "import jax, flax, optax, torch, transformers; print('jax', jax.__version__, jax.devices(), '| flax', \
flax.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"

timeout 180 $PY benchmarks/bench_rollout.py --sizes 8x512,16x2048 --batch 64 --new-tokens 512 --dtype bfloat16 \
  --hf-device cuda --repeats 2 2>&1 | grep -v "Loading weights" | tee "$OUT/rollout.md"

timeout 100 $PY benchmarks/bench_ppo.py --sizes 8x512 --torch-device cuda --peak-tflops "$PEAK" \
  --iterations 2 2>&1 | grep -v "Loading weights" | tee "$OUT/ppo.md"
# ~1B: without remat our update's temporaries (35 GB) do not fit beside the torch side in one process.
timeout 200 $PY benchmarks/bench_ppo.py --sizes 16x2048 --torch-device cuda --peak-tflops "$PEAK" --remat full \
  --iterations 2 2>&1 | grep -v "Loading weights" | tee "$OUT/ppo_1b.md"

JAX_PLATFORMS=cuda JAX_DEFAULT_MATMUL_PRECISION=highest timeout 80 $PY -m pytest -q -x tests/test_model.py \
  -p no:cacheprovider 2>&1 | tail -5 | tee "$OUT/tests.txt"

echo; echo "=== summary ==="; cat "$OUT/gpu.txt" "$OUT/rollout.md" "$OUT/ppo.md" "$OUT/ppo_1b.md" "$OUT/tests.txt"
