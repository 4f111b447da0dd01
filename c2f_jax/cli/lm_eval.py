"""lm-evaluation-harness's own command line, with our model `c2f-jax` registered and our tasks (race_m) included.

  c2f-lm-eval --model c2f-jax --model_args pretrained=runs/demo-hf,dtype=float32 --tasks arc_easy
  c2f-lm-eval --model c2f-jax --model_args pretrained=runs/demo,step=48 --tasks hellaswag   # a training workdir
  c2f-lm-eval --model c2f-jax --model_args coarse=runs/demo,sft=runs/sft,gamma=0.7 ...     # merged in memory
  c2f-lm-eval ls tasks

Every flag is lm-eval 0.4.13's (`c2f-lm-eval run --help`); the model args are c2f_jax.eval.lm_eval's. Before a
model loads, the model args, --batch_size, --tasks and --output_path are checked; a bad one is one `error:`
line and exit status 2. lm-eval writes its results under --output_path as timestamped files beside any that
are there, never replacing one; --output_path may not lie inside an input model or a training workdir.
"""

from __future__ import annotations

import sys
from pathlib import Path

from c2f_jax.runtime import cli


def check_run(args) -> None:
    """What `run` would find wrong only after loading a model: our model's args, the batch size, unknown task
    names and an output inside an input."""
    from lm_eval.utils import simple_parse_args_string

    from c2f_jax.eval import lm_eval
    from c2f_jax.runtime import workdir

    model_args = args.model_args
    if isinstance(model_args, list):  # `--model_args a=1 b=2`
        model_args = ",".join(model_args)
    if isinstance(model_args, str):
        model_args = simple_parse_args_string(model_args)
    model_args = dict(model_args or {})
    if args.model == "c2f-jax":
        if getattr(args, "batch_size", None) is not None:
            model_args["batch_size"] = args.batch_size
        lm_eval.check_model_args(model_args)
    names = args.tasks if isinstance(args.tasks, list) else str(args.tasks or "").split(",")
    # A task may also be given as a YAML file or folder, which lm-eval reads itself.
    tasks = [
        (n.strip(), None) for item in names for n in str(item).split(",") if n.strip() and not Path(n.strip()).exists()
    ]
    if tasks:
        lm_eval.check_tasks(tasks, getattr(args, "include_path", None))
    if args.output_path:
        inputs = [(f"model_args {k}", model_args.get(k)) for k in ("pretrained", "coarse", "sft")]
        workdir.check_output(
            args.output_path,
            inputs,
            "--output_path",
            overwrite=True,
            folder=not str(args.output_path).endswith(".json"),
        )


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        import c2f_jax.eval.lm_eval  # noqa: F401  (registers the model `c2f-jax`)
    except ImportError as e:  # the eval extra is optional
        if argv in (["-h"], ["--help"]):
            print(f"usage: c2f-lm-eval [lm-eval's flags]\n{__doc__}\n{e}")
            return 0
        raise cli.UsageError(str(e)) from None
    from lm_eval._cli import HarnessCLI
    from lm_eval.utils import setup_logging

    from c2f_jax.eval.lm_eval import TASKS_DIR

    if any(a in ("--tasks", "-t") or a.startswith("--tasks=") for a in argv) and not any(
        a.startswith("--include_path") for a in argv
    ):
        argv += ["--include_path", str(TASKS_DIR)]
    setup_logging()
    harness = HarnessCLI()
    sys.argv = ["c2f-lm-eval", *argv]  # lm-eval reads its arguments (and inserts `run`) from sys.argv
    args = harness.parse_args()
    if getattr(args, "command", None) == "run":
        check_run(args)
    harness.execute(args)
    return 0


def command() -> None:
    """`c2f-lm-eval` (and `python -m c2f_jax.eval.lm_eval`): bad input as one line and exit status 2."""
    cli.run(main)


if __name__ == "__main__":
    command()
