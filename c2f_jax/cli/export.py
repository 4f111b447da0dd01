"""Export a training workdir as a Hugging Face folder.

  c2f-export --checkpoint runs/coarse --out exports/coarse [--step N] [--dtype bfloat16]

A coarse run exports its actor (MistralForCausalLM), a reward run its reward model
(MistralForSequenceClassification), with the run's tokenizer and a generation config.
"""

from __future__ import annotations

import argparse

from c2f_jax.model import export
from c2f_jax.runtime import cli, distributed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="training workdir")
    p.add_argument("--out", required=True, help="HF folder to write")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--dtype", default="bfloat16", help="stored dtype (default bfloat16; float32 keeps masters)")
    cli.add_overwrite_arg(p)
    args = p.parse_args(argv)
    out = export.export(args.checkpoint, args.out, step=args.step, dtype=args.dtype, overwrite=args.overwrite)
    if distributed.writes_here():
        print(f"wrote {out}")
    return 0


def command() -> None:
    """`c2f-export`: main() on the command line, bad input as one line and exit status 2."""
    cli.run(main)


if __name__ == "__main__":
    command()
