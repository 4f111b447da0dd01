"""Plot a run: reward, KL, approx_kl with clipfrac, entropy and the CM length limit over steps (a reward run:
loss and held-out accuracy).

  c2f-plot runs/coarse [--out runs/coarse/run.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from c2f_jax.runtime import cli, metrics, workdir

# Each panel: (title, [(key, label, right axis?)]); keys a run lacks (older runs) are left out.
COARSE_PANELS = [
    ("reward (mean)", [("reward/mean", "reward", False)]),
    ("KL to reference, nats/token", [("kl", "KL", False), ("kl_coef", "KL coefficient", True)]),
    ("policy change per iteration", [("approx_kl", "approx_kl", False), ("clipfrac", "clipfrac", True)]),
    ("entropy, nats/token", [("entropy", "entropy", False)]),
    ("length limit", [("cm/length_limit", "length limit", False)]),
]
REWARD_PANELS = [
    ("train loss", [("loss", "loss", False)]),
    ("held-out accuracy", [("eval/accuracy", "accuracy", False)]),
]


def figure(rows: list[dict], title: str):
    """The run's curves (a coarse run's or a reward run's panels) as a matplotlib figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = COARSE_PANELS if "reward/mean" in rows[0] else REWARD_PANELS
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.2 * len(panels)), sharex=True)
    for ax, (name, series) in zip(axes, panels):
        for i, (key, label, right) in enumerate(series):
            pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if not pts:
                continue
            target = ax.twinx() if right else ax
            steps, values = zip(*pts)
            target.plot(
                steps, values, color=f"C{i}", label=label, drawstyle="steps-post" if "limit" in key else "default"
            )
            if right:
                target.set_ylabel(label, color=f"C{i}")
        ax.set_ylabel(name if len(series) == 1 else series[0][1])
        if len(series) > 1:
            ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("step")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("workdir")
    p.add_argument(
        "--out", default=None, help=f"PNG path (default WORKDIR/{workdir.RUN_PLOT}, which each plot replaces)"
    )
    cli.add_overwrite_arg(p)
    args = p.parse_args(argv)
    if not workdir.is_workdir(args.workdir):
        raise cli.UsageError(f"{args.workdir}: not a training workdir (no {workdir.RUN_CONFIG})")
    own = Path(args.workdir) / workdir.RUN_PLOT
    out = own if args.out is None else Path(args.out)
    # The workdir's own plot is renewed by every call; any other path follows the output rule.
    renew = out.absolute() == own.absolute()
    overwrite = renew or args.overwrite
    workdir.check_output(out, {} if renew else {"WORKDIR": args.workdir}, overwrite=overwrite, folder=False)
    rows = metrics.read_metrics(args.workdir)
    if not rows:
        raise cli.UsageError(f"{args.workdir}: no {workdir.METRICS} with any step")
    fig = figure(rows, Path(args.workdir).name)
    workdir.write(out, lambda tmp: fig.savefig(tmp, dpi=110, format="png"), overwrite=overwrite)
    print(f"wrote {out}")
    return 0


def command() -> None:
    """`c2f-plot`: main() on the command line, bad input as one line and exit status 2."""
    cli.run(main)


if __name__ == "__main__":
    command()
