"""Supervised fine-tuning on the chosen answers of a preference file: the demo's stand-in for an Instruct model.

  python scripts/sft.py --base runs/demo/base_model --out runs/demo/sft_model --steps 100

The paper merges its Coarse Actor with Mistral-7B-Instruct; the tiny demo has no
such model, so this teaches the demo's base model to answer in the HH format and to
stop: each example is 'Human: ... Assistant: <chosen answer></s>', from the training side
of the split that c2f-evaluate holds out (the demo's base model was pretrained on every
dialogue of the bundled sample, though, so held-out perplexity flatters it there). The output is an
HF folder (config, safetensors, tokenizer), written to a temporary folder and renamed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a checkout without installing

from c2f_jax import data  # noqa: E402
from c2f_jax.eval import evaluate  # noqa: E402
from c2f_jax.jobs import sft  # noqa: E402
from c2f_jax.model import hf, tokenizer  # noqa: E402
from c2f_jax.runtime import cli, workdir  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="HF MistralForCausalLM folder to start from")
    p.add_argument("--out", required=True, help="output HF folder")
    p.add_argument("--data", default="bundled", help="preference data: 'bundled', a local file or a hub name")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-length", type=int, default=256, help="longer examples keep their end")
    p.add_argument("--seed", type=int, default=0)
    cli.add_overwrite_arg(p)
    args = p.parse_args(argv)
    if min(args.steps, args.batch_size, args.max_length) < 1:
        raise cli.UsageError(
            f"--steps={args.steps}, --batch-size={args.batch_size} and --max-length={args.max_length} must be >= 1"
        )
    try:
        sft.optim_config(args.lr, args.steps)
    except ValueError as e:
        raise cli.UsageError(f"--{e}") from None
    workdir.check_output(args.out, {"--base": args.base, "--data": args.data}, overwrite=args.overwrite)
    if not Path(args.base).is_dir():
        raise cli.UsageError(f"--base {args.base}: model folder not found")
    pairs, _ = data.load_pairs(args.data)
    pairs, _ = data.train_eval_split(pairs, evaluate.EVAL_FRACTION, evaluate.EVAL_SEED)
    data.BatchIterator(len(pairs), args.batch_size, args.seed)  # a batch larger than the data fails here
    config, params = hf.load_pretrained(args.base)
    if not config.has_lm_head:
        raise cli.UsageError(f"--base {args.base}: is a {config.architecture}; SFT needs MistralForCausalLM")
    tok = tokenizer.load_tokenizer(args.base)
    texts = [
        data.tokenize_prompt(tok, pair.prompt) + data.tokenize_answer(tok, pair.chosen) + [tok.eos_token_id]
        for pair in pairs
    ]
    buckets = sorted({min(b, args.max_length) for b in (64, 128, 256, 512, 1024, 2048)})
    params, loss = sft.fine_tune(
        config,
        params,
        texts,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        buckets=buckets,
        pad_id=tok.pad_token_id,
        seed=args.seed,
        progress="sft",
    )
    hf.save_pretrained(args.out, config, params, tokenizer_source=tok, overwrite=args.overwrite)
    print(f"{args.steps} steps on {len(texts)} examples, last loss {loss:.3f} -> {args.out}")
    return 0


if __name__ == "__main__":
    cli.run(main)
