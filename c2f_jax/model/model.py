"""Mistral decoder in Flax (Linen), used functionally over plain param pytrees.

One module definition serves all four PPO roles: the actor and the reference use
the LM head (`MistralForCausalLM`), the critic and the reward model a scalar head
named like HF `MistralForSequenceClassification` (`score`).

Einsum axis letters: B batch, T query time, S key time, D model, N query heads,
K kv heads, G query heads per kv head, H head dim, F mlp hidden, V vocab, L layers.

Param tree (leading L on everything under `layers`, which are scanned):
    embed            [V, D]
    layers/attn_norm/scale [L, D]      layers/mlp_norm/scale [L, D]
    layers/attn/q    [L, D, N, H]      layers/attn/k, v [L, D, K, H]
    layers/attn/o    [L, N, H, D]
    layers/mlp/gate, up [L, D, F]      layers/mlp/down [L, F, D]  (or down_t [L, D, F]: transposed_down)
    final_norm/scale [D]
    lm_head          [D, V]   (absent when tie_word_embeddings)
    score            [D, num_labels]   (scalar-head models instead of lm_head)
"""

from __future__ import annotations

import functools
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

# The config lives in a JAX-free module; model.MistralConfig etc. stay the public names.
from c2f_jax.model.config import (  # noqa: F401
    ARCHITECTURES,
    CAUSAL_LM,
    MISTRAL_7B_INSTRUCT_V02,
    MISTRAL_7B_V01,
    PRESETS,
    REMAT_POLICIES,
    SEQ_CLS,
    TINY,
    ConfigError,
    MistralConfig,
    Params,
)
from c2f_jax.model.sharding import BATCH, shard_as

# Large-but-finite so a query row with no visible key (a pad query) gives a
# uniform softmax instead of NaN.
_MASKED = -1e30


# ----------------------------------------------------------------------------- pure pieces


def positions_from_mask(mask: jax.Array) -> jax.Array:
    """Position ids counted from each row's first real token. mask [B, T] -> int32 [B, T] (0 on left pads)."""
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


def rope_sin_cos(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """positions int [B, T] -> (sin, cos), float32 [B, T, H/2]."""
    inv_freq = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.sin(angles), jnp.cos(angles)


def apply_rope(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
    """HF half-split rotary embedding: x [B, T, heads, H], sin/cos [B, T, H/2]."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    sin, cos = sin[:, :, None, :], cos[:, :, None, :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def attention_bias(q_pos, key_pos, key_mask, sliding_window: int | None, segments=None) -> jax.Array:
    """Additive mask, float32 [B, T, S]: key visible if real, not in the future, and inside the window.

    q_pos [B, T], key_pos [B, S] are position ids; key_mask [B, S] is 1 for real keys.
    Positions stand in for indices: within a left-padded row they differ by a constant.
    segments int [B, T] (no cache, S = T) packs several sequences in a row: segment 0 is a prefix they all
    continue, and a key of segment j > 0 is visible to segment j only; positions restart after the prefix.
    """
    delta = q_pos[:, :, None] - key_pos[:, None, :]  # [B, T, S]
    visible = (delta >= 0) & (key_mask[:, None, :] > 0)
    if segments is not None:
        visible &= (segments[:, None, :] == segments[:, :, None]) | (segments[:, None, :] == 0)
    if sliding_window is not None:
        visible &= delta < sliding_window
    return jnp.where(visible, 0.0, _MASKED).astype(jnp.float32)


# ----------------------------------------------------------------------------- modules


# The name the remat policy "dots" saves `dense` outputs under (its matmuls are inside a custom_vjp,
# where dots_with_no_batch_dims_saveable cannot see them).
DENSE_NAME = "dense"


def dense(x: jax.Array, w: jax.Array, out_dtype=None) -> jax.Array:
    """x [..., I] @ w [I, O] -> [..., O], as jnp.einsum with preferred_element_type=out_dtype.

    Only the weight gradient is spelled differently: JAX transposes the forward einsum
    into dot(dy, x) over tokens followed by a transpose, which XLA:CPU lowers to a
    layout copy of dy written in transposed order (fused into dy's producer, so a
    strided write as large as the activations) feeding its fallback dot. Contracting
    x and dy over their leading token axis directly needs no copy at all.

    Every weight matmul that training differentiates goes through it (q, k, v, o, gate, up, down, the score
    head; the measured gain is in the README, "Measurements behind the code's choices"). Its forward
    compiles to the same program as the plain einsum, so the forward-only paths (sampling, scoring) share it
    at no cost; only the rollout's `down_t` product, never differentiated, is spelled apart.
    """
    return checkpoint_name(_dense(x, w, out_dtype), DENSE_NAME)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _dense(x, w, out_dtype):
    return jnp.einsum("...i,io->...o", x, w, preferred_element_type=out_dtype)


def _dense_fwd(x, w, out_dtype):
    return _dense(x, w, out_dtype), (x, w)


def _dense_bwd(out_dtype, res, dy):
    x, w = res
    dx = jnp.einsum("...o,io->...i", dy, w).astype(x.dtype)
    tokens_x, tokens_dy = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    dw = jnp.einsum("ti,to->io", tokens_x, tokens_dy).astype(w.dtype)
    return dx, dw


_dense.defvjp(_dense_fwd, _dense_bwd)


_INIT = nn.initializers.normal(stddev=0.02)


class RMSNorm(nn.Module):
    config: MistralConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.dtype(c.param_dtype))
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + c.rms_norm_eps)
        return y.astype(x.dtype) * scale.astype(x.dtype)


class Attention(nn.Module):
    config: MistralConfig

    @nn.compact
    def __call__(self, x, sin, cos, bias, kv, write_index, layer):
        """x [B, T, D]; bias [B, T, S]; kv None or the whole cache in blocks (see `apply`).

        With a cache, this layer's new keys/values are written in place into the last of the
        blocks that make up the first S positions, at `write_index` within it, and attention
        reads those blocks: decoding reads the filled part of the cache, not every allocated position.
        """
        c = self.config
        N, K, H, D = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.hidden_size
        pdt, cdt = jnp.dtype(c.param_dtype), jnp.dtype(c.compute_dtype)
        wq = self.param("q", _INIT, (D, N, H), pdt).astype(cdt)
        wk = self.param("k", _INIT, (D, K, H), pdt).astype(cdt)
        wv = self.param("v", _INIT, (D, K, H), pdt).astype(cdt)
        wo = self.param("o", _INIT, (N, H, D), pdt).astype(cdt)

        project = lambda w: dense(x, w.reshape(D, -1)).reshape(*x.shape[:-1], *w.shape[1:])  # BTD,D(NH)->BTNH
        q = shard_as(apply_rope(project(wq), sin, cos), BATCH, None, "tensor", None)
        k = shard_as(apply_rope(project(wk), sin, cos), BATCH, None, "tensor", None)
        v = shard_as(project(wv), BATCH, None, "tensor", None)
        B, T = x.shape[:2]
        q = q.reshape(B, T, K, N // K, H)  # [B, T, K, G, H]
        if kv is not None:
            kv, out = _cached_attention(kv, q, k, v, bias, write_index, layer, cdt)
            return dense(out.reshape(B, T, N * H), wo.reshape(N * H, D)), kv
        scores = jnp.einsum("BTKGH,BSKH->BKGTS", q, k.astype(cdt), preferred_element_type=jnp.float32)
        scores = shard_as(scores * H**-0.5 + bias[:, None, None, :, :], BATCH, "tensor", None, None, None)
        probs = jax.nn.softmax(scores, axis=-1).astype(cdt)
        out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v.astype(cdt)).reshape(B, T, N * H)
        return dense(out, wo.reshape(N * H, D)), kv  # BT(NH),(NH)D->BTD


def _cached_attention(kv, q, k, v, bias, write_index, layer, cdt):
    """Attention over the cache blocks that make up the first S = bias.shape[-1] positions, after writing
    k, v [B, T, K, H] into the last of them at `write_index`. q [B, T, K, G, H]; returns (kv, out [B, T, K, G, H]).

    Blocks, not one buffer sliced to the filled length: XLA:CPU copies a slice before a matmul reads it, and
    the copy cost more than the products. Keys are stored [.., K, n, H] and values [.., K, H, n], the
    operand layouts XLA's batched matmuls read in place (values the other way round were transposed by a
    copy per layer and step). The last block is read as it was before the write, with the written slots'
    scores and values patched in: read after the write, XLA:CPU copied the block three times per step to
    update it in place.
    """
    ends = list(itertools.accumulate(b.shape[3] for b in kv["k"]))  # key blocks [L, B, K, n, H]
    if bias.shape[-1] not in ends:
        raise ValueError(f"attention over {bias.shape[-1]} cache positions must end at a block end, one of {ends}")
    last = ends.index(bias.shape[-1])
    H, T = q.shape[-1], q.shape[1]
    new_k, new_v = k.transpose(0, 2, 1, 3).astype(cdt), v.transpose(0, 2, 3, 1).astype(cdt)  # [B,K,T,H], [B,K,H,T]
    keys = [b[layer].astype(cdt) for b in kv["k"][: last + 1]]
    values = [b[layer].astype(cdt) for b in kv["v"][: last + 1]]
    whole = keys[-1].shape[2] == T  # the write fills the block (prefill): read the new keys themselves
    if whole:
        keys[-1], values[-1] = new_k, new_v
    scores = [jnp.einsum("BTKGH,BKSH->BKGTS", q, b, preferred_element_type=jnp.float32) for b in keys]
    if not whole:
        written = jnp.einsum("BTKGH,BKSH->BKGTS", q, new_k, preferred_element_type=jnp.float32)  # [.., T, T]
        scores[-1] = jax.lax.dynamic_update_slice_in_dim(scores[-1], written, write_index, axis=4)
    scores = shard_as(
        jnp.concatenate(scores, axis=-1) * H**-0.5 + bias[:, None, None, :, :], BATCH, "tensor", None, None, None
    )
    probs = jax.nn.softmax(scores, axis=-1).astype(cdt)
    out, start = 0.0, 0
    for b in values:
        n = b.shape[-1]
        out = out + jnp.einsum(
            "BKGTS,BKHS->BTKGH", probs[..., start : start + n], b, preferred_element_type=jnp.float32
        )
        start += n
    if not whole:  # the written slots held the block's old values in the product above
        p_new = jax.lax.dynamic_slice_in_dim(probs[..., start - values[-1].shape[-1] :], write_index, T, axis=4)
        v_old = jax.lax.dynamic_slice_in_dim(values[-1], write_index, T, axis=3)
        out = out + jnp.einsum("BKGTS,BKHS->BTKGH", p_new, new_v - v_old, preferred_element_type=jnp.float32)
    at = {"k": (layer, 0, 0, write_index, 0), "v": (layer, 0, 0, 0, write_index)}
    new = {"k": new_k, "v": new_v}
    kv = {
        name: [
            shard_as(
                jax.lax.dynamic_update_slice(b, new[name][None].astype(b.dtype), at[name]),
                None,
                BATCH,
                "tensor",
                None,
                None,
            )
            if i == last
            else b
            for i, b in enumerate(blocks)
        ]
        for name, blocks in kv.items()
    }
    return kv, out.astype(cdt)


class MLP(nn.Module):
    config: MistralConfig

    @nn.compact
    def __call__(self, x):
        """x [B, T, D] -> down(silu(gate(x)) * up(x)) [B, T, D]."""
        c = self.config
        pdt, cdt = jnp.dtype(c.param_dtype), jnp.dtype(c.compute_dtype)
        D, F = c.hidden_size, c.intermediate_size
        gate = dense(x, self.param("gate", _INIT, (D, F), pdt).astype(cdt))  # BTD,DF->BTF
        up = dense(x, self.param("up", _INIT, (D, F), pdt).astype(cdt))  # BTD,DF->BTF
        hidden = jax.nn.silu(gate) * up  # [B, T, F]
        if c.transposed_down:  # the CPU rollout copy (rollout.rollout_layout)
            w = self.param("down_t", _INIT, (D, F), pdt).astype(cdt)
            # Out [D, B, T], then turned back: XLA:CPU runs "BTF,DF->BTD" on an 8-row decode far slower (README).
            return jnp.einsum("DF,BTF->DBT", w, hidden).transpose(1, 2, 0)
        return dense(hidden, self.param("down", _INIT, (F, D), pdt).astype(cdt))  # BTF,FD->BTD


class DecoderLayer(nn.Module):
    config: MistralConfig

    @nn.compact
    def __call__(self, carry, sin, cos, bias, write_index, layer):
        x, kv = carry
        attn_out, kv = Attention(self.config, name="attn")(
            RMSNorm(self.config, name="attn_norm")(x), sin, cos, bias, kv, write_index, layer
        )
        x = shard_as(x + attn_out, BATCH, None, None)
        x = shard_as(x + MLP(self.config, name="mlp")(RMSNorm(self.config, name="mlp_norm")(x)), BATCH, None, None)
        return (x, kv), None


def _remat_policy(name: str):
    policies = jax.checkpoint_policies
    dots = policies.save_from_both_policies(
        policies.dots_with_no_batch_dims_saveable, policies.save_only_these_names(DENSE_NAME)
    )
    return {"full": None, "dots": dots}[name]


class Mistral(nn.Module):
    """The decoder with its head. Returns (head output float32, updated kv)."""

    config: MistralConfig

    @nn.compact
    def __call__(self, input_ids, positions, bias, kv=None, write_index=0, head=True):
        c = self.config
        pdt, cdt = jnp.dtype(c.param_dtype), jnp.dtype(c.compute_dtype)
        embed = self.param("embed", _INIT, (c.vocab_size, c.hidden_size), pdt)
        x = shard_as(jnp.take(embed, input_ids, axis=0).astype(cdt), BATCH, None, None)  # [B, T, D]
        sin, cos = rope_sin_cos(positions, c.head_dim, c.rope_theta)

        layer = DecoderLayer
        if c.remat != "none":
            layer = nn.remat(layer, policy=_remat_policy(c.remat), prevent_cse=False)
        if c.scan_layers:
            # Stacked, scanned layers: compile time does not grow with depth.
            stack = nn.scan(
                layer,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, 0),
                length=c.num_hidden_layers,
            )
            layers = jnp.arange(c.num_hidden_layers)
            (x, kv), _ = stack(c, name="layers")((x, kv), sin, cos, bias, write_index, layers)
        else:
            # One array per layer: no per-layer dynamic slice (a weight copy on CPU) in decode loops.
            new_kv = []
            for i in range(c.num_hidden_layers):
                (x, kv_i), _ = layer(c, name=f"layers_{i}")((x, kv and kv[i]), sin, cos, bias, write_index, 0)
                new_kv.append(kv_i)
            kv = new_kv if kv else None
        x = RMSNorm(c, name="final_norm")(x)
        if not head:
            return x, kv
        head_params = {"embed": embed}
        if not c.has_lm_head:
            head_params["score"] = self.param("score", _INIT, (c.hidden_size, c.num_labels), pdt)
        elif not c.tie_word_embeddings:
            head_params["lm_head"] = self.param("lm_head", _INIT, (c.hidden_size, c.vocab_size), pdt)
        return head_output(c, head_params, x), kv


def head_weight(config: MistralConfig, params: Params) -> jax.Array:
    """The output projection [D, V] (or [D, num_labels]) in compute dtype."""
    if not config.has_lm_head:
        w = params["score"]
    elif config.tie_word_embeddings:
        w = params["embed"].T
    else:
        w = params["lm_head"]
    return w.astype(config.compute_dtype)


def head_output(config: MistralConfig, params: Params, hidden: jax.Array) -> jax.Array:
    """LM logits [..., V] (or scalar-head scores [..., num_labels]), float32, from final hidden states [..., D]."""
    out = dense(hidden, head_weight(config, params), jnp.float32)  # ...D,DV->...V
    return shard_as(out, BATCH, *([None] * (out.ndim - 2)), "tensor")


# ----------------------------------------------------------------------------- public functions


def init_params(config: MistralConfig, rng: jax.Array) -> Params:
    """Random params (normal 0.02, norms at 1) in `config.param_dtype`, as a plain nested dict."""
    ids = jnp.zeros((1, 1), jnp.int32)
    bias = jnp.zeros((1, 1, 1), jnp.float32)
    return Mistral(config).init(rng, ids, ids, bias)["params"]


def param_shapes(config: MistralConfig) -> Params:
    """The param tree as `jax.ShapeDtypeStruct`s, without allocating anything."""
    return jax.eval_shape(functools.partial(init_params, config), jax.random.key(0))


def unstack_layers(params: Params) -> Params:
    """Stacked params (`layers` with leading L) -> one subtree per layer (`layers_0`, ...), for scan_layers=False."""
    params = dict(params)
    stacked = params.pop("layers")
    n = jax.tree.leaves(stacked)[0].shape[0]
    for i in range(n):
        params[f"layers_{i}"] = jax.tree.map(lambda a: a[i], stacked)
    return params


def stack_layers(params: Params) -> Params:
    """The inverse of unstack_layers."""
    params = dict(params)
    names = sorted((k for k in params if k.startswith("layers_")), key=lambda k: int(k.split("_")[1]))
    params["layers"] = jax.tree.map(lambda *a: jnp.stack(a), *[params.pop(k) for k in names])
    return params


def apply(
    config: MistralConfig,
    params: Params,
    input_ids,
    positions,
    key_pos,
    key_mask,
    kv=None,
    write_index=0,
    head=True,
    segments=None,
):
    """The general entry point (forward and cached decoding).

    input_ids, positions int [B, T]; key_pos, key_mask [B, S] describe every key the
    queries may see (S = T without a cache; with one, the first S positions of the cache, which must end
    at a block end); kv is None, or the cache as consecutive blocks of positions (`rollout.init_kv`):
    {'k': [[L, B, K, n_i, H], ...], 'v': [[L, B, K, H, n_i], ...]} with scan_layers, else a list of L
    such dicts with L = 1; new keys/values are written into the last block read, at `write_index` in it.
    segments: packed rows without a cache (`attention_bias`).
    Returns (head output float32 [B, T, V or num_labels] or hidden [B, T, D], kv).
    """
    bias = attention_bias(positions, key_pos, key_mask, config.sliding_window, segments)
    return Mistral(config).apply({"params": params}, input_ids, positions, bias, kv, write_index, head)


def _mask_and_positions(input_ids, attention_mask):
    if attention_mask is None:
        attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    return attention_mask, positions_from_mask(attention_mask)


def forward(config: MistralConfig, params: Params, input_ids, attention_mask=None) -> jax.Array:
    """Logits float32 [B, T, V] for int input_ids [B, T] (left padding marked 0 in attention_mask [B, T]).

    For a scalar-head config the last axis is num_labels (the per-token scores).
    """
    mask, pos = _mask_and_positions(input_ids, attention_mask)
    return apply(config, params, input_ids, pos, pos, mask)[0]


def hidden_states(config: MistralConfig, params: Params, input_ids, attention_mask=None) -> jax.Array:
    """Final-norm hidden states [B, T, D] in compute dtype (apply `head_output` to the positions you need)."""
    mask, pos = _mask_and_positions(input_ids, attention_mask)
    return apply(config, params, input_ids, pos, pos, mask, head=False)[0]


def forward_values(config: MistralConfig, params: Params, input_ids, attention_mask=None) -> jax.Array:
    """Per-token scalar head output float32 [B, T] (critic values); needs num_labels == 1."""
    if config.has_lm_head or config.num_labels != 1:
        raise ConfigError("forward_values needs a MistralForSequenceClassification config with num_labels=1")
    return forward(config, params, input_ids, attention_mask)[..., 0]


def last_token_index(attention_mask) -> jax.Array:
    """Index of each row's last real token, int32 [B] (as HF picks the last non-pad token)."""
    T = attention_mask.shape[-1]
    return jnp.max(jnp.where(attention_mask > 0, jnp.arange(T), 0), axis=-1).astype(jnp.int32)


def sequence_scores(config: MistralConfig, params: Params, input_ids, attention_mask=None) -> jax.Array:
    """Scalar-head output at each row's last real token: float32 [B, num_labels] (reward model)."""
    mask, _ = _mask_and_positions(input_ids, attention_mask)
    per_token = forward(config, params, input_ids, mask)
    return jnp.take_along_axis(per_token, last_token_index(mask)[:, None, None], axis=1)[:, 0]
