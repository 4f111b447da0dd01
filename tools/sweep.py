"""The gamma sweep: merge Coarse and SFT at every gamma, evaluate each, tabulate and plot (the paper's Table 3).

  python tools/sweep.py --coarse runs/demo --sft runs/demo_sft --gammas 0.1,0.3,0.5,0.7,0.9 \
      --reward-model runs/demo/reward_model --out runs/sweep

All gammas come out of one pass of the merger over the inputs. The SFT model itself
(gamma 0) and the Coarse Actor (gamma 1) are evaluated too, as the two ends. --out gets:
  sweep.md         the table, one row per gamma (Markdown)
  sweep.json       the same numbers, with the settings
  sweep.png        every metric against gamma
  generations.md   the responses to the first --show prompts at every gamma (Table 11's shape)
  models/          the merged HF folders, with --keep-models
Everything is written to a temporary folder and renamed into place at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

from evaluate import add_eval_args, input_paths, inputs_from, settings_from  # noqa: E402  (tools/evaluate.py)

from c2f_jax import cli, distributed, evaluate, merge, workdir  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--coarse", required=True, help="the Coarse Actor: HF folder or coarse training workdir")
    p.add_argument("--coarse-step", type=int, default=None, help="checkpoint step of a workdir --coarse")
    p.add_argument("--sft", required=True, help="the SFT / Instruct model (HF folder)")
    p.add_argument("--gammas", default="0.1,0.3,0.5,0.7,0.9", help="comma-separated weights of the coarse model")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--show", type=int, default=3, help="prompts whose responses go into generations.md")
    p.add_argument("--keep-models", action="store_true", help="keep the merged folders under OUT/models")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    add_eval_args(p)
    return p.parse_args(argv)


def label(gamma: float) -> str:
    return {0.0: "0 (SFT)", 1.0: "1 (coarse)"}.get(gamma, f"{gamma:g}")


def plot(rows: list[dict], path: Path) -> None:
    """One panel per metric against gamma."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in evaluate.METRIC_NAMES if all(k in r["metrics"] for r in rows)]
    cols = 2
    nrows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(9, 2.6 * nrows), squeeze=False)
    gammas = [r["gamma"] for r in rows]
    for ax, key in zip(axes.flat, keys):
        ax.plot(gammas, [r["metrics"][key] for r in rows], marker="o")
        ax.set_title(evaluate.METRIC_NAMES[key], fontsize=10)
        ax.set_xticks(gammas)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("gamma (weight of the Coarse Actor)")
    fig.suptitle("theta = gamma * coarse + (1 - gamma) * SFT")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def generations_page(rows: list[dict], show: int, max_chars: int = 400) -> str:
    """Markdown: for each of the first `show` prompts, the response at every gamma."""
    cell = lambda text: " ".join(text.split()).replace("|", "\\|")[:max_chars] or "(empty)"
    lines = ["# Responses at each gamma", ""]
    for i, prompt in enumerate(g["prompt"] for g in rows[0]["generations"][:show]):
        lines += [f"## Prompt {i + 1}", "", f"> {cell(prompt)}", "", "| gamma | response | EOS |", "|---|---|---|"]
        for r in rows:
            g = r["generations"][i]
            lines.append(f"| {label(r['gamma'])} | {cell(g['response'])} | {'yes' if g['ended_with_eos'] else 'no'} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    gammas = sorted(set(merge.parse_gammas(args.gammas)) | {0.0, 1.0})  # the SFT and coarse models are the ends
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise cli.UsageError(f"--out {out}: already exists (pass --overwrite to replace it)")
    if not args.reward_model:
        raise cli.UsageError("--reward-model is required: the sweep's first column is the reward score")
    workdir.check_output(out, input_paths(args))
    settings = settings_from(args)
    sft = merge.resolve_input(args.sft)
    prompts, pairs, items, rm = inputs_from(args)
    rows = []

    def merge_and_evaluate(tmp: Path, coarse: Path) -> None:
        inner = [g for g in gammas if 0 < g < 1]
        if inner:
            plan = merge.plan_merge(coarse, sft, inner)
            for w in plan.warnings:
                print(f"warning: {w}", file=sys.stderr)
            # One gamma writes the folder itself; several write one gamma_<g> folder each.
            target = tmp / "models" if len(inner) > 1 else tmp / "models" / merge.gamma_folder(inner[0])
            target.parent.mkdir(exist_ok=True)
            merge.write_merge(plan, target)
        for g in gammas:
            folder = sft if g == 0 else coarse if g == 1 else tmp / "models" / merge.gamma_folder(g)
            result = evaluate.evaluate_model(evaluate.load_model(folder, args.dtype), prompts, settings, rm,
                                             pairs, items)
            rows.append({"gamma": g, **result})
            print(f"gamma {label(g)}: " + ", ".join(f"{k} {v:.3f}" for k, v in result["metrics"].items()),
                  file=sys.stderr)
            if 0 < g < 1 and not args.keep_models:
                shutil.rmtree(folder)
        if not args.keep_models:
            shutil.rmtree(tmp / "models", ignore_errors=True)
        table = evaluate.markdown_table({label(r["gamma"]): r["metrics"] for r in rows}, first="gamma")
        (tmp / "sweep.md").write_text(f"# Gamma sweep\n\ncoarse: `{args.coarse}`, SFT: `{args.sft}`, reward model: "
                                      f"`{args.reward_model}`, {len(prompts)} prompts\n\n{table}\n")
        (tmp / "sweep.json").write_text(json.dumps({
            "coarse": str(args.coarse), "sft": str(args.sft), "reward_model": str(args.reward_model),
            "settings": dataclasses.asdict(settings), "num_prompts": len(prompts),
            "rows": [{"gamma": r["gamma"], "metrics": r["metrics"]} for r in rows]}, indent=1) + "\n")
        (tmp / "generations.md").write_text(generations_page(rows, args.show))
        plot(rows, tmp / "sweep.png")
        print(table)

    # A workdir --coarse is exported beside --out by every process (each reads its part of the checkpoint);
    # then process 0 of a multi-process job merges, evaluates and writes, and the others wait for it.
    with merge.hf_folder(args.coarse, out.absolute().parent, args.coarse_step) as coarse:
        workdir.write(out, lambda tmp: merge_and_evaluate(tmp, coarse), overwrite=args.overwrite, folder=True)
    if distributed.writes_here():
        print(f"wrote {out}/sweep.md, sweep.json, sweep.png, generations.md")
    return 0


if __name__ == "__main__":
    cli.run(main)
