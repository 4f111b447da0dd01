"""Reward model on Anthropic HH-RLHF pairs, from Mistral-7B v0.1 (it also initialises the PPO critic).

  python -m c2f_jax.train --config configs/reward.py --workdir runs/reward \
      --config.model.base=/models/Mistral-7B-v0.1
  c2f-export --checkpoint runs/reward --out runs/reward-hf
"""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.job = "reward"
    c.seed = 0
    c.steps = 2000
    c.checkpoint_every = 200
    c.keep_checkpoints = 3
    c.eval_every = 200
    c.model = dict(base="models/Mistral-7B-v0.1", param_dtype="float32", compute_dtype="bfloat16", remat="dots")
    c.data = dict(
        source="Anthropic/hh-rlhf",
        data_dir="helpful-base",
        split="train",
        system_prompt="",
        seq_buckets=(512, 1024),
        eval_fraction=0.02,
        batch_size=64,
    )
    c.optim = dict(lr=9e-6, warmup_steps=50, decay_steps=0, weight_decay=0.1, max_grad_norm=1.0)
    c.mesh = dict(data=1, fsdp=16, tensor=1)
    c.rollout = dict(temperature=1.0)  # unused by this job; every config carries the same top-level keys
    return c
