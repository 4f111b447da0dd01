"""PPO against the optimum it is defined by: tiny problems whose KL-regularised optimum is known exactly.

  python scripts/ppo_optimum.py [--case bandit sequence] [--estimator k1 k3] [--steps N] [--every K] [--out DIR]

For a policy pi over responses y to a context x, PPO with per-token reward
-beta * k1 and the reward model's score r(x, y) on the last token (gamma = lam = 1)
maximises J(pi) = E_pi[r] - beta * KL(pi || pi_ref), whose maximiser is
pi*(y|x) ~ pi_ref(y|x) exp(r(x, y) / beta), with J* = beta * log E_ref[exp(r / beta)].

Two problems, each a real coarse run (`coarse.run_coarse`: HF folders for the base and
the reward model, a JSONL dataset, the compiled rollout, scoring and update, Orbax
checkpoints) over a 5-token action vocabulary and four contexts:
  bandit    one response token; the base's next-token distribution is set by solving
            its LM head, the reward model's score head is solved so r depends on the
            token alone;
  sequence  three response tokens (125 responses per context), a random base and a
            random reward model: r depends on the whole response, so the KL shaping,
            GAE and the critic must carry credit back across tokens.
The trained actor is measured exactly: every response's probability from its logits,
never from samples. Prints J against J* every K iterations, the share of the gap
J* - J(pi_ref) closed and the total variation to pi*. With k3 as the reward penalty
the fixed point is not pi*: the table shows where it lands.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
WORDS = ("a", "b", "c", "d", "e")  # the actions: ids 3..7; 0-2 are unk, bos, eos (suppressed when sampling)
VOCAB = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: 3 + i for i, w in enumerate(WORDS)}}
CONTEXTS = (("a", "b"), ("c", "a"), ("e", "d"), ("b", "b"))
COPIES = 32  # prompt texts per context: they differ in a word the tokenizer maps to <unk>, so they tokenize alike
BATCH = 128
BETA = 0.5  # the KL coefficient: the optimum moves far from pi_ref (TV 0.36-0.5) yet keeps every response


@dataclasses.dataclass(frozen=True)
class Problem:
    name: str
    response_len: int
    base: Path  # HF MistralForCausalLM folder with the tokenizer
    reward: Path  # HF MistralForSequenceClassification folder
    data: Path  # JSONL with chosen/rejected HH transcripts (only the prompts matter to PPO)
    actor_lr: float  # falling linearly to 0 over the run: a constant lr leaves the policy jittering around pi*
    epochs: int
    minibatches: int


def _tokenizer():
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    tk = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def _config(architecture: str, hidden: int):
    from c2f_jax.model.config import MistralConfig

    return MistralConfig(
        vocab_size=len(VOCAB),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        sliding_window=None,
        max_position_embeddings=64,
        architecture=architecture,
    )


def prompts() -> list[str]:
    """COPIES prompt texts per context, in HH format."""
    return [f"\n\nHuman: {' '.join(ctx)} q{k}\n\nAssistant:" for ctx in CONTEXTS for k in range(COPIES)]


def context_ids(tok) -> np.ndarray:
    """int32 [contexts, P]: each context's prompt tokens (all its texts tokenize alike)."""
    from c2f_jax import data

    ids = [data.tokenize_prompt(tok, p) for p in prompts()[::COPIES]]
    assert all(data.tokenize_prompt(tok, p) == ids[i // COPIES] for i, p in enumerate(prompts()))
    return np.array(ids, np.int32)


def responses(length: int) -> np.ndarray:
    """int32 [5^length, length]: every response over the action tokens."""
    return np.array(list(itertools.product(range(3, 3 + len(WORDS)), repeat=length)), np.int32)


def _hidden_at_last(config, params, ids: np.ndarray) -> np.ndarray:
    """Final-norm hidden states at the last position, float64 [N, D]: what the head multiplies."""
    import jax.numpy as jnp

    from c2f_jax.model import model

    hidden = model.hidden_states(config, params, jnp.asarray(ids), jnp.ones(ids.shape, jnp.int32))
    return np.asarray(hidden[:, -1], np.float64)


def _random_params(config, seed: int, scale: float = 5.0) -> dict:
    """model.init_params with every weight but the norms scaled up (float64 NumPy): at the init's 0.02 the
    contexts' last hidden states are nearly parallel, and a head solved to tell them apart becomes huge."""
    import jax

    from c2f_jax.model import model

    params = model.init_params(config, jax.random.key(seed))
    return jax.tree_util.tree_map_with_path(
        lambda path, a: np.asarray(a, np.float64) * (1.0 if "norm" in jax.tree_util.keystr(path) else scale), params
    )


def _save(folder: Path, config, params, tok) -> Path:
    from c2f_jax.model import hf

    hf.save_pretrained(folder, config, params, tokenizer_source=tok)
    return folder


def build(case: str, root: Path, seed: int = 0) -> Problem:
    """Writes the problem's base model, reward model and dataset under root/case."""
    import jax

    from c2f_jax.model import model

    folder = root / case
    folder.mkdir(parents=True, exist_ok=True)
    tok, rng = _tokenizer(), np.random.default_rng(seed)
    ctx = context_ids(tok)
    base_config, rm_config = _config(model.CAUSAL_LM, 32), _config(model.SEQ_CLS, 128)
    base, rm = _random_params(base_config, seed), _random_params(rm_config, seed + 1)
    R = 1 if case == "bandit" else 3
    ys = responses(R)
    if case == "bandit":
        # pi_ref set exactly: the LM head solved so the logits at each context's last position are chosen ones.
        target = rng.normal(0.0, 1.0, (len(ctx), len(VOCAB)))
        base["lm_head"] = np.linalg.lstsq(_hidden_at_last(base_config, base, ctx), target, rcond=None)[0]
        # r(x, a) = w[a] for every context: the score head solved over all 20 (context, token) sequences.
        w = rng.normal(0.0, 1.0, len(VOCAB))
        seqs = np.array([list(c) + [a] for c in ctx for a in ys[:, 0]], np.int32)
        rm["score"] = np.linalg.lstsq(_hidden_at_last(rm_config, rm, seqs), w[seqs[:, -1]][:, None], rcond=None)[0]
    else:
        base["lm_head"] = base["lm_head"] * 2.0  # random, neither near-uniform nor near-deterministic
        seqs = np.array([list(c) + list(y) for c in ctx for y in ys], np.int32)
        scores = _hidden_at_last(rm_config, rm, seqs) @ rm["score"]
        rm["score"] = rm["score"] / scores.std()  # r spread 1 over the responses
    base = jax.tree.map(lambda a: np.asarray(a, np.float32), base)
    rm = jax.tree.map(lambda a: np.asarray(a, np.float32), rm)
    _save(folder / "base", base_config, base, tok)
    _save(folder / "reward", rm_config, rm, tok)
    rows = [{"chosen": p + " a", "rejected": p + " b"} for p in prompts()]
    (folder / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return Problem(
        case, R, folder / "base", folder / "reward", folder / "prompts.jsonl", actor_lr=2e-3, epochs=2, minibatches=2
    )


def run_config(problem: Problem, estimator: str, steps: int, checkpoint_every: int, seed: int = 0):
    """The coarse job for `problem`: the paper's config with this problem's models, data and PPO settings."""
    from c2f_jax import train

    updates = steps * problem.epochs * problem.minibatches
    config, _ = train.parse_args(
        [
            "--config",
            str(ROOT / "configs" / "coarse.py"),
            f"--config.steps={steps}",
            f"--config.seed={seed}",
            f"--config.checkpoint_every={checkpoint_every}",
            f"--config.keep_checkpoints={steps}",
            f"--config.model.base={problem.base}",
            "--config.model.compute_dtype=float32",
            "--config.model.reference_dtype=float32",
            "--config.model.remat=none",
            f"--config.reward_model.path={problem.reward}",
            "--config.reward_model.dtype=float32",
            f"--config.data.source={problem.data}",
            "--config.data.data_dir=",
            "--config.data.system_prompt=",
            "--config.data.prompt_buckets=(8,)",
            f"--config.data.batch_size={BATCH}",
            "--config.mesh.data=1",
            "--config.mesh.fsdp=1",
            "--config.mesh.tensor=1",
            "--config.cm.mode=fixed",
            f"--config.cm.buckets=({problem.response_len},)",
            f"--config.ppo.kl_coef={BETA}",
            f"--config.ppo.kl_estimator={estimator}",
            "--config.ppo.gamma=1.0",
            "--config.ppo.lam=1.0",
            f"--config.ppo.epochs={problem.epochs}",
            f"--config.ppo.minibatches={problem.minibatches}",
            f"--config.ppo.actor.lr={problem.actor_lr}",
            "--config.ppo.actor.warmup_steps=0",
            f"--config.ppo.actor.decay_steps={updates}",
            "--config.ppo.critic.lr=3e-3",
            "--config.ppo.critic.warmup_steps=0",
        ]
    )
    return config


# ----------------------------------------------------------------------------- exact measurement


def response_logprobs(config, params, problem: Problem) -> np.ndarray:
    """log pi(y | x), float64 [contexts, responses], from the logits: the sampler's policy, i.e. softmax over the
    non-suppressed tokens (ids >= 3) at every response position."""
    import jax.numpy as jnp

    from c2f_jax.model import model

    ctx, ys = context_ids(_tokenizer()), responses(problem.response_len)
    P, R = ctx.shape[1], problem.response_len
    seqs = np.concatenate([np.repeat(ctx, len(ys), 0), np.tile(ys, (len(ctx), 1))], axis=1)
    logits = np.asarray(model.forward(config, params, jnp.asarray(seqs), jnp.ones(seqs.shape, jnp.int32)), np.float64)[
        :, P - 1 : P - 1 + R, 3:
    ]  # positions predicting the response; actions only
    logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    taken = np.take_along_axis(logp, (seqs[:, P:] - 3)[..., None], axis=-1)[..., 0]
    return taken.sum(-1).reshape(len(ctx), len(ys))


def rewards(problem: Problem) -> np.ndarray:
    """r(x, y) as the job scores it (the reward model at the last token), float64 [contexts, responses]."""
    import jax.numpy as jnp

    from c2f_jax.model import hf, model

    config, params = hf.load_pretrained(problem.reward, dtype="float32")
    ctx, ys = context_ids(_tokenizer()), responses(problem.response_len)
    seqs = np.concatenate([np.repeat(ctx, len(ys), 0), np.tile(ys, (len(ctx), 1))], axis=1)
    scores = model.sequence_scores(config, params, jnp.asarray(seqs), jnp.ones(seqs.shape, jnp.int32))[:, 0]
    return np.asarray(scores, np.float64).reshape(len(ctx), len(ys))


def objective(logp: np.ndarray, ref_logp: np.ndarray, r: np.ndarray, beta: float = BETA) -> float:
    """J(pi) = E_x E_pi[r - beta * log(pi / pi_ref)], contexts equally likely."""
    p = np.exp(logp)
    return float(np.mean(np.sum(p * (r - beta * (logp - ref_logp)), axis=-1)))


def optimum(ref_logp: np.ndarray, r: np.ndarray, beta: float = BETA) -> tuple[np.ndarray, float]:
    """(log pi* [contexts, responses], J*)."""
    tilted = ref_logp + r / beta
    log_z = np.logaddexp.reduce(tilted, axis=-1, keepdims=True)
    return tilted - log_z, float(np.mean(beta * log_z))


def total_variation(logp: np.ndarray, other: np.ndarray) -> float:
    """TV between the joint distributions over (context, response), contexts equally likely."""
    return float(np.mean(0.5 * np.sum(np.abs(np.exp(logp) - np.exp(other)), axis=-1)))


@dataclasses.dataclass(frozen=True)
class Measure:
    J: float
    J_ref: float
    J_star: float
    gap_closed: float  # (J - J_ref) / (J* - J_ref)
    tv: float  # to pi*
    tv_ref: float  # pi_ref to pi*


def measure(logp: np.ndarray, ref_logp: np.ndarray, r: np.ndarray) -> Measure:
    star_logp, J_star = optimum(ref_logp, r)
    J, J_ref = objective(logp, ref_logp, r), objective(ref_logp, ref_logp, r)
    return Measure(
        J,
        J_ref,
        J_star,
        (J - J_ref) / (J_star - J_ref),
        total_variation(logp, star_logp),
        total_variation(ref_logp, star_logp),
    )


def base_logprobs(problem: Problem) -> np.ndarray:
    from c2f_jax.model import hf

    return response_logprobs(*hf.load_pretrained(problem.base, dtype="float32"), problem)


# ----------------------------------------------------------------------------- the curve


def curve(problem: Problem, estimator: str, workdir: Path, steps: int, every: int) -> list[tuple[int, Measure]]:
    """Trains, then measures the actor of every checkpoint (step 0: the base)."""
    from c2f_jax.jobs import coarse
    from c2f_jax.model import export

    coarse.run_coarse(run_config(problem, estimator, steps, every), workdir, show_progress=False)
    ref_logp, r = base_logprobs(problem), rewards(problem)
    points = [(0, measure(ref_logp, ref_logp, r))]
    for step in range(every, steps + 1, every):
        config, params, _ = export.load_model(workdir, step)
        points.append((step, measure(response_logprobs(config, params, problem), ref_logp, r)))
    return points


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", nargs="+", choices=("bandit", "sequence"), default=["bandit", "sequence"])
    p.add_argument("--estimator", nargs="+", choices=("k1", "k3"), default=["k1", "k3"])
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--every", type=int, default=10, help="measure every K iterations")
    p.add_argument("--out", default="runs/ppo_optimum", help="folder for the problems and the runs")
    args = p.parse_args(argv)
    from c2f_jax.runtime import cli

    if args.steps < 1 or args.every < 1 or args.steps % args.every:
        raise cli.UsageError(f"--steps={args.steps} must be a positive multiple of --every={args.every}")
    out = Path(args.out)
    if out.exists():
        raise cli.UsageError(f"--out {out}: already exists (runs are never overwritten)")
    summary = []
    for case in args.case:
        problem = build(case, out / "problems")
        for estimator in args.estimator:
            points = curve(problem, estimator, out / f"{case}-{estimator}", args.steps, args.every)
            print(
                f"\n{case}, {estimator} (beta {BETA}, {problem.response_len} response tokens, "
                f"{len(CONTEXTS)} contexts; TV(pi_ref, pi*) = {points[0][1].tv_ref:.3f})"
            )
            print("| step | J | J* | gap closed | TV to pi* |\n|---|---|---|---|---|")
            for step, m in points:
                print(f"| {step} | {m.J:.4f} | {m.J_star:.4f} | {m.gap_closed:.3f} | {m.tv:.3f} |")
            summary.append((case, estimator, points[-1][1]))
    print("\n| case | estimator | J(pi_ref) | J | J* | gap closed | TV to pi* | TV(pi_ref, pi*) |")
    print("|---|---|---|---|---|---|---|---|")
    for case, estimator, m in summary:
        print(
            f"| {case} | {estimator} | {m.J_ref:.4f} | {m.J:.4f} | {m.J_star:.4f} | {m.gap_closed:.3f} | "
            f"{m.tv:.3f} | {m.tv_ref:.3f} |"
        )
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    from c2f_jax.runtime import cli

    cli.run(main)
