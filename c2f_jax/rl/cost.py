"""What one coarse iteration costs: FLOPs and bytes moved per program, counted from the model's shapes, and the
time that makes on named hardware.

XLA's cost analysis counts a loop body once, not once per trip (the decode loop, the layer scan, the minibatch
scan), so the counts here are analytic; tests/test_cost.py checks them against XLA's on programs without loops.
Rollout time follows bandwidth (every decode step reads every weight), the update's follows FLOPs.
"""

from __future__ import annotations

import dataclasses

from c2f_jax.model.model import MistralConfig

# Peak dense bf16 FLOP/s and HBM bandwidth (bytes/s), per chip, from the vendors' data sheets (NVIDIA A100 and
# H100 SXM, Google Cloud TPU v5p).
HARDWARE = {
    "A100-40GB": (312e12, 1.555e12),
    "A100-80GB": (312e12, 2.039e12),
    "H100": (989e12, 3.35e12),
    "v5p": (459e12, 2.765e12),
}
# The fractions of those peaks that our programs reach, from one run: an H100 at ~1B parameters gave 61% of the
# bandwidth bound in the rollout and 29.7% MFU in the update. One model size on one card: a weak calibration.
ROLLOUT_BANDWIDTH_EFFICIENCY = 0.61
UPDATE_MFU = 0.297


def _body_params(c: MistralConfig) -> int:
    """Parameters of the matmuls a token goes through below the head (embedding lookups cost no FLOPs)."""
    attn = c.hidden_size * c.head_dim * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)
    mlp = 3 * c.hidden_size * c.intermediate_size
    return c.num_hidden_layers * (attn + mlp)


def _attention_flops(c: MistralConfig, keys: int) -> int:
    """Per query token, forward: scores and the weighted sum over `keys` positions, every layer and head."""
    return 4 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * keys


def forward_flops(c: MistralConfig, batch: int, length: int, head_positions: int) -> int:
    """One forward pass over [batch, length] (attention over all `length` keys, as the model computes it), with
    the head (LM head, or a value/score head) at `head_positions` positions per row."""
    head = c.hidden_size * (c.vocab_size if c.has_lm_head else c.num_labels)
    return batch * (length * (2 * _body_params(c) + _attention_flops(c, length)) + head_positions * 2 * head)


@dataclasses.dataclass(frozen=True)
class ProgramCost:
    flops: float
    bytes: float  # moved to and from memory, per device


def iteration_cost(
    actor: MistralConfig,
    critic: MistralConfig,
    reference: MistralConfig,
    reward: MistralConfig,
    batch: int,
    prompt: int,
    response: int,
    epochs: int,
    minibatches: int,
    devices: int,
) -> dict[str, ProgramCost]:
    """{program: cost} of one coarse iteration (the job's programs, rollout at `response` tokens), FLOPs summed
    over all devices, bytes per device.

    rollout: a prefill of the prompt, then `response` decode steps, each reading the whole rollout copy (compute
    dtype, every device holds it whole) and its KV cache. reward_score: one forward. ppo_iteration: forward
    passes of actor, critic and reference (the first minibatch's training forward is the scoring one; every
    other minibatch step runs its own), and per epoch backward passes of actor and critic at twice their
    forward: 6 x params x tokens per trained token.
    The token-logprob head's backward recomputes its logits: 8 x head params per response token, not 6.
    """
    seq = prompt + response
    width = 2 if actor.compute_dtype == "bfloat16" else 4
    weights = sum_params(actor) * width
    kv_per_token = 2 * actor.num_hidden_layers * actor.num_key_value_heads * actor.head_dim * width
    rows = batch / devices
    decode_bytes = response * weights + rows * kv_per_token * sum(prompt + t for t in range(response))
    decode_flops = sum(
        batch * (2 * (_body_params(actor) + actor.hidden_size * actor.vocab_size) + _attention_flops(actor, prompt + t))
        for t in range(response)
    )
    rollout = ProgramCost(forward_flops(actor, batch, prompt, 1) + decode_flops, decode_bytes + weights)

    score = forward_flops(reward, batch, seq, 1)
    train = [(actor, response), (critic, response)]
    forwards = sum(forward_flops(c, batch, seq, heads) for c, heads in train)
    backwards = 2 * forwards + 2 * batch * response * actor.hidden_size * actor.vocab_size
    update = (
        forwards
        + forward_flops(reference, batch, seq, response)
        + epochs * backwards
        + (epochs - 1 / minibatches) * forwards
    )
    train_bytes = sum(sum_params(c) * 4 * 3 for c, _ in train) / devices  # fp32 masters and two moments
    return {
        "rollout": rollout,
        "reward_score": ProgramCost(score, sum_params(reward) * width / devices),
        "ppo_iteration": ProgramCost(update, train_bytes * (1 + epochs)),
    }


def sum_params(c: MistralConfig) -> int:
    head = c.hidden_size * (c.vocab_size if c.has_lm_head else c.num_labels)
    norms = (2 * c.num_hidden_layers + 1) * c.hidden_size
    return _body_params(c) + c.vocab_size * c.hidden_size + head + norms


def seconds(costs: dict[str, ProgramCost], hardware: str, devices: int) -> dict[str, float]:
    """Estimated seconds per program on `devices` chips of `hardware`: the rollout at the bandwidth bound, the
    others at the FLOP bound, each divided by its measured efficiency."""
    flops, bandwidth = HARDWARE[hardware]
    return {
        name: (
            cost.bytes / (bandwidth * ROLLOUT_BANDWIDTH_EFFICIENCY)
            if name == "rollout"
            else cost.flops / (devices * flops * UPDATE_MFU)
        )
        for name, cost in costs.items()
    }
