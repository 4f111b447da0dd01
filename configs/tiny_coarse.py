"""The embedded demo: a tiny Coarse Actor on the bundled sample with the real Mistral v0.1 tokenizer.

Trains its tiny reward model first (no reward_model.path), then PPO with Continuous
Maximization over short length buckets. A few minutes on 2 CPU cores.
"""

import coarse  # the config files beside this one (c2f_jax.train puts their folder on the import path)
import tiny_reward


def get_config():
    c = coarse.get_config()
    c.steps = 48
    c.checkpoint_every = 8
    # "tiny" + pretrain_steps: a random tiny Mistral taught the bundled dialogues first (WORKDIR/base_model),
    # standing in for a pretrained base; the reward model and the actor both start from it.
    c.model.update(base="tiny", pretrain_steps=150, compute_dtype="float32", reference_dtype="float32", remat="none")
    c.reward_model.update(path="", dtype="float32", train=tiny_reward.get_config())
    c.data.update(source="bundled", data_dir="", prompt_buckets=(96, 128), batch_size=16)
    c.mesh.update(data=1, fsdp=1, tensor=1)
    # The actor's lr sets how far one iteration moves the policy: at 2e-3 the first Adam step moved every weight
    # of this d=64 model by ~10% (approx_kl 6.7); at 1e-4 it stays near PPO's usual 0.01-0.05. The KL
    # coefficient adapts towards kl_target nats per token (Ziegler et al.); the paper's config keeps it fixed.
    c.ppo.update(minibatches=2, epochs=2, kl_coef=0.05, kl_target=0.3, kl_horizon=200)
    c.ppo.actor.update(lr=1e-4, warmup_steps=0)
    c.ppo.critic.update(lr=1e-3, warmup_steps=0)
    c.cm.update(buckets=(8, 16, 24, 32), window=6, min_steps=8)
    return c
