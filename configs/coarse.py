"""Coarse Actor PPO on Mistral-7B v0.1 with Continuous Maximization: the paper's settings, 16 A100s.

  python -m c2f_jax.train --config configs/coarse.py --workdir runs/coarse \
      --config.model.base=/models/Mistral-7B-v0.1 --config.reward_model.path=runs/reward-hf
"""

import ml_collections

from c2f_jax.model.tokenizer import COARSE_SYSTEM_PROMPT


def get_config():
    c = ml_collections.ConfigDict()
    c.job = "coarse"
    c.seed = 0
    c.steps = 2000
    c.checkpoint_every = 50
    c.keep_checkpoints = 3
    c.model = dict(
        base="models/Mistral-7B-v0.1",  # an HF folder (safetensors), or the preset "tiny"
        param_dtype="float32",  # master weights: bf16 cannot hold updates at lr 5e-7
        compute_dtype="bfloat16",
        reference_dtype="bfloat16",
        remat="dots",
    )
    # An HF MistralForSequenceClassification folder (c2f-export of a reward run). The tiny demo
    # instead gives no path and a reward job config as reward_model.train, run first in WORKDIR/reward_run.
    c.reward_model = dict(path="runs/reward-hf", dtype="bfloat16")
    c.data = dict(
        source="Anthropic/hh-rlhf",  # or a local .jsonl/.json/.parquet, or "bundled"
        data_dir="helpful-base",
        split="train",
        system_prompt=COARSE_SYSTEM_PROMPT,
        prompt_buckets=(256, 512),
        truncate_prompts=True,  # keep the end of longer dialogues
        batch_size=64,
    )
    c.mesh = dict(data=1, fsdp=16, tensor=1)
    c.rollout = dict(temperature=1.0, top_k=0, top_p=1.0, suppress_stop_tokens=True)  # SamplingConfig's fields
    # PPOConfig's fields; actor and critic are OptimConfig's (AdamW, the paper's learning rates). kl_target > 0
    # (nats per response token) makes kl_coef adaptive (Ziegler et al. 2019); 0 keeps it fixed, as the paper's.
    c.ppo = dict(
        kl_coef=0.05,
        kl_estimator="k1",
        kl_target=0.0,
        kl_horizon=10000,
        reward_clip=5.0,
        gamma=0.95,
        lam=0.95,
        clip_ratio=0.2,
        value_clip=0.2,
        epochs=1,
        minibatches=4,
        actor=dict(lr=5e-6, warmup_steps=10, decay_steps=0, max_grad_norm=1.0, weight_decay=0.0),
        critic=dict(lr=5e-7, warmup_steps=10, decay_steps=0, max_grad_norm=1.0, weight_decay=0.0),
    )
    c.cm = dict(
        mode="logistic",
        buckets=(128, 256, 512, 768, 1024),
        window=8,
        min_steps=20,
        threshold=0.5,
        bias=3.0,
        w_drop=2.0,
        w_rise=0.5,
        w_critic=4.0,
    )
    return c
