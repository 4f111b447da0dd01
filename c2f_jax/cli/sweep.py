"""The gamma sweep: merge Coarse and SFT at every gamma, evaluate each, tabulate and plot (the paper's Table 3).

  c2f-sweep --coarse runs/demo --sft runs/demo_sft --gammas 0.1,0.3,0.5,0.7,0.9 \
      --reward-model runs/demo/reward_model --out runs/sweep

All gammas come out of one pass of the merger over the inputs. The SFT model itself
(gamma 0) and the Coarse Actor (gamma 1) are evaluated too, as the two ends. --out gets:
  sweep.md         the table, one row per gamma (Markdown)
  sweep.json       the same numbers, with the settings
  sweep.png        every metric against gamma
  generations.md   the responses to the first --show prompts at every gamma (Table 11's shape)
  models/          the merged HF folders, with --keep-models
Everything is written to a temporary folder and renamed into place at the end. --method slerp sweeps SLERP's
t the same way (t 0 is the SFT model, 1 the Coarse Actor; c2f_jax.merge.recipe), one merge per t.

With --tasks (lm-eval task names, `name:shots`, or `paper` for the paper's 11 benchmarks) the sweep is the
paper's Table 3 instead: every gamma merged in memory (merge.merge_params, as tools/merge.py computes it; no
folder per gamma) and evaluated by lm-eval through our model `c2f-jax`. --out then gets:
  table3.md        a row per gamma, a column per task and the mean
  table3.json      the same numbers, with the settings
  table3.png       every task against gamma
  lm_eval/         lm-eval's own results per gamma and shot count
A real 7B run (the task data come from the Hugging Face hub):
  c2f-sweep --coarse runs/coarse --sft /models/Mistral-7B-Instruct-v0.1 --tasks paper \
      --dtype bfloat16 --mesh 1x8x1 --out runs/table3
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path

from c2f_jax.cli.evaluate import add_eval_args, input_paths, inputs_from, settings_from
from c2f_jax.eval import evaluate
from c2f_jax.merge import merge, recipe
from c2f_jax.runtime import cli, distributed, workdir


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--coarse", required=True, help="the Coarse Actor: HF folder or coarse training workdir")
    p.add_argument("--coarse-step", type=int, default=None, help="checkpoint step of a workdir --coarse")
    p.add_argument("--sft", required=True, help="the SFT / Instruct model (HF folder)")
    p.add_argument("--gammas", default="0.1,0.3,0.5,0.7,0.9", help="comma-separated weights of the coarse model")
    p.add_argument(
        "--method",
        choices=("linear", "slerp"),
        default="linear",
        help="linear (the paper's) or slerp, whose t runs from the SFT model (0) to the coarse (1)",
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--show", type=int, default=3, help="prompts whose responses go into generations.md")
    p.add_argument("--keep-models", action="store_true", help="keep the merged folders under OUT/models")
    cli.add_overwrite_arg(p)
    p.add_argument("--tasks", default=None, help="lm-eval tasks (name or name:shots, comma-separated) or 'paper'")
    p.add_argument("--task-limit", type=float, default=None, help="lm-eval's --limit: documents (or a share) per task")
    p.add_argument("--include-path", default=None, help="a folder of extra lm-eval task YAMLs")
    p.add_argument("--mesh", default="1x1x1", help="DATAxFSDPxTENSOR mesh for the lm-eval model")
    p.add_argument("--max-length", type=int, default=None, help="lm-eval context length (default: the model's)")
    add_eval_args(p)
    return p.parse_args(argv)


def table3(tmp: Path, args, gammas: list[float]) -> None:
    """The lm-eval sweep (--tasks): every gamma merged in memory, evaluated by lm-eval, tabulated and plotted."""
    import c2f_jax.eval.lm_eval as c2f_lm_eval

    tasks = c2f_lm_eval.parse_tasks(args.tasks)
    coarse = evaluate.load_model(args.coarse, args.dtype, args.coarse_step)
    sft = evaluate.load_model(args.sft, args.dtype)
    (tmp / "lm_eval").mkdir()
    rows = []
    for g in gammas:
        params = merge.merge_params(coarse.params, sft.params, g, method=args.method)
        lm = c2f_lm_eval.C2FJaxLM.from_params(
            sft.config,
            params,
            sft.tokenizer,
            f"gamma {g:g}",
            mesh=args.mesh,
            batch_size=args.batch_size,
            max_length=args.max_length,
        )
        scores, outputs = c2f_lm_eval.run_tasks(lm, tasks, limit=args.task_limit, include_path=args.include_path)
        (tmp / "lm_eval" / f"gamma_{g:g}.json").write_text(json.dumps(outputs, indent=1, default=str) + "\n")
        # The mean, as the paper's, over the accuracies; a perplexity column stands beside it, not in it.
        accuracies = [v for metric, v in scores.values() if metric in ("acc", "acc_norm", "exact_match")]
        metric_of = {n: metric for n, (metric, _) in scores.items()}
        scores = {n: v for n, (_, v) in scores.items()}
        if accuracies:
            scores["mean"] = sum(accuracies) / len(accuracies)
        rows.append({"gamma": g, "metrics": scores})
        print(f"gamma {label(g)}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()), file=sys.stderr)
    names = [t for t, _ in tasks] + (["mean"] if "mean" in rows[0]["metrics"] else [])
    shots, metric_of["mean"] = dict(tasks), "mean accuracy"
    head = (
        "| gamma | "
        + " | ".join(
            n + (f" {shots[n]}-shot" if shots.get(n) is not None else "") + f" ({metric_of[n]})" for n in names
        )
        + " |"
    )
    lines = [head, "|" + "---|" * (len(names) + 1)]
    lines += [
        "| " + label(r["gamma"]) + " | " + " | ".join(f"{r['metrics'][n]:.4f}" for n in names) + " |" for r in rows
    ]
    table = "\n".join(lines)
    (tmp / "table3.md").write_text(
        f"# Gamma sweep on lm-eval tasks\n\ncoarse: `{args.coarse}`, SFT: `{args.sft}`"
        f", limit: {args.task_limit}\n\n{table}\n"
    )
    (tmp / "table3.json").write_text(
        json.dumps(
            {"coarse": str(args.coarse), "sft": str(args.sft), "tasks": tasks, "limit": args.task_limit, "rows": rows},
            indent=1,
        )
        + "\n"
    )
    plot(rows, tmp / "table3.png", names, args.method)
    print(table)


def label(gamma: float) -> str:
    return {0.0: "0 (SFT)", 1.0: "1 (coarse)"}.get(gamma, f"{gamma:g}")


def plot(rows: list[dict], path: Path, keys: list[str] | None = None, method: str = "linear") -> None:
    """One panel per metric (default: evaluate's) against gamma."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = evaluate.METRIC_NAMES if keys is None else {k: k for k in keys}
    keys = [k for k in titles if all(k in r["metrics"] for r in rows)]
    cols = 2
    nrows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(9, 2.6 * nrows), squeeze=False)
    gammas = [r["gamma"] for r in rows]
    for ax, key in zip(axes.flat, keys):
        ax.plot(gammas, [r["metrics"][key] for r in rows], marker="o")
        ax.set_title(titles[key], fontsize=10)
        ax.set_xticks(gammas)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("gamma (weight of the Coarse Actor)" if method == "linear" else "t (0: SFT, 1: Coarse Actor)")
    fig.suptitle(
        "theta = gamma * coarse + (1 - gamma) * SFT" if method == "linear" else "theta = slerp(t; SFT, coarse)"
    )
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
    if args.tasks:
        import c2f_jax.eval.lm_eval as c2f_lm_eval

        workdir.check_output(out, {"--coarse": args.coarse, "--sft": args.sft}, overwrite=args.overwrite)
        c2f_lm_eval.check_tasks(c2f_lm_eval.parse_tasks(args.tasks), args.include_path)
        workdir.write(out, lambda tmp: table3(tmp, args, gammas), overwrite=args.overwrite, folder=True)
        print(f"wrote {out}/table3.md, table3.json, table3.png, lm_eval/")
        return 0
    if not args.reward_model:
        raise cli.UsageError(
            "--reward-model is required: the sweep's first column is the reward score "
            "(or give --tasks for the lm-eval table)"
        )
    workdir.check_output(out, input_paths(args), overwrite=args.overwrite)
    settings = settings_from(args)
    sft = merge.resolve_input(args.sft)
    prompts, pairs, rm = inputs_from(args)
    rows = []

    def merge_and_evaluate(tmp: Path, coarse: Path) -> None:
        inner = [g for g in gammas if 0 < g < 1]
        if inner and args.method == "slerp":
            (tmp / "models").mkdir()
            for g in inner:
                recipe.write_recipe(recipe.slerp_recipe(coarse, sft, g), tmp / "models" / merge.gamma_folder(g))
        elif inner:
            plan = merge.plan_merge(coarse, sft, inner)
            for w in plan.warnings:
                print(f"warning: {w}", file=sys.stderr)
            # One gamma writes the folder itself; several write one gamma_<g> folder each.
            target = tmp / "models" if len(inner) > 1 else tmp / "models" / merge.gamma_folder(inner[0])
            target.parent.mkdir(exist_ok=True)
            merge.write_merge(plan, target)
        for g in gammas:
            folder = sft if g == 0 else coarse if g == 1 else tmp / "models" / merge.gamma_folder(g)
            result = evaluate.evaluate_model(evaluate.load_model(folder, args.dtype), prompts, settings, rm, pairs)
            rows.append({"gamma": g, **result})
            print(
                f"gamma {label(g)}: " + ", ".join(f"{k} {v:.3f}" for k, v in result["metrics"].items()), file=sys.stderr
            )
            if 0 < g < 1 and not args.keep_models:
                shutil.rmtree(folder)
        if not args.keep_models:
            shutil.rmtree(tmp / "models", ignore_errors=True)
        table = evaluate.markdown_table({label(r["gamma"]): r["metrics"] for r in rows}, first="gamma")
        (tmp / "sweep.md").write_text(
            f"# Gamma sweep\n\ncoarse: `{args.coarse}`, SFT: `{args.sft}`, reward model: "
            f"`{args.reward_model}`, {len(prompts)} prompts\n\n{table}\n"
        )
        (tmp / "sweep.json").write_text(
            json.dumps(
                {
                    "coarse": str(args.coarse),
                    "sft": str(args.sft),
                    "method": args.method,
                    "reward_model": str(args.reward_model),
                    "settings": dataclasses.asdict(settings),
                    "num_prompts": len(prompts),
                    "rows": [{"gamma": r["gamma"], "metrics": r["metrics"]} for r in rows],
                },
                indent=1,
            )
            + "\n"
        )
        (tmp / "generations.md").write_text(generations_page(rows, args.show))
        plot(rows, tmp / "sweep.png", method=args.method)
        print(table)

    # A workdir --coarse is exported beside --out by every process (each reads its part of the checkpoint);
    # then process 0 of a multi-process job merges, evaluates and writes, and the others wait for it.
    with merge.hf_folder(args.coarse, out.absolute().parent, args.coarse_step) as coarse:
        workdir.write(out, lambda tmp: merge_and_evaluate(tmp, coarse), overwrite=args.overwrite, folder=True)
    if distributed.writes_here():
        print(f"wrote {out}/sweep.md, sweep.json, sweep.png, generations.md")
    return 0


def command() -> None:
    """`c2f-sweep`: main() on the command line, bad input as one line and exit status 2."""
    cli.run(main)


if __name__ == "__main__":
    command()
