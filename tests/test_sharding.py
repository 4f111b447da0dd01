"""Sharded programs on fake CPU devices (conftest sets 8) match one device, really shard, and do not recompile."""

import functools

import jax
import numpy as np
import pytest

from c2f_jax.model import model, sharding
from c2f_jax.rl import optim, ppo, programs, reward, rollout
from c2f_jax.runtime import backend, checkpoint, compilations

MESHES = [(1, 1, 1), (8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 2, 4)]
B, P, R = 8, 8, 6


def one_iteration(mesh_shape):
    """One PPO iteration through the run's compiled programs; returns (tokens, experience, new actor params, mesh, ...)."""
    mesh = sharding.make_mesh(*mesh_shape)
    config = model.TINY.replace(vocab_size=256)
    base = model.init_params(config, jax.random.key(0))
    critic_config, critic = reward.init_from_base(config, base, jax.random.key(1))
    pc = ppo.PPOConfig(minibatches=2, actor=optim.OptimConfig(lr=1e-3), critic=optim.OptimConfig(lr=1e-3))

    def placed_state(params, oc):
        state = optim.create_state(sharding.place(params, sharding.param_shardings(mesh, params)), oc)
        return sharding.place(state, sharding.like_params(mesh, state, state.params))

    actor_state, critic_state = placed_state(base, pc.actor), placed_state(critic, pc.critic)
    reference = sharding.place(base, sharding.param_shardings(mesh, base))
    rm_params = sharding.place(critic, sharding.param_shardings(mesh, critic))
    progs = programs.coarse_programs(
        mesh,
        actor_config=config,
        ref_config=config,
        critic_config=critic_config,
        rm_config=critic_config,
        pc=pc,
        sampling=rollout.SamplingConfig(temperature=0.0, suppress_token_ids=(2,)),
        eos_token_ids=(2,),
        pad_id=0,
        actor_state=actor_state,
        critic_state=critic_state,
        reference=reference,
        rm_params=rm_params,
    )
    ids = sharding.global_batch(mesh, np.random.default_rng(0).integers(3, 256, (B, P)).astype(np.int32))
    mask = sharding.global_batch(mesh, np.ones((B, P), np.int32))

    def step(actor_state, critic_state):
        out = progs.generate(R)(progs.to_rollout(actor_state.params), ids, mask, jax.random.key(0))
        seq, seq_mask = ppo.join(ids, mask, out.tokens, out.mask)
        score = progs.score(rm_params, seq, seq_mask)
        actor_state, critic_state, exp, m = progs.iteration(
            actor_state, critic_state, reference, seq, seq_mask, out.mask, score, jax.random.key(1), np.float32(0.05)
        )
        return out, exp, actor_state, critic_state

    out, exp, actor_state, critic_state = step(actor_state, critic_state)
    host = lambda tree: jax.tree.map(np.asarray, tree)  # the next step donates these buffers
    snapshot = (host(out), host(exp), host(actor_state.params))
    shards = {
        "q": sharding.shard_shapes(actor_state.params["layers"]["attn"]["q"]),
        "tokens": sharding.shard_shapes(out.tokens),
        "mu_follows_param": actor_state.opt_state[1][0].mu["layers"]["mlp"]["up"].sharding
        == actor_state.params["layers"]["mlp"]["up"].sharding,
    }
    before = compilations.total()
    jax.block_until_ready(step(actor_state, critic_state))  # a second iteration of the same shapes
    return (*snapshot, mesh, compilations.total() - before, shards)


@pytest.fixture(scope="module")
def single():
    return one_iteration((1, 1, 1))


# 2x2x2 uses every axis and stays in the fast tier; the other meshes compile the iteration again.
@pytest.mark.parametrize(
    "shape",
    [s if s == (2, 2, 2) else pytest.param(s, marks=pytest.mark.slow) for s in MESHES[1:]],
    ids=lambda s: "x".join(map(str, s)),
)
def test_sharded_iteration_matches_one_device(single, shape):
    out1, exp1, actor1, _, _, _ = single
    out, exp, actor, mesh, recompiled, shards = one_iteration(shape)
    np.testing.assert_array_equal(out.tokens, out1.tokens)
    np.testing.assert_allclose(exp.old_logprobs, exp1.old_logprobs, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(exp.advantages, exp1.advantages, rtol=1e-4, atol=1e-5)
    for a, b in zip(jax.tree.leaves(actor), jax.tree.leaves(actor1)):  # updated params, relative (Frobenius)
        assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(b)
    assert recompiled == 0
    # Really sharded: the train layout splits the model dimension over fsdp and heads over tensor.
    assert shards["q"] == {(2, 64 // mesh.shape["fsdp"], 4 // mesh.shape["tensor"], 16)}  # q: [L, D, N, H]
    assert shards["mu_follows_param"]  # optimizer moments sit where their params do
    assert shards["tokens"] == {(B // (mesh.shape["data"] * mesh.shape["fsdp"]), R)}


@pytest.mark.slow  # a second compile of the iteration
def test_iteration_with_layout_hints_matches_one_device(single, monkeypatch):
    """The activation hints GPU meshes run with (off on CPU meshes by default), through every program once."""
    out1, exp1, actor1, _, _, _ = single
    monkeypatch.setenv("C2F_SHARDING_HINTS", "1")
    out, exp, actor, _, recompiled, _ = one_iteration((2, 2, 2))
    np.testing.assert_array_equal(out.tokens, out1.tokens)
    for a, b in zip(jax.tree.leaves(exp), jax.tree.leaves(exp1)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    for a, b in zip(jax.tree.leaves(actor), jax.tree.leaves(actor1)):
        assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(b)
    assert recompiled == 0


def test_rollout_layout_drops_fsdp():
    mesh = sharding.make_mesh(1, 2, 4)
    config = model.TINY.replace(vocab_size=256)
    layout = rollout.rollout_layout(config, backend.of_mesh(mesh))
    per_layer = rollout.rollout_params(layout, model.init_params(config, jax.random.key(0)))
    sh = sharding.param_shardings(mesh, per_layer, "rollout")
    assert sh["layers_0"]["mlp"]["up"].spec == jax.sharding.PartitionSpec(None, "tensor")
    mlp = sh["layers_0"]["mlp"]  # down_t [D, F] on CPU, else down [F, D]: F split either way
    assert (
        mlp["down_t"].spec == jax.sharding.PartitionSpec(None, "tensor")
        if "down_t" in mlp
        else mlp["down"].spec == jax.sharding.PartitionSpec("tensor", None)
    )
    assert sh["layers_0"]["attn"]["k"].spec == jax.sharding.PartitionSpec(None, None, None)  # 2 kv heads: not 4 ways
    assert sh["embed"].spec == jax.sharding.PartitionSpec("tensor", None)


def test_restore_onto_a_different_mesh(tmp_path):
    config = model.TINY.replace(vocab_size=256)
    params = model.init_params(config, jax.random.key(0))
    ckpt = checkpoint.Checkpointer(tmp_path, async_save=False)
    ckpt.save(1, {"actor": params}, {"step": 1})
    ckpt.wait()
    mesh = sharding.make_mesh(2, 2, 2)
    target = sharding.place(params, sharding.param_shardings(mesh, params))
    restored, meta = ckpt.restore(target={"actor": target})
    ckpt.close()
    gate = restored["actor"]["layers"]["mlp"]["gate"]
    assert gate.sharding == target["layers"]["mlp"]["gate"].sharding and meta == {"step": 1}
    np.testing.assert_array_equal(np.asarray(gate), np.asarray(params["layers"]["mlp"]["gate"]))


def test_mesh_must_fit_devices_and_batch():
    with pytest.raises(sharding.ShardingError, match="16 devices, but 8 are available"):
        sharding.make_mesh(2, 8, 1)
    with pytest.raises(sharding.ShardingError, match="batch size 6 does not split"):
        sharding.batch_size_check(sharding.make_mesh(4, 1, 1), 6)


def test_chunked_decode_with_early_stop_matches_one_device():
    """Decode in chunks of 2 steps, with EOS allowed so rows stop, on a 2x2x2 mesh (kv cache split over
    tensor): the same tokens, mask and decode steps as one device."""
    config = model.TINY.replace(vocab_size=256, num_key_value_heads=2)
    layout = rollout.rollout_layout(config, backend.of("cpu"))
    params = rollout.rollout_params(layout, model.init_params(config, jax.random.key(0)))
    ids = np.random.default_rng(0).integers(3, 256, (B, P)).astype(np.int32)
    mask = np.ones((B, P), np.int32)
    mask[:3, :4] = 0  # left padding
    settings = dict(
        config=layout,
        max_new_tokens=12,
        sampling=rollout.SamplingConfig(temperature=0.0),
        eos_token_ids=tuple(range(3, 80)),
        pad_id=0,
        chunk=2,
    )
    want, want_ran = jax.jit(functools.partial(rollout.decode, **settings))(params, ids, mask, jax.random.key(0))
    mesh = sharding.make_mesh(2, 2, 2)
    param_sh = sharding.param_shardings(mesh, params, "rollout")
    batch2, repl = sharding.batch_sharding(mesh, 2), sharding.replicated(mesh)
    sharded = programs._jit(
        mesh,
        rollout.decode,
        (param_sh, batch2, batch2, repl),
        (rollout.Rollout(batch2, batch2, batch2), repl),
        **settings,
    )
    out, ran = sharded(
        sharding.place(params, param_sh),
        sharding.global_batch(mesh, ids),
        sharding.global_batch(mesh, mask),
        jax.random.key(0),
    )
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(want.tokens))
    np.testing.assert_array_equal(np.asarray(out.mask), np.asarray(want.mask))
    assert int(ran) == int(want_ran) < 11  # every row stopped before the last chunks, which did not run


@pytest.mark.parametrize("scan_layers", [True, False])
def test_the_layer_by_layer_reshard_equals_the_whole_copy(scan_layers):
    """The rollout copy, built by one program per layer on a sharded mesh, equals rollout_params of the cast
    params exactly, in the rollout layout's sharding; the two programs compile once."""
    mesh = sharding.make_mesh(1, 4, 2)
    config = model.TINY.replace(vocab_size=256, scan_layers=scan_layers, compute_dtype="bfloat16")
    params = model.init_params(config, jax.random.key(3))
    state = optim.create_state(
        sharding.place(params, sharding.param_shardings(mesh, params)), optim.OptimConfig(lr=1e-3)
    )
    state = sharding.place(state, sharding.like_params(mesh, state, state.params))
    critic_config, critic = reward.init_from_base(config, params, jax.random.key(1))
    critic_state = optim.create_state(critic, optim.OptimConfig(lr=1e-3))
    progs = programs.coarse_programs(
        mesh,
        actor_config=config,
        ref_config=config,
        critic_config=critic_config,
        rm_config=critic_config,
        pc=ppo.PPOConfig(actor=optim.OptimConfig(lr=1e-3), critic=optim.OptimConfig(lr=1e-3)),
        sampling=rollout.SamplingConfig(),
        eos_token_ids=(2,),
        pad_id=0,
        actor_state=state,
        critic_state=critic_state,
        reference=params,
        rm_params=critic,
    )
    layout = rollout.rollout_layout(config, backend.of_mesh(mesh))
    want = rollout.rollout_params(layout, jax.tree.map(lambda a: a.astype("bfloat16"), params))
    before = compilations.total()
    got = progs.to_rollout(state.params)
    assert compilations.total() - before == 2 and config.num_hidden_layers > 1
    assert jax.tree.structure(got) == jax.tree.structure(want)
    shardings = sharding.param_shardings(mesh, want, "rollout")
    for a, b, sh in zip(jax.tree.leaves(got), jax.tree.leaves(want), jax.tree.leaves(shardings)):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
        assert a.sharding.is_equivalent_to(sh, a.ndim)
