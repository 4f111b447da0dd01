"""usage: c2f-train --config FILE [--config.KEY=VALUE ...] [--workdir DIR]    (or: python -m c2f_jax.train ...)

The command line of every job (jobs/). Runs the job the config names: `reward` (a Bradley-Terry reward model on
preference pairs) or `coarse` (the Coarse Actor: PPO with Continuous Maximization). Restarting on a workdir
that holds checkpoints resumes from the latest one, exactly. The workdir's layout is c2f_jax.runtime.workdir's;
the same command runs as several processes (see c2f_jax.runtime.distributed and launch/).
"""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

from c2f_jax.jobs.coarse import run_coarse
from c2f_jax.jobs.reward_model import run_reward
from c2f_jax.jobs.setup import TrainError, config_dict
from c2f_jax.runtime import cli, distributed, preemption, workdir, workdir_lock

# Where a bare config name is looked up after ./configs: the configs shipped in an installed package
# (pyproject maps the checkout's configs/ to c2f_jax/configs), else a source checkout's configs/.
_PACKAGE = Path(__file__).resolve().parent
CONFIG_DIR = _PACKAGE / "configs" if (_PACKAGE / "configs").is_dir() else _PACKAGE.parent / "configs"
REQUIRED_KEYS = (
    "job",
    "steps",
    "seed",
    "checkpoint_every",
    "mesh.data",
    "mesh.fsdp",
    "mesh.tensor",
    "rollout.temperature",
)


def resolve_config_path(value: str) -> str:
    """A path as given, or a bare name such as `coarse.py` found in ./configs or the checkout's configs/."""
    path = Path(value.split(":")[0])
    if path.exists():
        return value
    for folder in (Path("configs"), CONFIG_DIR):
        if path.parent == Path(".") and (folder / path.name).exists():
            return str(folder / value)
    raise TrainError(f"config file {path} not found (nor in ./configs or {CONFIG_DIR})")


def _message(e: BaseException) -> str:
    """An absl/ml_collections error as plain text: some arrive as the repr of a repr of a multi-line string."""
    text = str(e)
    for _ in range(3):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            break
        if not isinstance(value, str):
            break
        text = value
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _bad_override(e: BaseException, argv: list[str]) -> str:
    """'--config.ppo.kl_coeff: no such key (Did you mean ...)' for ml_collections' KeyError on an override."""
    text = _message(e)
    first, _, rest = text.partition(" ")
    name = first.strip("'\"")
    overrides = [a.split("=", 1)[0] for a in argv if a.startswith("--config.")]
    flag = next((o for o in overrides if o.rsplit(".", 1)[-1] == name), None)
    if flag is None:
        return text
    return f"{flag}: no such key in the config" + (f"; {rest[0].lower()}{rest[1:]}" if rest else "")


def parse_args(argv: list[str]):
    """(config, workdir) from `--config FILE [--config.key=value ...] [--workdir DIR]`.

    A config file may import the config files beside it by module name (`import coarse`):
    their folder goes on the import path.
    """
    from absl import flags
    from ml_collections import config_flags

    joined, i, file = [], 0, None
    while i < len(argv):  # `--config X` -> `--config=X`, which overrides need; `--config.K V` -> `--config.K=V`
        arg = argv[i]
        if arg == "--config" and i + 1 < len(argv):
            arg, i = f"--config={argv[i + 1]}", i + 1
        elif arg.startswith("--config.") and "=" not in arg and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
            arg, i = f"{arg}={argv[i + 1]}", i + 1
        if arg.startswith("--config="):
            path = resolve_config_path(arg.split("=", 1)[1])
            arg, file = "--config=" + path, path.split(":")[0]
            folder = str(Path(file).resolve().parent)
            if folder not in sys.path:
                sys.path.insert(0, folder)
        joined.append(arg)
        i += 1
    # A key given twice: the later value wins (absl would join two values of a tuple key).
    last = {a.split("=", 1)[0]: n for n, a in enumerate(joined) if a.startswith("--config.")}
    joined = [a for n, a in enumerate(joined) if not a.startswith("--config.") or last[a.split("=", 1)[0]] == n]
    argv = ["c2f_jax.train", *joined]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", None, "ml_collections config file", flag_values=fv, lock_config=True, sys_argv=argv
    )
    flags.DEFINE_string("workdir", None, "run directory (default runs/<config name>)", flag_values=fv)
    try:
        fv(argv)
    except SyntaxError as e:
        raise TrainError(f"config file {file}: syntax error at line {e.lineno}: {e.msg}") from None
    except (flags.Error, AttributeError, KeyError, ValueError, TypeError, ImportError) as e:
        if "has no attribute 'get_config'" in str(e):
            raise TrainError(f"config file {file}: defines no get_config()") from None
        raise TrainError(f"bad command line: {_bad_override(e, argv)}") from None
    except Exception as e:  # the config file's own code raised
        raise TrainError(f"config file {file}: {type(e).__name__}: {_message(e)}") from None
    if fv.config is None:
        raise TrainError("--config is required (e.g. --config configs/tiny_coarse.py)")
    config = fv.config
    for key in REQUIRED_KEYS:
        node = config
        for part in key.split("."):
            if part not in node:
                raise TrainError(f"config has no {key!r} (every config needs {', '.join(REQUIRED_KEYS)})")
            node = node[part]
    name = Path(fv["config"].config_filename).stem
    return config, Path(fv.workdir or Path("runs") / name)


FLAGS_HELP = """flags:
  --config FILE          an ml_collections config file (a bare name such as tiny_coarse.py is looked up in
                         ./configs, then in the configs shipped with c2f-jax); required
  --config.KEY=VALUE     override one config key (repeatable); `--config FILE --help` lists every key
  --workdir DIR          the run folder (default runs/<config name>); an existing one is resumed
  -h, --help             this text"""


def help_text(argv: list[str]) -> str:
    """The usage, the flags and, when a --config is given, every config key with its value."""
    text = f"{__doc__.strip()}\n\n{FLAGS_HELP}"
    rest = [a for a in argv if a not in ("-h", "--help")]
    if any(a == "--config" or a.startswith("--config=") for a in rest):
        config, _ = parse_args(rest)
        keys = workdir.flatten(config_dict(config))
        width = max(map(len, keys))
        text += "\n\nconfig keys (override with --config.KEY=VALUE):\n" + "\n".join(
            f"  {k.ljust(width)}  {json.dumps(v)}" for k, v in keys.items()
        )
    return text


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(help_text(argv))
        return 0
    config, path = parse_args(argv)
    if config.job not in ("reward", "coarse"):
        raise TrainError(f"job={config.job!r}; expected 'reward' or 'coarse'")
    preemption.install()
    new = not path.exists()
    try:
        (run_reward if config.job == "reward" else run_coarse)(config, path)
    except preemption.Stopped as e:
        if distributed.writes_here():
            print(f"{path}: {e}", flush=True)
        return preemption.EXIT_RESUMABLE
    except BaseException:
        workdir_lock.release_all()
        if new and distributed.writes_here():  # an input refused while it was read: no empty workdir left behind
            workdir.remove_if_empty(path)
        raise
    finally:  # however the job ended (an error too), its workdirs are free again
        workdir_lock.release_all()
    if distributed.writes_here():
        print(f"done: {path}")
    return 0


def command() -> None:
    """`c2f-train` (and `python -m c2f_jax.train`): bad input as one line and exit status 2."""
    cli.run(main)


if __name__ == "__main__":
    command()
