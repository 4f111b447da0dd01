"""Plot a run: reward, KL and the CM length limit over steps (a reward run: loss and held-out accuracy).

  python tools/plot_run.py runs/coarse [--out runs/coarse/run.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from c2f_jax import cli, metrics, workdir


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("workdir")
    p.add_argument("--out", default=None, help="PNG path (default WORKDIR/run.png)")
    args = p.parse_args(argv)
    rows = metrics.read_metrics(args.workdir)
    if not rows:
        raise cli.UsageError(f"{args.workdir}: no {workdir.METRICS} with any step")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    coarse = "reward/mean" in rows[0]
    panels = ([("reward/mean", "reward (mean)"), ("kl", "KL to reference"), ("cm/length_limit", "length limit")]
              if coarse else [("loss", "train loss"), ("eval/accuracy", "held-out accuracy")])
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.4 * len(panels)), sharex=True)
    for ax, (key, title) in zip(axes, panels):
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        ax.plot([s for s, _ in pts], [v for _, v in pts], drawstyle="steps-post" if "limit" in key else "default")
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("step")
    fig.suptitle(Path(args.workdir).name)
    fig.tight_layout()
    out = Path(args.out or Path(args.workdir) / "run.png")
    workdir.write(out, lambda tmp: fig.savefig(tmp, dpi=110, format="png"), overwrite=True)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    cli.run(main)
