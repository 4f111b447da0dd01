"""Sampling as one compiled program per (prompt bucket, response bucket).

Prefill the left-padded prompt into a KV cache, then decode one token per step in
chunks of `lax.scan`s with no host round trip. Each chunk is compiled at its own
static attention length, so a step reads the cache as filled so far, not every
allocated position; where EOS may be sampled, a chunk whose rows have all stopped
is skipped. The cache is a loop-carried buffer inside that one program, so XLA
updates it in place (there is no second program to donate it to). Lengths come
from the configured buckets, never from the data, so a new batch of the same
bucket never recompiles.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Sequence

import jax
import jax.numpy as jnp

from c2f_jax.model import model
from c2f_jax.model.model import MistralConfig, Params
from c2f_jax.model.sharding import BATCH, shard_as
from c2f_jax.runtime import backend


class RolloutError(ValueError):
    """A prompt batch or sampling setting the rollout cannot run."""


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How tokens are drawn. temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    suppress_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if not math.isfinite(self.temperature) or self.temperature < 0:  # NaN fails every comparison
            raise RolloutError(f"temperature={self.temperature} must be a finite number >= 0")
        if self.top_k < 0:
            raise RolloutError(f"top_k={self.top_k} must be >= 0")
        if not 0 < self.top_p <= 1:
            raise RolloutError(f"top_p={self.top_p} must be in (0, 1]")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Rollout:
    """tokens int32 [B, R]; mask int32 [B, R]: 1 for generated tokens up to and including the first EOS;
    logprobs float32 [B, R]: each token's log probability under the distribution it was drawn from (after
    suppression, temperature, top-k and top-p; 0 where the mask is 0), for the sampler-vs-trainer check."""

    tokens: jax.Array
    mask: jax.Array
    logprobs: jax.Array


def init_kv(config: MistralConfig, batch: int, lengths: Sequence[int]):
    """An empty KV cache in compute dtype, in blocks of `lengths` consecutive positions (see `model.apply`):
    {'k': [[L, B, K, n, H] per block], 'v': [[L, B, K, H, n] per block]} for stacked layers, else a list of
    L such dicts with L = 1 (one buffer per layer and block, updated in place)."""
    c = config
    L = c.num_hidden_layers if c.scan_layers else 1
    K, H = c.num_key_value_heads, c.head_dim
    block = lambda shape: shard_as(jnp.zeros(shape, c.compute_dtype), None, BATCH, "tensor", None, None)
    layer = lambda: {
        "k": [block((L, batch, K, n, H)) for n in lengths],
        "v": [block((L, batch, K, H, n)) for n in lengths],
    }
    return layer() if c.scan_layers else [layer() for _ in range(c.num_hidden_layers)]


def rollout_layout(config: MistralConfig, on: backend.Backend) -> MistralConfig:
    """The config of the actor's copy that sampling runs on, on backend `on` (`backend.of(platform)`).

    Params in compute dtype and one array per layer: decoding reads every weight once per token, and slicing a
    layer out of stacked weights inside the loop costs a copy of it on CPU (compile time then grows with depth,
    for the rollout programs only). The MLP down projection's orientation is the backend's
    (`Backend.transposed_down`).
    """
    return config.replace(param_dtype=config.compute_dtype, scan_layers=False, transposed_down=on.transposed_down)


def rollout_params(layout: MistralConfig, params: Params) -> Params:
    """A copy of `params` (stacked or per layer, down either way round) laid out as `layout` says.

    `layout` is normally `rollout_layout(config, backend)`; the copy is built fresh, the caller's params stay
    as they were. Its dtype is layout.param_dtype, its layers stacked iff layout.scan_layers, its MLP down
    projections `down` [F, D] or, with layout.transposed_down, `down_t` [D, F].
    """
    copy = jax.tree.map(lambda a: a.astype(layout.param_dtype), params)
    if "layers" in copy and not layout.scan_layers:
        copy = model.unstack_layers(copy)
    elif "layers" not in copy and layout.scan_layers:
        copy = model.stack_layers(copy)
    for layer in [v for k, v in copy.items() if k == "layers" or k.startswith("layers_")]:
        mlp = layer["mlp"]  # tree.map and (un)stacking built fresh dicts
        if layout.transposed_down and "down" in mlp:
            mlp["down_t"] = jnp.swapaxes(mlp.pop("down"), -1, -2)  # [(L,) F, D] -> [(L,) D, F]
        elif not layout.transposed_down and "down_t" in mlp:
            mlp["down"] = jnp.swapaxes(mlp.pop("down_t"), -1, -2)
    return copy


def filter_logits(logits: jax.Array, sampling: SamplingConfig) -> jax.Array:
    """Suppression, temperature, top-k and top-p on float32 logits [B, V]; removed entries become -inf."""
    if sampling.suppress_token_ids:
        logits = logits.at[:, jnp.asarray(sampling.suppress_token_ids)].set(-jnp.inf)
    if sampling.temperature == 0:
        return logits
    logits = logits / sampling.temperature
    if sampling.top_k:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1:
        desc = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(desc, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (the top token always survives).
        before = jnp.cumsum(probs, axis=-1) - probs
        kept = jnp.where(before < sampling.top_p, desc, jnp.inf)
        threshold = jnp.min(kept, axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return logits


def sample_token(logits: jax.Array, rng: jax.Array, sampling: SamplingConfig) -> jax.Array:
    """int32 [B] drawn from float32 logits [B, V] (argmax when temperature is 0)."""
    return draw(logits, rng, sampling)[0]


def draw(logits: jax.Array, rng: jax.Array, sampling: SamplingConfig) -> tuple[jax.Array, jax.Array]:
    """(token int32 [B], its log probability float32 [B]) drawn from float32 logits [B, V] as `sampling` says
    (argmax when temperature is 0; its logprob is then that of the filtered, unscaled logits)."""
    logits = filter_logits(logits, sampling)
    if sampling.temperature == 0:
        token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return token, jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), token[:, None], -1)[:, 0]
    # Inverse-CDF sampling: one uniform per row instead of a Gumbel draw per vocab entry (32000 random
    # numbers per row per step cost more than the sampling itself), and two levels of it: pick a block of
    # the vocabulary by the running sum of block masses, then a token inside it. A flat cumsum over the
    # vocabulary cost a noticeable share of a CPU decode step (README); the two levels touch each probability once.
    probs = jax.nn.softmax(logits, axis=-1)  # [B, V]
    B, V = probs.shape
    blocks = -(-V // _SAMPLE_BLOCK)
    p = jnp.pad(probs, ((0, 0), (0, blocks * _SAMPLE_BLOCK - V))).reshape(B, blocks, _SAMPLE_BLOCK)
    block_cdf = jnp.cumsum(jnp.sum(p, axis=-1), axis=-1)  # [B, blocks]
    u = jax.random.uniform(rng, (B, 1)) * block_cdf[:, -1:]
    block = jnp.argmax(block_cdf > u, axis=-1)  # u < the total, so some block holds it
    start = jnp.where(block > 0, jnp.take_along_axis(block_cdf, jnp.maximum(block - 1, 0)[:, None], -1)[:, 0], 0.0)
    inside = jnp.take_along_axis(p, block[:, None, None], axis=1)[:, 0]  # [B, block size]
    hit = start[:, None] + jnp.cumsum(inside, axis=-1) > u
    # Summed in another order, the block's own running sum can fall a rounding error short of u:
    # then its last token with any probability is the one u lies in.
    last = _SAMPLE_BLOCK - 1 - jnp.argmax(inside[:, ::-1] > 0, axis=-1)
    offset = jnp.where(jnp.any(hit, axis=-1), jnp.argmax(hit, axis=-1), last)
    # The drawn token's probability, read from the block already gathered: no second pass over the vocabulary.
    chosen = jnp.take_along_axis(inside, offset[:, None], axis=-1)[:, 0]
    return (block * _SAMPLE_BLOCK + offset).astype(jnp.int32), jnp.log(chosen)


_SAMPLE_BLOCK = 256


# Decode steps run in chunks, each one scan compiled at its own static attention length (the cache as filled by
# its last step), so a step reads the filled part of the cache plus under a chunk, not every allocated position.
# More chunks read less but compile the decode step once more each: at most MAX_DECODE_CHUNKS of them.
DECODE_CHUNK = 128
MAX_DECODE_CHUNKS = 8


def decode_chunks(new_tokens: int, chunk: int = DECODE_CHUNK) -> list[tuple[int, int]]:
    """The decode steps 1 .. new_tokens - 1 (step t feeds token t - 1 back and samples token t) as chunks
    [first, end) of `chunk` steps, or of new_tokens / MAX_DECODE_CHUNKS where that is more."""
    size = max(chunk, -(-(new_tokens - 1) // MAX_DECODE_CHUNKS))
    return [(first, min(first + size, new_tokens)) for first in range(1, new_tokens, size)]


def decode(
    params, prompt_ids, prompt_mask, rng, *, config, max_new_tokens, sampling, eos_token_ids, pad_id, chunk=DECODE_CHUNK
) -> tuple[Rollout, jax.Array]:
    """`sample`, plus the number of decode steps that ran the model: int32 [], max_new_tokens - 1 unless every
    row had stopped (EOS not suppressed) before a chunk began, which then runs no model step."""
    B, P = prompt_ids.shape
    R = max_new_tokens
    chunks = decode_chunks(R, chunk)
    S = P + R - 1  # the last sampled token is never fed back
    prompt_pos = model.positions_from_mask(prompt_mask)
    key_mask = jnp.zeros((B, S), jnp.int32).at[:, :P].set(prompt_mask)  # [B, S]
    key_pos = jnp.zeros((B, S), jnp.int32).at[:, :P].set(prompt_pos)
    # One cache block for the prompt and one per chunk, holding the keys that chunk's steps write.
    kv = init_kv(config, B, [P] + [end - begin for begin, end in chunks])
    hidden, kv = model.apply(config, params, prompt_ids, prompt_pos, prompt_pos, prompt_mask, kv, 0, head=False)
    # Left padding puts every row's last real token in the last column.
    logits = model.head_output(config, params, hidden[:, -1])  # [B, V]
    rngs = jax.random.split(rng, R)
    eos = jnp.asarray(eos_token_ids or (-1,), jnp.int32)
    # With every EOS id suppressed no row can stop: then no test between chunks (PPO's rollout).
    can_stop = any(e not in sampling.suppress_token_ids for e in eos_token_ids)
    alive_after = lambda token, alive: alive * (1 - jnp.isin(token, eos).astype(jnp.int32))  # past token [B]

    def step(carry, t, begin, end):
        """Feeds token t - 1 back and samples token t, in the chunk [begin, end) of steps: its keys go into
        that chunk's cache block, and attention reads the blocks up to that one (P + end - 1 positions)."""
        token, logprob, alive, next_pos, key_mask, key_pos, kv = carry
        slot = P + t - 1  # where the previous token's keys go
        key_mask = jax.lax.dynamic_update_slice(key_mask, jnp.ones((B, 1), jnp.int32), (0, slot))
        key_pos = jax.lax.dynamic_update_slice(key_pos, next_pos[:, None], (0, slot))
        attend = P + end - 1
        hidden, kv = model.apply(
            config,
            params,
            token[:, None],
            next_pos[:, None],
            key_pos[:, :attend],
            key_mask[:, :attend],
            kv,
            t - begin,
            head=False,
        )
        new, new_logprob = draw(model.head_output(config, params, hidden[:, 0]), rngs[t], sampling)
        return (
            (new, new_logprob, alive_after(token, alive), next_pos + 1, key_mask, key_pos, kv),
            (token, logprob, alive),
        )

    def stopped(carry, t):
        """Every row has stopped: the last token keeps its flag, the slots after it are masked; no model call."""
        token, logprob, alive, *rest = carry
        return (token, logprob, alive * 0, *rest), (token, logprob, alive)

    carry = (*draw(logits, rngs[0], sampling), jnp.ones((B,), jnp.int32), prompt_pos[:, -1] + 1, key_mask, key_pos, kv)
    outputs, ran = [], jnp.int32(0)  # per chunk: (tokens, logprobs, mask), each [steps, B]
    for begin, end in chunks:
        steps = jnp.arange(begin, end)
        run = lambda c, steps=steps, begin=begin, end=end: jax.lax.scan(lambda c, t: step(c, t, begin, end), c, steps)
        if can_stop:
            running = jnp.any(alive_after(carry[0], carry[2]) > 0)
            carry, out = jax.lax.cond(running, run, lambda c, steps=steps: jax.lax.scan(stopped, c, steps), carry)
            ran += jnp.where(running, end - begin, 0)
        else:
            carry, out = run(carry)
            ran += end - begin
        outputs.append(out)
    # Each output's chunks, then the last sampled token's entry from the carry: [B, R].
    tokens, logprobs, mask = (
        jnp.concatenate([*parts, last[None]], axis=0).T
        for parts, last in zip(list(zip(*outputs)) or [()] * 3, carry[:3])
    )
    return Rollout(
        tokens=jnp.where(mask > 0, tokens, pad_id), mask=mask, logprobs=jnp.where(mask > 0, logprobs, 0.0)
    ), ran


def sample(params, prompt_ids, prompt_mask, rng, **settings) -> Rollout:
    """The compiled body of `generate` (validated arguments; `settings` are decode's keyword arguments, static).

    Decoding reads only the filled part of the KV cache (give or take a chunk) and, where EOS may be sampled,
    ends once every row has stopped; the outputs keep their static shape [B, max_new_tokens].
    """
    return decode(params, prompt_ids, prompt_mask, rng, **settings)[0]


_generate = jax.jit(sample, static_argnames=("config", "max_new_tokens", "sampling", "eos_token_ids", "pad_id"))


def _sample_loaded(params, prompt_ids, prompt_mask, rng, *, config, **settings) -> Rollout:
    """`sample` on params in any layout (as loaded): the rollout copy for `config` is made inside the program,
    once per call, before the decode loop."""
    return sample(rollout_params(config, params), prompt_ids, prompt_mask, rng, config=config, **settings)


_generate_loaded = jax.jit(
    _sample_loaded, static_argnames=("config", "max_new_tokens", "sampling", "eos_token_ids", "pad_id")
)


def check_lengths(config: MistralConfig, batch: int, prompt_len: int, max_new_tokens: int) -> None:
    """A RolloutError, before anything compiles, when prompt + response is longer than the model's positions
    or its KV cache alone would not fit in one device's memory (XLA would abort the process instead)."""
    total = prompt_len + max_new_tokens
    if total > config.max_position_embeddings:
        raise RolloutError(
            f"max_new_tokens={max_new_tokens}: prompt ({prompt_len}) + response = {total} tokens is "
            f"more than the model's {config.max_position_embeddings} positions"
        )
    cache = (
        2
        * config.num_hidden_layers
        * batch
        * total
        * config.num_key_value_heads
        * config.head_dim
        * jnp.dtype(config.compute_dtype).itemsize
    )
    device = jax.local_devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    limit = (stats or {}).get("bytes_limit") or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if cache > limit:
        raise RolloutError(
            f"max_new_tokens={max_new_tokens}: the KV cache for {batch} x {total} tokens needs "
            f"{cache / 2**30:.1f} GiB, more than the {limit / 2**30:.1f} GiB of {device.platform} memory"
        )


def generate(
    config: MistralConfig,
    params: Params,
    prompt_ids,
    prompt_mask,
    rng,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    suppress_token_ids: Sequence[int] = (),
    eos_token_ids: Sequence[int] | None = None,
    pad_id: int | None = None,
) -> Rollout:
    """Samples exactly `max_new_tokens` tokens after left-padded prompts.

    prompt_ids, prompt_mask: int [B, P], P a prompt bucket, every row with >= 1 real
    token; max_new_tokens: a response bucket. EOS ids default to the config's;
    `suppress_token_ids` are never sampled (the Coarse Actor passes EOS and stop
    tokens, so every response runs to the limit). One compilation per
    (B, P, max_new_tokens, sampling settings).

    params may be as `hf.load_pretrained` returns them (config their config): the program then makes the
    rollout copy (`rollout_layout` for this backend) itself, once per call, and decodes on it. Callers that
    sample many batches from one set of weights (the coarse job, the tools) make the copy once with
    `rollout_params(rollout_layout(...), params)` and pass it with its layout config.
    """
    prompt_ids, prompt_mask = jnp.asarray(prompt_ids, jnp.int32), jnp.asarray(prompt_mask, jnp.int32)
    if prompt_ids.ndim != 2 or prompt_ids.shape != prompt_mask.shape:
        raise RolloutError(f"prompt_ids {prompt_ids.shape} and prompt_mask {prompt_mask.shape} must be equal [B, P]")
    if max_new_tokens < 1:
        raise RolloutError(f"max_new_tokens={max_new_tokens} must be >= 1")
    check_lengths(config, *prompt_ids.shape, max_new_tokens)
    if not bool(jnp.all(prompt_mask[:, -1] == 1)):
        raise RolloutError("prompts must be left-padded: every row's last column must be a real token")
    sampling = SamplingConfig(
        float(temperature), int(top_k), float(top_p), tuple(sorted(int(t) for t in suppress_token_ids))
    )
    eos = tuple(config.eos_token_ids if eos_token_ids is None else eos_token_ids)
    if pad_id is None:
        pad_id = config.pad_token_id if config.pad_token_id is not None else 0
    layout = rollout_layout(config, backend.of(jax.default_backend()))
    program = _generate if config == layout else _generate_loaded
    return program(
        params,
        prompt_ids,
        prompt_mask,
        rng,
        config=layout,
        max_new_tokens=int(max_new_tokens),
        sampling=sampling,
        eos_token_ids=eos,
        pad_id=int(pad_id),
    )
