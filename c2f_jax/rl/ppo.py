"""PPO for the Coarse Actor: experience from a rollout, KL-shaped rewards, GAE, and one compiled update.

Four roles: the actor (trained, LM head), the frozen reference (same definition,
initial weights), the critic (trained, scalar head, starts from the reward
model) and the frozen reward model. Shapes are static: prompts [B, P] with P a
prompt bucket, responses [B, R] with R the current CM length bucket.

Per-token reward (as in InstructGPT / DeepSpeed-Chat):
    r_t = -kl_coef * KL_t  (+ clip(score, -reward_clip, reward_clip) on the last response token)

Logprobs (actor, old, reference) are those of the distribution the sampler draws
from: at its temperature, with the tokens it suppresses removed and the rest
renormalised. With gamma = lam = 1 and the k1 estimator the expected return is
then exactly E[score] - kl_coef * KL(pi || pi_ref) over whole responses, the
objective whose optimum is pi_ref * exp(score / kl_coef) (tests/test_optimum.py).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from c2f_jax.model import model
from c2f_jax.model.model import MistralConfig, Params
from c2f_jax.model.sharding import BATCH, shard_as
from c2f_jax.rl import optim

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
    suppress_token_ids: tuple[int, ...] = ()  # ... and without the tokens the sampler never draws
    # Adaptive KL coefficient (Ziegler et al. 2019): kl_target > 0 steers the per-token KL to it, kl_coef is then
    # only the starting value. 0 keeps kl_coef fixed (the paper's config).
    kl_target: float = 0.0
    kl_horizon: int = 10000
    actor: optim.OptimConfig = optim.OptimConfig(lr=5e-6, warmup_steps=10)
    critic: optim.OptimConfig = optim.OptimConfig(lr=5e-7, warmup_steps=10)

    def __post_init__(self):
        if self.kl_estimator not in KL_ESTIMATORS:
            raise PPOError(f"kl_estimator={self.kl_estimator!r}; expected one of {KL_ESTIMATORS}")
        if self.epochs < 1 or self.minibatches < 1:
            raise PPOError(f"epochs={self.epochs} and minibatches={self.minibatches} must be >= 1")
        if self.temperature <= 0:
            raise PPOError(f"temperature={self.temperature} must be > 0 (greedy rollouts have no policy ratio)")
        for name, ok, rule in (
            ("kl_coef", self.kl_coef >= 0, ">= 0"),
            ("reward_clip", self.reward_clip > 0, "> 0"),
            ("gamma", 0 <= self.gamma <= 1, "in [0, 1]"),
            ("lam", 0 <= self.lam <= 1, "in [0, 1]"),
            ("clip_ratio", self.clip_ratio > 0, "> 0"),
            ("value_clip", self.value_clip > 0, "> 0"),
            ("kl_target", self.kl_target >= 0, ">= 0 (0: a fixed kl_coef)"),
            ("kl_horizon", self.kl_horizon >= 1, ">= 1"),
        ):
            if not ok:
                raise PPOError(f"{name}={getattr(self, name)!r} must be {rule}")
        if self.kl_target and not self.kl_coef:
            raise PPOError(
                f"kl_coef=0 with kl_target={self.kl_target}: the adaptive coefficient scales kl_coef, "
                "so it must start > 0"
            )


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


def gae(
    rewards: jax.Array, values: jax.Array, mask: jax.Array, gamma: float = 0.95, lam: float = 0.95
) -> tuple[jax.Array, jax.Array]:
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


def response_logprobs(
    config: MistralConfig,
    params: Params,
    seq_ids,
    seq_mask,
    response_len: int,
    temperature: float = 1.0,
    suppress: tuple[int, ...] = (),
) -> tuple[jax.Array, jax.Array]:
    """(logprob of each response token, entropy of the policy there), float32 [B, R].

    Position P-1+t predicts response token t, so the logits used are [:, P-1:-1].
    The policy is the sampler's: logits / temperature with the `suppress` ids removed.
    The entropy is a metric: no gradient flows through it.
    """
    # The LM head only where response tokens are predicted: [B, R, V] logits, not [B, P+R, V].
    hidden = model.hidden_states(config, params, seq_ids, seq_mask)[:, -response_len - 1 : -1]  # [B, R, D]
    logp, entropy = token_logprobs(
        hidden, model.head_weight(config, params), seq_ids[:, -response_len:], temperature, suppress
    )
    return logp, jax.lax.stop_gradient(entropy)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def token_logprobs(
    hidden, head, tokens, temperature: float = 1.0, suppress: tuple[int, ...] = ()
) -> tuple[jax.Array, jax.Array]:
    """(log softmax(hidden @ head / temperature) at tokens, entropy), float32 [B, R].

    hidden [B, R, D], head [D, V], tokens int [B, R]; the `suppress` ids (static) get
    probability 0, as the sampler never draws them. One pass over the [B, R, V]
    logits serves logsumexp, the token's logit and the entropy, and the backward pass
    is written out: d logits = g * (onehot(token) - softmax) / temperature in one
    fused elementwise op, then the two head matmuls. Left to autodiff, XLA:CPU
    re-evaluated the softmax for each consumer, scattered the token's gradient into a
    zeroed [B, R, V] buffer (or, gathering the token's column of the head instead,
    into a zeroed [V, D] one) and copied d logits into a transposed [V, B*R] layout
    for the head's weight gradient. The entropy gets no gradient.
    """
    return _token_logprobs_fwd(hidden, head, tokens, temperature, suppress)[0]


def _token_logprobs_fwd(hidden, head, tokens, temperature, suppress):
    logits = jnp.einsum("BRD,DV->BRV", hidden, head, preferred_element_type=jnp.float32) / temperature
    if suppress:  # -inf where the sampler suppresses; exp() makes them exact zeros below
        logits = logits.at[..., jnp.asarray(suppress)].set(-jnp.inf)
    top = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    exp = jnp.exp(logits - top)
    total = jnp.sum(exp, axis=-1, keepdims=True)
    lse = (top + jnp.log(total))[..., 0]
    token_logit = jnp.take_along_axis(logits, tokens[..., None], axis=-1)[..., 0]
    weighted = exp * logits if not suppress else jnp.where(exp > 0, exp * logits, 0.0)  # 0 * -inf is nan
    entropy = lse - jnp.sum(weighted, axis=-1) / total[..., 0]
    return (token_logit - lse, entropy), (hidden, head, tokens, exp, total)


def _token_logprobs_bwd(temperature, suppress, res, cotangents):
    hidden, head, tokens, exp, total = res
    g = cotangents[0][..., None] / temperature  # [B, R, 1]; the entropy's cotangent is dropped
    onehot = jnp.arange(exp.shape[-1], dtype=tokens.dtype) == tokens[..., None]
    d_logits = jnp.where(onehot, g, 0.0) - g * (exp / total)  # [B, R, V]; 0 at suppressed ids (exp is 0 there)
    d_hidden = jnp.einsum("BRV,DV->BRD", d_logits, head).astype(hidden.dtype)
    d_head = jnp.einsum("BRD,BRV->DV", hidden, d_logits).astype(head.dtype)  # tokens contracted directly: no copy
    return d_hidden, d_head, None


token_logprobs.defvjp(_token_logprobs_fwd, _token_logprobs_bwd)


def response_values(config: MistralConfig, params: Params, seq_ids, seq_mask, response_len: int) -> jax.Array:
    """Critic value of the state before each response token, float32 [B, R]."""
    return model.forward_values(config, params, seq_ids, seq_mask)[:, -response_len - 1 : -1]


def join(prompt_ids, prompt_mask, tokens, response_mask) -> tuple[jax.Array, jax.Array]:
    """Prompt [B, P] + response [B, R] -> seq_ids, seq_mask int32 [B, P+R] (after-EOS tokens masked out)."""
    return (
        jnp.concatenate([prompt_ids, tokens], axis=1).astype(jnp.int32),
        jnp.concatenate([prompt_mask, response_mask], axis=1).astype(jnp.int32),
    )


def policy_logprobs(
    config: MistralConfig, params: Params, seq_ids, seq_mask, response_len: int, ppo: PPOConfig
) -> tuple[jax.Array, jax.Array]:
    """`response_logprobs` under the sampler's policy as `ppo` records it (temperature, suppressed ids)."""
    return response_logprobs(config, params, seq_ids, seq_mask, response_len, ppo.temperature, ppo.suppress_token_ids)


def scored_experience(seq_ids, seq_mask, response_mask, old, ref, values, score, kl_coef, ppo: PPOConfig) -> Experience:
    """Shaped rewards, GAE and whitened advantages from the forward passes' outputs."""
    mask = response_mask.astype(jnp.float32)
    kl_coef = ppo.kl_coef if kl_coef is None else kl_coef
    rewards = shaped_rewards(kl_penalty(old, ref, ppo.kl_estimator), score, mask, kl_coef, ppo.reward_clip)
    advantages, returns = gae(rewards, values, mask, ppo.gamma, ppo.lam)
    return Experience(
        seq_ids,
        seq_mask,
        mask,
        old * mask,
        ref * mask,
        values * mask,
        rewards,
        whiten(advantages, mask),
        returns,
        score,
    )


def experience_metrics(exp: Experience) -> dict:
    """What an RL engineer reads off a scored batch, float32 scalars: the KL to the reference per token and per
    response (k1, the sampled-token estimate), the raw advantage (returns - values, before whitening) and
    return means and spreads, and the critic's explained variance 1 - Var(returns - values) / Var(returns)."""
    mask = exp.response_mask
    kl = (exp.old_logprobs - exp.ref_logprobs) * mask
    advantages = (exp.returns - exp.values) * mask

    def spread(x):
        return jnp.sqrt(masked_mean((x - masked_mean(x, mask)) ** 2, mask))

    return {
        "kl": masked_mean(kl, mask),
        "kl/per_response": jnp.mean(jnp.sum(kl, axis=-1)),
        "advantages/mean": masked_mean(advantages, mask),
        "advantages/std": spread(advantages),
        "returns/mean": masked_mean(exp.returns, mask),
        "returns/std": spread(exp.returns),
        "value/explained_variance": 1.0 - spread(advantages) ** 2 / jnp.maximum(spread(exp.returns) ** 2, 1e-12),
    }


def adapt_kl_coef(kl_coef: float, kl_per_token: float, batch: int, ppo: PPOConfig) -> float:
    """The next KL coefficient (host floats). Fixed unless ppo.kl_target > 0; then Ziegler et al.'s proportional
    controller: coef * (1 + clip(kl / target - 1, -0.2, 0.2) * batch / horizon). The target is per token, not per
    response as in Ziegler's fixed-length setting: CM changes the response length, the per-token KL stays comparable."""
    if not ppo.kl_target:
        return kl_coef
    error = min(max(kl_per_token / ppo.kl_target - 1.0, -0.2), 0.2)
    return kl_coef * (1.0 + error * batch / ppo.kl_horizon)


# ----------------------------------------------------------------------------- the update


def minibatch_size(batch: int, minibatches: int, names: tuple[str, str] = ("batch", "minibatches")) -> int:
    """Rows per PPO minibatch; a PPOError (naming the two values as `names`) when the batch does not split evenly."""
    if batch % minibatches:
        raise PPOError(f"{names[0]}={batch} does not split into {names[1]}={minibatches} equal minibatches")
    return batch // minibatches


def epoch_orders(rng: jax.Array, batch: int, epochs: int) -> jax.Array:
    """Each epoch's own shuffled order of the batch's rows, int32 [epochs, batch]: drawn once per iteration."""
    return jnp.stack([jax.random.permutation(key, batch) for key in jax.random.split(rng, epochs)])


def _split(tree, count: int):
    """Rows [N, ...] -> [count, N / count, ...], each minibatch spread over the data axes (a scan's input)."""
    return jax.tree.map(lambda x: shard_as(x.reshape(count, -1, *x.shape[1:]), None, BATCH), tree)


def _actor_forward(config: MistralConfig, params: Params, seq_ids, seq_mask, response_len: int, ppo: PPOConfig):
    """`policy_logprobs` kept for its backward pass: (logprobs, pullback of their cotangent to params, entropy)."""
    return jax.vjp(lambda p: policy_logprobs(config, p, seq_ids, seq_mask, response_len, ppo), params, has_aux=True)


def _critic_forward(config: MistralConfig, params: Params, seq_ids, seq_mask, response_len: int):
    """`response_values` kept for its backward pass: (values, pullback of their cotangent to params)."""
    return jax.vjp(lambda p: response_values(config, p, seq_ids, seq_mask, response_len), params)


# Metrics reduced over minibatches by their maximum; every other one by the mean.
MAX_METRICS = ("ratio/max",)


def _forwards(states, mb: Experience, *, actor_config, critic_config, ppo: PPOConfig) -> tuple:
    """Both models' forward passes on a minibatch at the states' params, kept for their backward passes."""
    R = mb.response_mask.shape[1]
    return (
        _actor_forward(actor_config, states[0].params, mb.seq_ids, mb.seq_mask, R, ppo),
        _critic_forward(critic_config, states[1].params, mb.seq_ids, mb.seq_mask, R),
    )


def _minibatch_step(states, mb: Experience, forwards, *, ppo: PPOConfig):
    """Both AdamW steps on one minibatch, and its metrics. Each model's gradient is its loss's gradient at the
    model's outputs, pulled back through its forward pass (`forwards`, from `_forwards`)."""
    (actor_state, critic_state), ((logp, actor_pullback, entropy), (values, critic_pullback)) = states, forwards
    (p_loss, info), d_logp = jax.value_and_grad(policy_loss, has_aux=True)(
        logp, mb.old_logprobs, mb.advantages, mb.response_mask, ppo.clip_ratio
    )
    actor_state, a_info = optim.apply_gradients(actor_state, actor_pullback(d_logp)[0], p_loss, ppo.actor)
    v_loss, d_values = jax.value_and_grad(value_loss)(values, mb.values, mb.returns, mb.response_mask, ppo.value_clip)
    critic_state, c_info = optim.apply_gradients(critic_state, critic_pullback(d_values)[0], v_loss, ppo.critic)

    ratio = jnp.where(mb.response_mask > 0, jnp.exp(logp - mb.old_logprobs), 0.0)
    metrics = {
        "loss/policy": p_loss,
        "loss/value": v_loss,
        "clipfrac": info["clipfrac"],
        "approx_kl": info["approx_kl"],
        "ratio/max": jnp.max(ratio),
        "entropy": masked_mean(entropy, mb.response_mask),
        "grad_norm/actor": a_info["grad_norm"],
        "grad_norm/critic": c_info["grad_norm"],
    }
    return (actor_state, critic_state), metrics


def update(
    actor_state: optim.TrainState,
    critic_state: optim.TrainState,
    exp: Experience,
    orders: jax.Array,
    *,
    actor_config: MistralConfig,
    critic_config: MistralConfig,
    ppo: PPOConfig,
    first_forwards=None,
) -> tuple[optim.TrainState, optim.TrainState, dict]:
    """`ppo.epochs` passes over the experience in `ppo.minibatches` minibatches, one program.

    orders: int32 [epochs, B], each epoch's order of the rows (`epoch_orders`). Actor and critic step with
    their own AdamW each minibatch; a non-finite loss or gradient skips that model's step. The first
    minibatch steps on `first_forwards`, its forward passes at the states' params when the caller has them
    (`iteration` keeps those of its scoring), else run here; every later one runs its own. Returns the new
    states and metrics over all minibatches (the mean; the maximum for MAX_METRICS).
    """
    minibatch_size(exp.seq_ids.shape[0], ppo.minibatches)  # a PPOError when the batch does not split evenly
    # Every epoch's minibatches in turn: [epochs * minibatches, B / minibatches, ...].
    minibatches = _split(jax.tree.map(lambda x: x[orders.reshape(-1)], exp), ppo.epochs * ppo.minibatches)
    forwards = functools.partial(_forwards, actor_config=actor_config, critic_config=critic_config, ppo=ppo)
    step = functools.partial(_minibatch_step, ppo=ppo)
    first, later = jax.tree.map(lambda x: x[0], minibatches), jax.tree.map(lambda x: x[1:], minibatches)
    states = (actor_state, critic_state)
    states, first_metrics = step(states, first, first_forwards or forwards(states, first))
    states, later_metrics = jax.lax.scan(lambda s, mb: step(s, mb, forwards(s, mb)), states, later)
    reduced = {
        k: (jnp.max if k in MAX_METRICS else jnp.mean)(jnp.concatenate([first_metrics[k][None], later_metrics[k]]))
        for k in first_metrics
    }
    return *states, reduced


def iteration(
    actor_state: optim.TrainState,
    critic_state: optim.TrainState,
    reference: Params,
    seq_ids,
    seq_mask,
    response_mask,
    score,
    rng: jax.Array,
    kl_coef=None,
    *,
    actor_config: MistralConfig,
    ref_config: MistralConfig,
    critic_config: MistralConfig,
    ppo: PPOConfig,
) -> tuple[optim.TrainState, optim.TrainState, Experience, dict]:
    """One PPO iteration as one program: score the rollout (old and reference logprobs, values, shaped rewards,
    whitened advantages, returns: `scored_experience`), then `update`.

    seq_ids, seq_mask int32 [B, P+R]; response_mask int32 [B, R]; score float32 [B] from the reward model;
    kl_coef float32 [] (default ppo.kl_coef). The epoch orders are drawn here, once. The first minibatch of
    the first epoch is scored and then stepped with the very same params, so its scoring forward passes are
    kept (`jax.vjp`) and its step pulls the gradients back through them instead of running them again: with
    whole-batch PPO a whole actor and a whole critic forward pass fewer, with M minibatches 1/M of one (the
    test counts XLA's FLOPs; the 7B plan's memory cost is in the README). Returns the new states, the
    experience, and the update's metrics with `experience_metrics`.
    """
    B, R = response_mask.shape
    size = minibatch_size(B, ppo.minibatches)
    orders = epoch_orders(rng, B, ppo.epochs)
    first, rest = orders[0, :size], orders[0, size:]  # the first minibatch's rows, and the others'

    def take(rows):  # those rows, spread over the data axes (as `update` places a minibatch)
        return shard_as(seq_ids[rows], BATCH, None), shard_as(seq_mask[rows], BATCH, None)

    actor_first = _actor_forward(actor_config, actor_state.params, *take(first), R, ppo)
    critic_first = _critic_forward(critic_config, critic_state.params, *take(first), R)
    old, values = actor_first[0], critic_first[0]
    if size < B:
        old = jnp.concatenate([old, policy_logprobs(actor_config, actor_state.params, *take(rest), R, ppo)[0]])
        values = jnp.concatenate([values, response_values(critic_config, critic_state.params, *take(rest), R)])
    in_order = jnp.argsort(orders[0])  # rows [first, rest] back to input order
    ref, _ = policy_logprobs(ref_config, reference, seq_ids, seq_mask, R, ppo)
    exp = scored_experience(seq_ids, seq_mask, response_mask, old[in_order], ref, values[in_order], score, kl_coef, ppo)
    actor_state, critic_state, metrics = update(
        actor_state,
        critic_state,
        exp,
        orders,
        actor_config=actor_config,
        critic_config=critic_config,
        ppo=ppo,
        first_forwards=(actor_first, critic_first),
    )
    return actor_state, critic_state, exp, {**metrics, **experience_metrics(exp)}
