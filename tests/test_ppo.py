"""PPO pieces against hand computations, and the compiled update doing what it should."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from c2f_jax.model import model
from c2f_jax.rl import optim, ppo, reward, rollout
from c2f_jax.runtime import backend

ppo_lib = ppo  # for the helpers below, whose PPOConfig argument is named `ppo` as in c2f_jax.rl.ppo


def experience(
    actor,
    reference,
    critic,
    seq_ids,
    seq_mask,
    response_mask,
    score,
    kl_coef=None,
    *,
    actor_config,
    ref_config,
    critic_config,
    ppo,
):
    """The unfused scoring of a rollout (what `ppo.iteration` does before its update), each forward pass whole."""
    R = response_mask.shape[1]
    old, _ = ppo_lib.policy_logprobs(actor_config, actor, seq_ids, seq_mask, R, ppo)
    ref, _ = ppo_lib.policy_logprobs(ref_config, reference, seq_ids, seq_mask, R, ppo)
    values = ppo_lib.response_values(critic_config, critic, seq_ids, seq_mask, R)
    return ppo_lib.scored_experience(seq_ids, seq_mask, response_mask, old, ref, values, score, kl_coef, ppo)


make_experience = jax.jit(experience, static_argnames=("actor_config", "ref_config", "critic_config", "ppo"))
ppo_update = jax.jit(ppo_lib.update, static_argnames=("actor_config", "critic_config", "ppo"), donate_argnums=(0, 1))
ppo_iteration = jax.jit(
    ppo_lib.iteration, static_argnames=("actor_config", "ref_config", "critic_config", "ppo"), donate_argnums=(0, 1)
)


def prefix_mask(rng, batch, length):
    lengths = rng.integers(1, length + 1, batch)
    return (np.arange(length)[None] < lengths[:, None]).astype(np.float32)


def test_gae_matches_a_python_loop():
    rng = np.random.default_rng(0)
    B, R, gamma, lam = 6, 9, 0.95, 0.9
    rewards, values = rng.normal(size=(B, R)), rng.normal(size=(B, R))
    mask = prefix_mask(rng, B, R)
    adv, ret = ppo.gae(jnp.asarray(rewards * mask), jnp.asarray(values), jnp.asarray(mask), gamma, lam)
    for b in range(B):
        n = int(mask[b].sum())
        expected, running = np.zeros(R), 0.0
        for t in reversed(range(n)):
            next_value = values[b, t + 1] if t + 1 < n else 0.0  # nothing after the last valid token
            running = rewards[b, t] + gamma * next_value - values[b, t] + gamma * lam * running
            expected[t] = running
        np.testing.assert_allclose(np.asarray(adv[b]), expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(ret[b, :n]), expected[:n] + values[b, :n], rtol=1e-5, atol=1e-6)
        assert not np.asarray(ret[b, n:]).any()


def test_whiten_over_valid_tokens():
    x = jnp.array([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -7.0, -7.0]])
    mask = jnp.array([[1, 1, 1, 0], [1, 1, 0, 0]], jnp.float32)
    w = ppo.whiten(x, mask)
    valid = np.asarray(w)[np.asarray(mask) > 0]
    assert abs(valid.mean()) < 1e-6 and abs(valid.std() - 1) < 1e-4
    assert not np.asarray(w)[np.asarray(mask) == 0].any()


def test_policy_loss_by_hand():
    logp = jnp.log(jnp.array([[0.6, 0.2, 0.5]]))
    old = jnp.log(jnp.array([[0.4, 0.4, 0.5]]))  # ratios 1.5, 0.5, 1.0
    adv = jnp.array([[1.0, -2.0, 3.0]])
    mask = jnp.array([[1.0, 1.0, 0.0]])
    loss, info = ppo.policy_loss(logp, old, adv, mask, 0.2)
    # token 0: max(-1*1.5, -1*1.2) = -1.2 (clipped); token 1: max(2*0.5, 2*0.8) = 1.6 (clipped); token 2 masked
    assert float(loss) == pytest.approx((-1.2 + 1.6) / 2, abs=1e-6)
    assert float(info["clipfrac"]) == pytest.approx(1.0)


def test_value_loss_by_hand():
    values, old, returns = jnp.array([[1.0, 0.0]]), jnp.array([[0.5, 0.1]]), jnp.array([[2.0, 0.0]])
    mask = jnp.ones((1, 2))
    # token 0: v=1 -> (1-2)^2=1; clipped 0.7 -> (0.7-2)^2=1.69; max 1.69. token 1: 0 vs clipped 0 -> 0.
    assert float(ppo.value_loss(values, old, returns, mask, 0.2)) == pytest.approx(0.5 * 1.69 / 2, rel=1e-6)


def test_kl_estimators_and_shaped_rewards():
    logp, ref = jnp.array([[-1.0, -2.0]]), jnp.array([[-1.5, -1.0]])
    np.testing.assert_allclose(ppo.kl_penalty(logp, ref, "k1"), [[0.5, -1.0]])
    k3 = np.asarray(ppo.kl_penalty(logp, ref, "k3"))
    np.testing.assert_allclose(k3, [[np.exp(-0.5) - 1 + 0.5, np.exp(1.0) - 1 - 1.0]], rtol=1e-6)
    assert (k3 >= 0).all()
    kl = jnp.full((2, 4), 0.1)
    mask = jnp.array([[1, 1, 1, 0], [1, 1, 1, 1]], jnp.float32)
    r = np.asarray(ppo.shaped_rewards(kl, jnp.array([9.0, -2.0]), mask, 0.5, 5.0))
    np.testing.assert_allclose(r, [[-0.05, -0.05, 4.95, 0.0], [-0.05, -0.05, -0.05, -2.05]], rtol=1e-6)


# ----------------------------------------------------------------------------- models


@pytest.fixture(scope="module")
def tiny_roles():
    config = model.TINY.replace(vocab_size=128)
    actor = model.init_params(config, jax.random.key(0))
    critic_config, critic = reward.init_from_base(config, actor, jax.random.key(1))
    return config, actor, critic_config, critic


def test_kl_is_zero_when_actor_equals_reference(tiny_roles):
    config, actor, critic_config, critic = tiny_roles
    seq = jax.random.randint(jax.random.key(2), (4, 12), 3, 128)
    seq_mask = jnp.ones_like(seq)
    response_mask = jnp.ones((4, 5), jnp.int32)
    exp = make_experience(
        actor,
        actor,
        critic,
        seq,
        seq_mask,
        response_mask,
        jnp.zeros(4),
        actor_config=config,
        ref_config=config,
        critic_config=critic_config,
        ppo=ppo.PPOConfig(),
    )
    np.testing.assert_array_equal(np.asarray(exp.old_logprobs), np.asarray(exp.ref_logprobs))
    assert not np.asarray(exp.rewards).any()  # no KL, zero score


def test_critic_step_at_5e_7_moves_fp32_master_weights(tiny_roles):
    _, _, critic_config, critic = tiny_roles
    cfg = optim.OptimConfig(lr=5e-7)
    grads = jax.tree.map(jnp.ones_like, critic)
    state, _ = optim.apply_gradients(optim.create_state(critic, cfg), grads, jnp.float32(1.0), cfg)
    moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), state.params, critic)
    assert all(jax.tree.leaves(moved))
    # The reason for fp32 masters: in bfloat16 the same update is lost to rounding.
    bf16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), critic)
    state16, _ = optim.apply_gradients(optim.create_state(bf16, cfg), grads, jnp.float32(1.0), cfg)
    changed = jnp.mean((state16.params["layers"]["mlp"]["up"] != bf16["layers"]["mlp"]["up"]).astype(jnp.float32))
    assert float(changed) < 0.05  # only weights within ~3e-4 of zero can register the step


def run_ppo(config, actor, critic_config, critic, iterations, pc, score_fn, seed=0):
    actor_state, critic_state = optim.create_state(actor, pc.actor), optim.create_state(critic, pc.critic)
    B, P, R = 32, 8, 8
    prompts = jax.random.randint(jax.random.key(5), (B, P), 3, config.vocab_size)
    prompt_mask = jnp.ones((B, P), jnp.int32)
    rng, scores = jax.random.key(seed), []
    for _ in range(iterations):
        rng, k1, k2 = jax.random.split(rng, 3)
        r_config = rollout.rollout_layout(config, backend.of(jax.default_backend()))
        r_params = rollout.rollout_params(r_config, actor_state.params)
        out = rollout.generate(r_config, r_params, prompts, prompt_mask, k1, max_new_tokens=R, suppress_token_ids=(2,))
        seq, seq_mask = ppo.join(prompts, prompt_mask, out.tokens, out.mask)
        score = score_fn(out.tokens)
        actor_state, critic_state, _, metrics = ppo_iteration(
            actor_state,
            critic_state,
            actor,
            seq,
            seq_mask,
            out.mask,
            score,
            k2,
            actor_config=config,
            ref_config=config,
            critic_config=critic_config,
            ppo=pc,
        )
        scores.append(float(score.mean()))
    return actor_state, critic_state, scores, metrics


def test_ppo_raises_a_fixed_reward(tiny_roles):
    config, actor, critic_config, critic = tiny_roles
    pc = ppo.PPOConfig(
        kl_coef=0.01, epochs=2, minibatches=2, actor=optim.OptimConfig(lr=3e-3), critic=optim.OptimConfig(lr=1e-3)
    )
    # Reward: 5 x the share of response tokens from a fixed set of 16 ids (1/8 of the vocabulary by chance).
    score_fn = lambda tokens: 5.0 * jnp.mean((tokens < 16).astype(jnp.float32), axis=1)
    _, _, scores, metrics = run_ppo(config, actor, critic_config, critic, 12, pc, score_fn)
    assert np.mean(scores[-3:]) > np.mean(scores[:3]) + 1.0, scores
    assert set(metrics) >= {"loss/policy", "loss/value", "clipfrac", "entropy", "approx_kl"}


def test_a_nan_batch_is_skipped(tiny_roles):
    config, actor, critic_config, critic = tiny_roles
    pc = ppo.PPOConfig(minibatches=2)
    nan_score = lambda tokens: jnp.full((tokens.shape[0],), jnp.nan)
    actor_state, critic_state, _, _ = run_ppo(config, actor, critic_config, critic, 1, pc, nan_score)
    assert int(actor_state.skipped) == 2 and int(critic_state.skipped) == 2 and int(actor_state.step) == 0
    same = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), actor_state.params, actor)
    assert all(jax.tree.leaves(same))


@pytest.mark.parametrize(
    "epochs,minibatches",
    [(1, 1), pytest.param(2, 2, marks=pytest.mark.slow), pytest.param(1, 4, marks=pytest.mark.slow)],
)
def test_iteration_equals_experience_then_update(tiny_roles, epochs, minibatches):
    config, actor, critic_config, critic = tiny_roles
    B, P, R = 8, 6, 5
    seq = jax.random.randint(jax.random.key(2), (B, P + R), 3, config.vocab_size)
    seq_mask = jnp.ones_like(seq).at[:2, :2].set(0)  # two left-padded rows
    response_mask = jnp.ones((B, R), jnp.int32).at[3, 3:].set(0)  # one response stopped early
    score = jax.random.normal(jax.random.key(3), (B,))
    reference = jax.tree.map(lambda a: a * 1.01, actor)  # nonzero KL
    pc = ppo.PPOConfig(
        epochs=epochs, minibatches=minibatches, actor=optim.OptimConfig(lr=1e-3), critic=optim.OptimConfig(lr=1e-3)
    )
    kw = dict(actor_config=config, critic_config=critic_config, ppo=pc)
    states = lambda: (optim.create_state(actor, pc.actor), optim.create_state(critic, pc.critic))

    a, c = states()
    exp = make_experience(a.params, reference, c.params, seq, seq_mask, response_mask, score, ref_config=config, **kw)
    a1, c1, m1 = ppo_update(a, c, exp, ppo.epoch_orders(jax.random.key(7), B, epochs), **kw)
    m1 = {**m1, **ppo.experience_metrics(exp)}
    a, c = states()
    a2, c2, exp2, m2 = ppo_iteration(
        a, c, reference, seq, seq_mask, response_mask, score, jax.random.key(7), ref_config=config, **kw
    )
    for x, y in zip(jax.tree.leaves(exp), jax.tree.leaves(exp2)):  # same rows in the same order
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5, atol=1e-6)
    for x, y in zip(jax.tree.leaves((a1.params, c1.params)), jax.tree.leaves((a2.params, c2.params))):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=1e-4)
    moved = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a1.params), jax.tree.leaves(actor)))
    assert moved > 1e-3  # the tolerance above is well below one step
    assert set(m1) == set(m2)
    for k in m1:
        assert float(m2[k]) == pytest.approx(float(m1[k]), rel=1e-4, abs=1e-6), k


def test_iteration_runs_one_actor_and_one_critic_forward_fewer(tiny_roles):
    """XLA's FLOP count: whole-batch PPO saves the actor's and the critic's scoring forward passes."""
    config, actor, critic_config, critic = tiny_roles
    B, P, R = 8, 6, 5
    seq = jnp.ones((B, P + R), jnp.int32)
    seq_mask, response_mask, score = jnp.ones_like(seq), jnp.ones((B, R), jnp.int32), jnp.zeros(B)
    pc = ppo.PPOConfig()
    kw = dict(actor_config=config, critic_config=critic_config, ppo=pc)
    a, c = optim.create_state(actor, pc.actor), optim.create_state(critic, pc.critic)
    flops = lambda fn, *args, **static: fn.lower(*args, **static).compile().cost_analysis()["flops"]
    exp = make_experience(a.params, actor, c.params, seq, seq_mask, response_mask, score, ref_config=config, **kw)
    separate = flops(
        make_experience, a.params, actor, c.params, seq, seq_mask, response_mask, score, ref_config=config, **kw
    ) + flops(ppo_update, a, c, exp, ppo.epoch_orders(jax.random.key(0), B, 1), **kw)
    fused = flops(
        ppo_iteration, a, c, actor, seq, seq_mask, response_mask, score, jax.random.key(0), ref_config=config, **kw
    )
    actor_fwd = flops(jax.jit(ppo.response_logprobs, static_argnums=(0, 4)), config, actor, seq, seq_mask, R)
    critic_fwd = flops(jax.jit(ppo.response_values, static_argnums=(0, 4)), critic_config, critic, seq, seq_mask, R)
    assert separate - fused == pytest.approx(actor_fwd + critic_fwd, rel=0.1)


def test_logprobs_with_suppressed_tokens_are_the_samplers_policy():
    """Suppressed ids get probability 0 and the rest renormalise, as rollout.filter_logits does; the written-out
    backward pass equals autodiff of that reference."""
    rng = np.random.default_rng(0)
    hidden, head = jnp.asarray(rng.normal(size=(2, 3, 8))), jnp.asarray(rng.normal(size=(8, 11)))
    tokens = jnp.asarray(rng.integers(3, 11, (2, 3)))
    suppress, temperature = (0, 1, 2), 0.7

    def reference(hidden, head):
        logits = jnp.einsum("BRD,DV->BRV", hidden, head) / temperature
        logp = jax.nn.log_softmax(logits.at[..., jnp.asarray(suppress)].set(-jnp.inf), axis=-1)
        return jnp.take_along_axis(logp, tokens[..., None], -1)[..., 0], logp

    logp, entropy = ppo.token_logprobs(hidden, head, tokens, temperature, suppress)
    want, full = reference(hidden, head)
    np.testing.assert_allclose(logp, want, rtol=1e-5, atol=1e-6)
    p = jnp.exp(full)
    np.testing.assert_allclose(entropy, -jnp.sum(jnp.where(p > 0, p * full, 0.0), -1), rtol=1e-5, atol=1e-6)
    weights = jnp.asarray(rng.normal(size=(2, 3)))
    ours = jax.grad(
        lambda h, w: jnp.sum(weights * ppo.token_logprobs(h, w, tokens, temperature, suppress)[0]), argnums=(0, 1)
    )(hidden, head)
    theirs = jax.grad(lambda h, w: jnp.sum(weights * reference(h, w)[0]), argnums=(0, 1))(hidden, head)
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert not np.asarray(ours[1])[:, list(suppress)].any()  # no gradient towards a token never drawn


def test_adaptive_kl_coefficient():
    fixed = ppo.PPOConfig(kl_coef=0.1)
    assert ppo.adapt_kl_coef(0.1, 5.0, 64, fixed) == 0.1  # kl_target 0: the paper's fixed coefficient
    pc = ppo.PPOConfig(kl_coef=0.1, kl_target=0.5, kl_horizon=100)
    assert ppo.adapt_kl_coef(0.1, 0.6, 10, pc) == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))  # 20% above target
    assert ppo.adapt_kl_coef(0.1, 50.0, 10, pc) == pytest.approx(0.1 * (1 + 0.2 * 0.1))  # error clipped at 0.2
    assert ppo.adapt_kl_coef(0.1, 0.25, 10, pc) == pytest.approx(0.1 * (1 - 0.2 * 0.1))
    assert ppo.adapt_kl_coef(0.1, 0.5, 10, pc) == 0.1
    with pytest.raises(ppo.PPOError, match="kl_coef=0 with kl_target"):
        ppo.PPOConfig(kl_coef=0.0, kl_target=0.5)


def test_experience_metrics_by_hand():
    rng = np.random.default_rng(1)
    B, R = 4, 5
    mask = prefix_mask(rng, B, R)
    old, ref, values, returns = (rng.normal(size=(B, R)) * mask for _ in range(4))
    exp = ppo.Experience(
        *(jnp.zeros((B, R)),) * 3,
        jnp.asarray(old),
        jnp.asarray(ref),
        jnp.asarray(values),
        jnp.zeros((B, R)),
        jnp.zeros((B, R)),
        jnp.asarray(returns),
        jnp.zeros(B),
    )
    exp.response_mask = jnp.asarray(mask)
    m = {k: float(v) for k, v in ppo.experience_metrics(exp).items()}
    valid = mask > 0
    adv = (returns - values)[valid]
    assert m["kl"] == pytest.approx((old - ref)[valid].mean(), rel=1e-5)
    assert m["kl/per_response"] == pytest.approx(((old - ref) * mask).sum(1).mean(), rel=1e-5)
    assert m["advantages/mean"] == pytest.approx(adv.mean(), rel=1e-5, abs=1e-6)
    assert m["advantages/std"] == pytest.approx(adv.std(), rel=1e-5)
    assert m["returns/std"] == pytest.approx(returns[valid].std(), rel=1e-5)
    assert m["value/explained_variance"] == pytest.approx(1 - adv.var() / returns[valid].var(), rel=1e-4)
    exp.values = exp.returns
    assert float(ppo.experience_metrics(exp)["value/explained_variance"]) == pytest.approx(1.0)


def test_lr_decays_linearly_to_zero_after_warmup():
    schedule = optim.OptimConfig(lr=1.0, warmup_steps=4, decay_steps=8).schedule()
    assert [float(schedule(s)) for s in (0, 2, 4, 8, 12, 20)] == pytest.approx([0, 0.5, 1, 0.5, 0, 0])
    assert optim.OptimConfig(lr=1.0).schedule() == 1.0
    with pytest.raises(optim.OptimError, match="decay_steps"):
        optim.OptimConfig(lr=1.0, decay_steps=-1)
