"""Evaluate policies side by side: reward, length, EOS rate, repetition, distinct-n, perplexity, and lm-eval tasks.

  c2f-evaluate --model runs/demo --model runs/sft_model --reward-model runs/demo/reward_model \
      --prompts prompts.txt --max-new-tokens 64 --json eval.json
  c2f-evaluate --model DIR --tasks arc_easy,hellaswag:10     # + lm-eval task columns (c2f-jax model)

A --model is an HF folder or a training workdir (its latest actor, or --step N).
Prompts: a .txt file (one per line) or .jsonl ('prompt' field); default the distinct
prompts of the bundled sample's held-out 10% (held out from scripts/sft.py; a coarse run
samples every prompt of its file). Perplexity is of the chosen answers of --preferences
(default those held-out pairs; 'none' to skip). Greedy decoding by
default, EOS allowed, so the numbers are deterministic and show whether a model stops.
Prints a Markdown table; --json writes the numbers per model (and --generations the texts).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from c2f_jax.eval import evaluate
from c2f_jax.model import tokenizer
from c2f_jax.model.config import float_dtype
from c2f_jax.runtime import cli, distributed, workdir


def add_eval_args(p: argparse.ArgumentParser) -> None:
    """The options evaluate.py and sweep.py share."""
    p.add_argument("--reward-model", help="HF folder or reward-run workdir of a reward model (scores responses)")
    p.add_argument("--prompts", help=".txt or .jsonl prompts (default: the bundled sample's held-out prompts)")
    p.add_argument("--limit", type=int, default=32, help="at most this many default prompts/pairs (default 32)")
    p.add_argument(
        "--preferences",
        default="bundled",
        help="preference file whose held-out chosen answers give perplexity ('none' to skip)",
    )
    p.add_argument("--max-new-tokens", type=int, default=64, help="response length bucket (default 64)")
    cli.add_sampling_args(p, temperature=0.0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", default="float32", help="compute dtype")
    p.add_argument("--seed", type=int, default=0)


def settings_from(args) -> evaluate.EvalSettings:
    if min(args.batch_size, args.max_new_tokens, args.limit) < 1:
        raise cli.UsageError(
            f"--batch-size={args.batch_size}, --max-new-tokens={args.max_new_tokens} and "
            f"--limit={args.limit} must be >= 1"
        )
    float_dtype(args.dtype, "--dtype")
    system = tokenizer.system_prompt(args.system_prompt)
    return evaluate.EvalSettings(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        suppress_eos=args.suppress_eos,
        system_prompt=system,
        batch_size=args.batch_size,
        seed=args.seed,
    )


def input_paths(args) -> list[tuple[str, str]]:
    """Every path the evaluation (or sweep) reads, with its flag: no output may be, be inside or contain one."""
    flags = [("--model", m) for m in getattr(args, "model", None) or ()]
    flags += [
        (f"--{k.replace('_', '-')}", getattr(args, k, None))
        for k in ("coarse", "sft", "reward_model", "prompts", "preferences")
    ]
    return [(flag, path) for flag, path in flags if path]


def inputs_from(args):
    """(prompts, preference pairs, reward model or None), checked before any model runs."""
    # Distinct prompts only: a repeated prompt would count its (greedy, identical) response twice.
    prompts = (
        evaluate.read_prompts(args.prompts)
        if args.prompts
        else list(dict.fromkeys(p.prompt for p in evaluate.held_out_pairs("bundled")))[: args.limit]
    )
    pairs = [] if args.preferences == "none" else evaluate.held_out_pairs(args.preferences, args.limit)
    rm = evaluate.load_model(args.reward_model, args.dtype) if args.reward_model else None
    return prompts, pairs, rm


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", required=True, help="HF folder or training workdir (repeatable)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step of workdir models (default latest)")
    add_eval_args(p)
    p.add_argument("--tasks", help="lm-eval tasks (name or name:shots, comma-separated, or 'paper') as more columns")
    p.add_argument("--task-limit", type=float, default=None, help="lm-eval's --limit: documents (or a share) per task")
    p.add_argument("--json", help="write {model: metrics} here")
    p.add_argument("--generations", help="write {model: [{prompt, response, ended_with_eos}]} here")
    cli.add_overwrite_arg(p)
    args = p.parse_args(argv)
    settings = settings_from(args)
    for flag in ("json", "generations"):
        if getattr(args, flag):
            workdir.check_output(getattr(args, flag), input_paths(args), f"--{flag}", args.overwrite, folder=False)
    for path in args.model:
        if not Path(path).is_dir():
            raise cli.UsageError(f"--model {path}: model folder not found")
    tasks = None
    if args.tasks:
        from c2f_jax.eval import lm_eval

        tasks = lm_eval.parse_tasks(args.tasks)
        lm_eval.check_tasks(tasks)
    prompts, pairs, rm = inputs_from(args)
    results = {}
    for path in args.model:
        loaded = evaluate.load_model(path, args.dtype, args.step if workdir.is_workdir(path) else None)
        results[path] = evaluate.evaluate_model(loaded, prompts, settings, rm, pairs)
        if tasks:
            lm = lm_eval.C2FJaxLM.from_params(
                loaded.config, loaded.params, loaded.tokenizer, path, batch_size=args.batch_size
            )
            scores, _ = lm_eval.run_tasks(lm, tasks, limit=args.task_limit)
            results[path]["metrics"].update({name: value for name, (_, value) in scores.items()})
        print(f"evaluated {path}", file=sys.stderr)
    if distributed.writes_here():
        print(evaluate.markdown_table({k: v["metrics"] for k, v in results.items()}))
    if args.json:
        evaluate.write_json(args.json, {k: v["metrics"] for k, v in results.items()}, args.overwrite)
    if args.generations:
        evaluate.write_json(args.generations, {k: v["generations"] for k, v in results.items()}, args.overwrite)
    return 0


def command() -> None:
    """`c2f-evaluate`: main() on the command line, bad input as one line and exit status 2."""
    cli.run(main)


if __name__ == "__main__":
    command()
