"""Knowledge Residue Merger: theta_fine = gamma * theta_coarse + (1 - gamma) * theta_sft, streamed tensor by tensor.

  python tools/merge.py --coarse runs/coarse-hf --sft mistral-7b-instruct --gamma 0.7 --out c2f-0.7
  python tools/merge.py --coarse A --sft B --gamma 0.1,0.3,0.5,0.7,0.9 --out sweep   # sweep/gamma_0.1, ...
  python tools/merge.py --config merge.yml --out DIR [--seed N]   # a mergekit recipe: slerp, ties, dare, ...

Inputs are HF MistralForCausalLM folders (one model.safetensors or shards with an index); --coarse may also be
a Coarse Actor training workdir (its latest actor, or --coarse-step N), exported to a temporary folder first. Every tensor is
computed in float32 and cast to --dtype (default: the SFT tensor's stored dtype). The output folder gets
safetensors shards + index, the SFT's config.json, tokenizer and generation files, and merge_provenance.json.
Everything is checked before anything is written; the output appears only when complete. With --config, the
recipe's format and methods are c2f_jax.merge.recipe's.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

from c2f_jax.merge import merge, recipe
from c2f_jax.runtime import cli, workdir


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", help="a mergekit YAML recipe (instead of --coarse/--sft/--gamma)")
    p.add_argument("--seed", type=int, default=0, help="with --config: the seed of DARE's drops (default 0)")
    p.add_argument("--coarse", help="the Coarse Actor: HF folder or coarse training workdir")
    p.add_argument(
        "--coarse-step", type=int, default=None, help="checkpoint step of a workdir --coarse (default latest)"
    )
    p.add_argument("--sft", help="the SFT / Instruct model (HF folder); config and tokenizer come from it")
    p.add_argument("--gamma", help="weight of the coarse model in [0, 1], or a comma-separated sweep")
    p.add_argument("--out", required=True, help="output folder (for a sweep: holds one gamma_<g> folder per gamma)")
    p.add_argument(
        "--dtype",
        choices=sorted(merge.DTYPES),
        default=None,
        help="output dtype (default: each tensor as stored in the SFT model)",
    )
    p.add_argument("--max-shard-size", default="5GB", help="largest output shard, e.g. 5GB or 500MiB (default 5GB)")
    cli.add_overwrite_arg(p)
    p.add_argument(
        "--allow-tokenizer-mismatch",
        action="store_true",
        help="merge even when the tokenizers differ (a warning; the output takes the SFT's tokenizer)",
    )
    args = p.parse_args(argv)
    if args.config is None and None in (args.coarse, args.sft, args.gamma):
        p.error("--coarse, --sft and --gamma are required (or a recipe: --config merge.yml)")
    if args.config is not None and any(v is not None for v in (args.coarse, args.sft, args.gamma, args.dtype)):
        p.error("--config takes its models, parameters and dtype from the recipe: drop --coarse/--sft/--gamma/--dtype")
    return args


def _terminate(signum, frame):
    # SIGTERM unwinds like an exception, so the temporary output folder is removed on the way out.
    sys.exit(128 + signum)


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    if args.config is not None:
        made = recipe.write_recipe(
            recipe.read_recipe(args.config), args.out, args.seed, args.max_shard_size, args.overwrite
        )
        print(f"{made['method'].split()[0]}: {made['tensors']} tensors -> {args.out}")
        print(f"done in {time.perf_counter() - start:.1f} s")
        return 0
    gammas = merge.parse_gammas(args.gamma)
    merge.resolve_input(args.sft)  # a bad SFT folder or an existing --out fails before a workdir export runs
    workdir.check_output(args.out, {"--coarse": args.coarse, "--sft": args.sft}, overwrite=args.overwrite)
    with merge.hf_folder(args.coarse, Path(args.out).absolute().parent, args.coarse_step) as coarse:
        plan = merge.plan_merge(coarse, args.sft, gammas, args.dtype, args.allow_tokenizer_mismatch)
        for w in plan.warnings:
            print(f"warning: {w}", file=sys.stderr)
        merge.write_merge(plan, args.out, args.max_shard_size, args.overwrite)
    dtypes = sorted({str(t.out_dtype) for t in plan.tensors})
    where = [f"{args.out}/{merge.gamma_folder(g)}" for g in plan.gammas] if plan.sweep else [args.out]
    gb = sum(t.out_nbytes for t in plan.tensors) / 1e9
    for g, folder in zip(plan.gammas, where):
        print(f"gamma {g:g}: {len(plan.tensors)} tensors, {gb:.2f} GB {'/'.join(dtypes)} -> {folder}")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


def command() -> None:
    """`c2f-merge` (and `python tools/merge.py`): main() on the command line, bad input as one line and exit
    status 2; SIGTERM removes the temporary output on the way out."""
    signal.signal(signal.SIGTERM, _terminate)
    cli.run(main)


if __name__ == "__main__":
    command()
