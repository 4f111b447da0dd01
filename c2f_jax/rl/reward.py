"""The reward model: a Mistral backbone with a scalar head, trained on preference pairs (Bradley-Terry).

It exports as HF `MistralForSequenceClassification` (`score.weight`) and reads its
score at each sequence's last real token, as HF does. The PPO critic starts
from it, as DeepSpeed-Chat and OpenRLHF do.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from c2f_jax.model import model
from c2f_jax.model.model import MistralConfig, Params
from c2f_jax.rl import optim


def init_from_base(config: MistralConfig, params: Params, rng: jax.Array) -> tuple[MistralConfig, Params]:
    """Backbone from a causal LM, a fresh scalar head `score` [D, 1] (normal, std 1/sqrt(D)/10: near-zero rewards)."""
    rm_config = config.replace(architecture=model.SEQ_CLS, num_labels=1)
    rm_params = {k: v for k, v in params.items() if k != "lm_head"}
    std = 0.1 / config.hidden_size**0.5
    rm_params["score"] = (std * jax.random.normal(rng, (config.hidden_size, 1))).astype(config.param_dtype)
    return rm_config, rm_params


@functools.partial(jax.jit, static_argnames=("config",))
def score_sequences(params: Params, seq_ids, seq_mask, *, config: MistralConfig) -> jax.Array:
    """Reward-model score at each left-padded sequence's last real token: seq_ids, seq_mask int32 [B, T] ->
    float32 [B] (the coarse job's rollouts, the evaluation's responses)."""
    return model.sequence_scores(config, params, seq_ids, seq_mask)[:, 0]


def pair_scores(config: MistralConfig, params: Params, batch: dict) -> tuple[jax.Array, jax.Array]:
    """Rewards float32 [B] of chosen and rejected, in one forward pass over [2B, T]."""
    ids = jnp.concatenate([batch["chosen_ids"], batch["rejected_ids"]])
    mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]])
    scores = score_sequences(params, ids, mask, config=config)
    n = batch["chosen_ids"].shape[0]
    return scores[:n], scores[n:]


def bradley_terry(chosen: jax.Array, rejected: jax.Array) -> dict:
    """loss = mean(-log sigmoid(r_chosen - r_rejected)); accuracy = share with r_chosen > r_rejected; mean margin."""
    margin = chosen - rejected
    return {
        "loss": -jnp.mean(jax.nn.log_sigmoid(margin)),
        "accuracy": jnp.mean((margin > 0).astype(jnp.float32)),
        "margin": jnp.mean(margin),
    }


def train(
    state: optim.TrainState, batch: dict, *, config: MistralConfig, optim_config: optim.OptimConfig
) -> tuple[optim.TrainState, dict]:
    """One AdamW step on the Bradley-Terry loss; batch holds int32 [B, T] chosen/rejected ids and masks."""

    def loss_fn(params):
        metrics = bradley_terry(*pair_scores(config, params, batch))
        return metrics["loss"], metrics

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state, info = optim.apply_gradients(state, grads, loss, optim_config)
    return state, {**metrics, "grad_norm": info["grad_norm"], "skipped": state.skipped}


def margins(params: Params, batch: dict, *, config: MistralConfig) -> jax.Array:
    """r_chosen - r_rejected per pair, float32 [B] (for exact held-out averages over padded batches)."""
    chosen, rejected = pair_scores(config, params, batch)
    return chosen - rejected
