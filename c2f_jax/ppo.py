"""PPO for the Coarse Actor: experience from a rollout, KL-shaped rewards, GAE, and one compiled update.

Four roles: the actor (trained, LM head), the frozen reference (same definition,
initial weights), the critic (trained, scalar head, starts from the reward
model) and the frozen reward model. Shapes are static: prompts [B, P] with P a
prompt bucket, responses [B, R] with R the current CM length bucket.

Per-token reward (as in InstructGPT / DeepSpeed-Chat):
    r_t = -kl_coef * KL_t  (+ clip(score, -reward_clip, reward_clip) on the last response token)
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from c2f_jax import model, optim
from c2f_jax.model import MistralConfig, Params
from c2f_jax.sharding import BATCH, shard_as

KL_ESTIMATORS = ("k1", "k3")


class PPOError(ValueError):
    """A PPO setting or batch shape the update cannot run."""


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """Hyperparameters; defaults are the paper's where it gives them (clip 0.2, gamma 0.95, lrs)."""

    kl_coef: float = 0.05
    kl_estimator: str = "k1"
    reward_clip: float = 5.0
    gamma: float = 0.95
    lam: float = 0.95
    clip_ratio: float = 0.2
    value_clip: float = 0.2
    epochs: int = 1
    minibatches: int = 1
    temperature: float = 1.0  # logprobs are taken at the sampling temperature
    actor: optim.OptimConfig = optim.OptimConfig(lr=5e-6, warmup_steps=10)
    critic: optim.OptimConfig = optim.OptimConfig(lr=5e-7, warmup_steps=10)

    def __post_init__(self):
        if self.kl_estimator not in KL_ESTIMATORS:
            raise PPOError(f"kl_estimator={self.kl_estimator!r}; expected one of {KL_ESTIMATORS}")
        if self.epochs < 1 or self.minibatches < 1:
            raise PPOError(f"epochs={self.epochs} and minibatches={self.minibatches} must be >= 1")
        if self.temperature <= 0:
            raise PPOError(f"temperature={self.temperature} must be > 0 (greedy rollouts have no policy ratio)")
        for name, ok, rule in (("kl_coef", self.kl_coef >= 0, ">= 0"), ("reward_clip", self.reward_clip > 0, "> 0"),
                               ("gamma", 0 <= self.gamma <= 1, "in [0, 1]"), ("lam", 0 <= self.lam <= 1, "in [0, 1]"),
                               ("clip_ratio", self.clip_ratio > 0, "> 0"), ("value_clip", self.value_clip > 0, "> 0")):
            if not ok:
                raise PPOError(f"{name}={getattr(self, name)!r} must be {rule}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Experience:
    """One rollout, scored. seq_ids/seq_mask int32 [B, P+R]; the rest float32 [B, R] except score [B]."""

    seq_ids: jax.Array
    seq_mask: jax.Array
    response_mask: jax.Array
    old_logprobs: jax.Array
    ref_logprobs: jax.Array
    values: jax.Array
    rewards: jax.Array
    advantages: jax.Array
    returns: jax.Array
    score: jax.Array


# ----------------------------------------------------------------------------- pure pieces


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def whiten(x: jax.Array, mask: jax.Array, eps: float = 1e-8) -> jax.Array:
    """(x - mean) / std over the valid entries; invalid entries come out 0."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * jax.lax.rsqrt(var + eps) * mask


def kl_penalty(logprobs: jax.Array, ref_logprobs: jax.Array, estimator: str = "k1") -> jax.Array:
    """Per-token KL(actor || reference) estimate from sampled-token logprobs [B, R].

    k1 = log p - log q (unbiased, can be negative); k3 = exp(q - p) - 1 - (q - p) (>= 0, lower variance).
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    return jnp.expm1(-log_ratio) + log_ratio


def shaped_rewards(kl: jax.Array, score: jax.Array, mask: jax.Array, kl_coef: float, reward_clip: float) -> jax.Array:
    """-kl_coef * KL on every valid token, plus the clipped score on the last valid one. float32 [B, R]."""
    last = jnp.sum(mask, axis=-1).astype(jnp.int32) - 1  # mask is a prefix of each row
    at_last = jax.nn.one_hot(last, mask.shape[-1], dtype=jnp.float32)
    return (-kl_coef * kl + at_last * jnp.clip(score, -reward_clip, reward_clip)[:, None]) * mask


def gae(rewards: jax.Array, values: jax.Array, mask: jax.Array, gamma: float = 0.95,
        lam: float = 0.95) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation over float32 [B, R]; mask marks valid tokens (a prefix of each row).

    The value after the last valid token is 0 (the episode ends there). Returns
    (advantages, returns = advantages + values), both 0 on invalid tokens.
    """
    values = values * mask
    next_values = jnp.concatenate([values[:, 1:], jnp.zeros_like(values[:, :1])], axis=1)
    deltas = rewards + gamma * next_values - values

    def back(carry, x):
        delta, m = x
        adv = (delta + gamma * lam * carry) * m
        return adv, adv

    _, adv = jax.lax.scan(back, jnp.zeros(rewards.shape[0], rewards.dtype), (deltas.T, mask.T), reverse=True)
    adv = adv.T
    return adv, (adv + values) * mask


def policy_loss(logprobs, old_logprobs, advantages, mask, clip_ratio: float) -> tuple[jax.Array, dict]:
    """Clipped surrogate: mean over valid tokens of max(-A * ratio, -A * clip(ratio, 1 - c, 1 + c))."""
    ratio = jnp.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1 - clip_ratio, 1 + clip_ratio)
    loss = masked_mean(jnp.maximum(unclipped, clipped), mask)
    return loss, {
        "clipfrac": masked_mean((clipped > unclipped).astype(jnp.float32), mask),
        "approx_kl": masked_mean(0.5 * (logprobs - old_logprobs) ** 2, mask),
    }


def value_loss(values, old_values, returns, mask, value_clip: float) -> jax.Array:
    """0.5 * mean over valid tokens of max((v - R)^2, (v_clipped - R)^2), v_clipped within +-c of the old value."""
    clipped = old_values + jnp.clip(values - old_values, -value_clip, value_clip)
    return 0.5 * masked_mean(jnp.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


# ----------------------------------------------------------------------------- forward passes


def response_logprobs(config: MistralConfig, params: Params, seq_ids, seq_mask, response_len: int,
                      temperature: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """(logprob of each response token, entropy of the policy there), float32 [B, R].

    Position P-1+t predicts response token t, so the logits used are [:, P-1:-1].
    The entropy is a metric: no gradient flows through it.
    """
    # The LM head only where response tokens are predicted: [B, R, V] logits, not [B, P+R, V].
    hidden = model.hidden_states(config, params, seq_ids, seq_mask)[:, -response_len - 1:-1]  # [B, R, D]
    logp, entropy = token_logprobs(hidden, model.head_weight(config, params), seq_ids[:, -response_len:], temperature)
    return logp, jax.lax.stop_gradient(entropy)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def token_logprobs(hidden, head, tokens, temperature: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """(log softmax(hidden @ head / temperature) at tokens, entropy), float32 [B, R].

    hidden [B, R, D], head [D, V], tokens int [B, R]. One pass over the [B, R, V]
    logits serves logsumexp, the token's logit and the entropy, and the backward pass
    is written out: d logits = g * (onehot(token) - softmax) / temperature in one
    fused elementwise op, then the two head matmuls. Left to autodiff, XLA:CPU
    re-evaluated the softmax for each consumer, scattered the token's gradient into a
    zeroed [B, R, V] buffer (or, gathering the token's column of the head instead,
    into a zeroed [V, D] one) and copied d logits into a transposed [V, B*R] layout
    for the head's weight gradient. The entropy gets no gradient.
    """
    return _token_logprobs_fwd(hidden, head, tokens, temperature)[0]


def _token_logprobs_fwd(hidden, head, tokens, temperature):
    logits = jnp.einsum("BRD,DV->BRV", hidden, head, preferred_element_type=jnp.float32) / temperature
    top = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    exp = jnp.exp(logits - top)
    total = jnp.sum(exp, axis=-1, keepdims=True)
    lse = (top + jnp.log(total))[..., 0]
    token_logit = jnp.take_along_axis(logits, tokens[..., None], axis=-1)[..., 0]
    entropy = lse - jnp.sum(exp * logits, axis=-1) / total[..., 0]
    return (token_logit - lse, entropy), (hidden, head, tokens, exp, total)


def _token_logprobs_bwd(temperature, res, cotangents):
    hidden, head, tokens, exp, total = res
    g = cotangents[0][..., None] / temperature  # [B, R, 1]; the entropy's cotangent is dropped
    onehot = jnp.arange(exp.shape[-1], dtype=tokens.dtype) == tokens[..., None]
    d_logits = jnp.where(onehot, g, 0.0) - g * (exp / total)  # [B, R, V]
    d_hidden = jnp.einsum("BRV,DV->BRD", d_logits, head).astype(hidden.dtype)
    d_head = jnp.einsum("BRD,BRV->DV", hidden, d_logits).astype(head.dtype)  # tokens contracted directly: no copy
    return d_hidden, d_head, None


token_logprobs.defvjp(_token_logprobs_fwd, _token_logprobs_bwd)


def response_values(config: MistralConfig, params: Params, seq_ids, seq_mask, response_len: int) -> jax.Array:
    """Critic value of the state before each response token, float32 [B, R]."""
    return model.forward_values(config, params, seq_ids, seq_mask)[:, -response_len - 1:-1]


def join(prompt_ids, prompt_mask, tokens, response_mask) -> tuple[jax.Array, jax.Array]:
    """Prompt [B, P] + response [B, R] -> seq_ids, seq_mask int32 [B, P+R] (after-EOS tokens masked out)."""
    return (jnp.concatenate([prompt_ids, tokens], axis=1).astype(jnp.int32),
            jnp.concatenate([prompt_mask, response_mask], axis=1).astype(jnp.int32))


@functools.partial(jax.jit, static_argnames=("config",))
def score_sequences(params: Params, seq_ids, seq_mask, *, config: MistralConfig) -> jax.Array:
    """Reward-model score at each sequence's last real token, float32 [B]."""
    return model.sequence_scores(config, params, seq_ids, seq_mask)[:, 0]


def experience(actor: Params, reference: Params, critic: Params, seq_ids, seq_mask, response_mask, score, *,
                    actor_config: MistralConfig, ref_config: MistralConfig, critic_config: MistralConfig,
                    ppo: PPOConfig) -> Experience:
    """Scores a rollout: old and reference logprobs, values, shaped rewards, whitened advantages, returns."""
    R = response_mask.shape[1]
    old, _ = response_logprobs(actor_config, actor, seq_ids, seq_mask, R, ppo.temperature)
    ref, _ = response_logprobs(ref_config, reference, seq_ids, seq_mask, R, ppo.temperature)
    values = response_values(critic_config, critic, seq_ids, seq_mask, R)
    return _scored(seq_ids, seq_mask, response_mask, old, ref, values, score, ppo)


def _scored(seq_ids, seq_mask, response_mask, old, ref, values, score, ppo: PPOConfig) -> Experience:
    """Shaped rewards, GAE and whitened advantages from the forward passes' outputs."""
    mask = response_mask.astype(jnp.float32)
    rewards = shaped_rewards(kl_penalty(old, ref, ppo.kl_estimator), score, mask, ppo.kl_coef, ppo.reward_clip)
    advantages, returns = gae(rewards, values, mask, ppo.gamma, ppo.lam)
    return Experience(seq_ids, seq_mask, mask, old * mask, ref * mask, values * mask, rewards,
                      whiten(advantages, mask), returns, score)


make_experience = jax.jit(experience, static_argnames=("actor_config", "ref_config", "critic_config", "ppo"))


# ----------------------------------------------------------------------------- the update


def minibatch_size(batch: int, minibatches: int, names: tuple[str, str] = ("batch", "minibatches")) -> int:
    """Rows per PPO minibatch; a PPOError (naming the two values as `names`) when the batch does not split evenly."""
    if batch % minibatches:
        raise PPOError(f"{names[0]}={batch} does not split into {names[1]}={minibatches} equal minibatches")
    return batch // minibatches


def _epoch_orders(rng: jax.Array, batch: int, epochs: int) -> jax.Array:
    """Each epoch's own shuffled order of the batch's rows, int32 [epochs, batch]."""
    return jnp.stack([jax.random.permutation(key, batch) for key in jax.random.split(rng, epochs)])


def _split(tree, count: int):
    """Rows [N, ...] -> [count, N / count, ...], each minibatch spread over the data axes (a scan's input)."""
    return jax.tree.map(lambda x: shard_as(x.reshape(count, -1, *x.shape[1:]), None, BATCH), tree)


def _actor_forward(config: MistralConfig, params: Params, seq_ids, seq_mask, response_len: int, temperature: float):
    """`response_logprobs` kept for its backward pass: (logprobs, pullback of their cotangent to params, entropy)."""
    return jax.vjp(lambda p: response_logprobs(config, p, seq_ids, seq_mask, response_len, temperature), params,
                   has_aux=True)


def _critic_forward(config: MistralConfig, params: Params, seq_ids, seq_mask, response_len: int):
    """`response_values` kept for its backward pass: (values, pullback of their cotangent to params)."""
    return jax.vjp(lambda p: response_values(config, p, seq_ids, seq_mask, response_len), params)


def _minibatch_step(states, mb: Experience, *, actor_config, critic_config, ppo: PPOConfig, forwards=None):
    """Both AdamW steps on one minibatch, and its metrics.

    Each model's gradient is its loss's gradient at the model's outputs, pulled back
    through its forward pass. `forwards` (what `_actor_forward` and `_critic_forward`
    return) are those passes when they already ran on these rows at these params;
    otherwise they run here.
    """
    actor_state, critic_state = states
    R = mb.response_mask.shape[1]
    logp, actor_pullback, entropy = (forwards[0] if forwards else _actor_forward(
        actor_config, actor_state.params, mb.seq_ids, mb.seq_mask, R, ppo.temperature))
    (p_loss, info), d_logp = jax.value_and_grad(policy_loss, has_aux=True)(
        logp, mb.old_logprobs, mb.advantages, mb.response_mask, ppo.clip_ratio)
    actor_state, a_info = optim.apply_gradients(actor_state, actor_pullback(d_logp)[0], p_loss, ppo.actor)

    values, critic_pullback = (forwards[1] if forwards else _critic_forward(
        critic_config, critic_state.params, mb.seq_ids, mb.seq_mask, R))
    v_loss, d_values = jax.value_and_grad(value_loss)(values, mb.values, mb.returns, mb.response_mask,
                                                      ppo.value_clip)
    critic_state, c_info = optim.apply_gradients(critic_state, critic_pullback(d_values)[0], v_loss, ppo.critic)

    metrics = {"loss/policy": p_loss, "loss/value": v_loss, "clipfrac": info["clipfrac"],
               "approx_kl": info["approx_kl"], "entropy": masked_mean(entropy, mb.response_mask),
               "grad_norm/actor": a_info["grad_norm"], "grad_norm/critic": c_info["grad_norm"]}
    return (actor_state, critic_state), metrics


def update(actor_state: optim.TrainState, critic_state: optim.TrainState, exp: Experience, rng: jax.Array, *,
           actor_config: MistralConfig, critic_config: MistralConfig, ppo: PPOConfig,
           first_forwards=None) -> tuple[optim.TrainState, optim.TrainState, dict]:
    """`ppo.epochs` passes over the experience in `ppo.minibatches` shuffled minibatches, one program.

    Actor and critic step with their own AdamW each minibatch; a non-finite loss or
    gradient skips that model's step. `first_forwards`: both models' forward passes on
    the first epoch's first minibatch (rows `_epoch_orders(rng, B, ppo.epochs)[0, :B / M]`)
    at the states' params, which that step then reuses (see `iteration`). Returns the
    new states and metrics averaged over all minibatches.
    """
    B = exp.seq_ids.shape[0]
    minibatch_size(B, ppo.minibatches)  # a PPOError when the batch does not split evenly
    orders = _epoch_orders(rng, B, ppo.epochs).reshape(-1)
    # Every epoch's minibatches in turn: [epochs * minibatches, B / minibatches, ...].
    minibatches = _split(jax.tree.map(lambda x: x[orders], exp), ppo.epochs * ppo.minibatches)
    step = functools.partial(_minibatch_step, actor_config=actor_config, critic_config=critic_config, ppo=ppo)
    states, metrics = (actor_state, critic_state), []
    if first_forwards is not None:
        states, first = step(states, jax.tree.map(lambda x: x[0], minibatches), forwards=first_forwards)
        metrics.append(jax.tree.map(lambda x: x[None], first))
        minibatches = jax.tree.map(lambda x: x[1:], minibatches)
    if minibatches.seq_ids.shape[0]:  # none left after the first in whole-batch PPO
        states, rest = jax.lax.scan(step, states, minibatches)
        metrics.append(rest)
    return *states, jax.tree.map(lambda *m: jnp.mean(jnp.concatenate(m)), *metrics)


ppo_update = jax.jit(update, static_argnames=("actor_config", "critic_config", "ppo"), donate_argnums=(0, 1))


def iteration(actor_state: optim.TrainState, critic_state: optim.TrainState, reference: Params, seq_ids, seq_mask,
              response_mask, score, rng: jax.Array, *, actor_config: MistralConfig, ref_config: MistralConfig,
              critic_config: MistralConfig,
              ppo: PPOConfig) -> tuple[optim.TrainState, optim.TrainState, Experience, dict]:
    """`experience` then `update` as one program, with one forward pass of actor and critic fewer.

    The first minibatch of the first epoch is scored and then stepped with the very
    same params, so its scoring forward passes are kept (`jax.vjp`) and `update` pulls
    that step's gradients back through them instead of running them again. With one
    epoch and one minibatch (whole-batch PPO) that is a whole actor and a whole critic
    forward pass of the iteration; with M minibatches, 1/M of one. The kept activations
    of both models' first minibatch are live together while the reference is scored; in
    the 7B plan that costs under 2% more than the update alone. Inputs as `experience`,
    `score` float32 [B] from the reward model; the result (new states, the experience,
    mean metrics) equals `experience` followed by `update` with the same rng up to
    float rounding.
    """
    B, R = response_mask.shape
    size = minibatch_size(B, ppo.minibatches)
    order = _epoch_orders(rng, B, ppo.epochs)[0]  # the first epoch's, as `update` draws it
    first, rest = order[:size], order[size:]

    def take(rows):  # those rows, spread over the data axes (as `update` places a minibatch)
        return shard_as(seq_ids[rows], BATCH, None), shard_as(seq_mask[rows], BATCH, None)

    actor_first = _actor_forward(actor_config, actor_state.params, *take(first), R, ppo.temperature)
    critic_first = _critic_forward(critic_config, critic_state.params, *take(first), R)
    old, values = actor_first[0], critic_first[0]
    if size < B:
        old = jnp.concatenate([old, response_logprobs(actor_config, actor_state.params, *take(rest), R,
                                                      ppo.temperature)[0]])
        values = jnp.concatenate([values, response_values(critic_config, critic_state.params, *take(rest), R)])
    in_order = jnp.argsort(order)  # rows [first, rest] back to input order
    ref, _ = response_logprobs(ref_config, reference, seq_ids, seq_mask, R, ppo.temperature)
    exp = _scored(seq_ids, seq_mask, response_mask, old[in_order], ref, values[in_order], score, ppo)
    actor_state, critic_state, metrics = update(actor_state, critic_state, exp, rng, actor_config=actor_config,
                                                critic_config=critic_config, ppo=ppo,
                                                first_forwards=(actor_first, critic_first))
    return actor_state, critic_state, exp, metrics


ppo_iteration = jax.jit(iteration, static_argnames=("actor_config", "ref_config", "critic_config", "ppo"),
                        donate_argnums=(0, 1))
