"""Sample responses from an HF Mistral folder (or a tiny random model) with the compiled rollout.

  c2f-generate --model DIR --prompt "Why is the sky blue?" --max-new-tokens 64
  c2f-generate --model DIR --prompts-file prompts.txt --out responses.jsonl --suppress-eos
  c2f-generate --tiny --prompt "Hi" --suppress-eos      # random tiny model, bundled tokenizer

A prompts file holds one prompt per line (.txt) or objects with a "prompt" field (.jsonl).
Prompts are wrapped as HH dialogues ("Human: ... Assistant:"), behind --system-prompt if given.
"""

from __future__ import annotations

import argparse
import json
import sys

import jax

from c2f_jax.eval import evaluate
from c2f_jax.model import model, tokenizer
from c2f_jax.model.config import float_dtype
from c2f_jax.rl import rollout
from c2f_jax.runtime import cli, workdir


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="HF folder (config.json, safetensors, tokenizer) or a training workdir")
    src.add_argument("--tiny", action="store_true", help="a random tiny Mistral with the bundled v0.1 tokenizer")
    text = p.add_mutually_exclusive_group(required=True)
    text.add_argument("--prompt", help="one prompt")
    text.add_argument("--prompts-file", help=".txt (a prompt per line) or .jsonl (a 'prompt' field per line)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="response length bucket (default 128)")
    cli.add_sampling_args(p, temperature=1.0)
    p.add_argument("--prompt-buckets", default="64,128,256,512,1024", help="comma-separated prompt lengths")
    p.add_argument("--truncate", action="store_true", help="keep the end of prompts longer than the largest bucket")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", default="float32", help="compute dtype (float32 or bfloat16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write JSONL here instead of printing text")
    cli.add_overwrite_arg(p)
    return p.parse_args(argv)


def load_model(args) -> evaluate.Loaded:
    if args.tiny:
        config = model.TINY.replace(compute_dtype=args.dtype)
        return evaluate.Loaded(
            config, model.init_params(config, jax.random.key(args.seed)), tokenizer.load_tokenizer(None), "tiny"
        )
    loaded = evaluate.load_model(args.model, args.dtype)
    if not loaded.config.has_lm_head:
        raise cli.UsageError(f"{args.model}: is a {loaded.config.architecture}; generation needs MistralForCausalLM")
    return loaded


def main(argv=None) -> int:
    args = parse_args(argv)
    if min(args.batch_size, args.max_new_tokens) < 1:
        raise cli.UsageError(f"--batch-size={args.batch_size} and --max-new-tokens={args.max_new_tokens} must be >= 1")
    float_dtype(args.dtype, "--dtype")
    buckets = cli.positive_ints(args.prompt_buckets, "--prompt-buckets")
    rollout.SamplingConfig(args.temperature, args.top_k, args.top_p)  # its range checks, before the model loads
    if args.out:
        workdir.check_output(
            args.out,
            {"--model": args.model, "--prompts-file": args.prompts_file},
            overwrite=args.overwrite,
            folder=False,
        )
    system = tokenizer.system_prompt(args.system_prompt)
    prompts = [args.prompt] if args.prompt is not None else evaluate.read_prompts(args.prompts_file)
    gens = evaluate.sample_responses(
        load_model(args),
        prompts,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        suppress_eos=args.suppress_eos,
        system_prompt=system,
        batch_size=args.batch_size,
        buckets=buckets,
        truncate=args.truncate,
        seed=args.seed,
    )
    records = [
        {
            "prompt": g["prompt"],
            "response": g["response"],
            "num_tokens": len(g["tokens"]) + g["ended_with_eos"],
            "ended_with_eos": g["ended_with_eos"],
        }
        for g in gens
    ]
    if args.out:
        workdir.write_text(args.out, "".join(json.dumps(r) + "\n" for r in records), overwrite=args.overwrite)
    else:
        for r in records:
            print(f"### {r['prompt']}\n{r['response']}\n", file=sys.stdout)
    return 0


def command() -> None:
    """`c2f-generate`: main() on the command line, bad input as one line and exit status 2."""
    cli.run(main)


if __name__ == "__main__":
    command()
