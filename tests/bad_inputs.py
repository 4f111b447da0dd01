"""Every bad input a new user might type, run through the CLIs: each must be refused cleanly.

  python tests/bad_inputs.py                    # makes its own tiny fixtures (about a minute), runs every case
  python tests/bad_inputs.py --fixtures DIR --run WORKDIR --run-args ARGS.json --json out.json

Refused cleanly means: exit status 2, stderr exactly one line `error: ...` (no traceback, no library
logging above it), and nothing created or changed under the case's folder (no stub workdir or output).
Each case runs the same `cli.run(main)` a shell command runs, in a child forked from this process after
the CLIs are imported (a subprocess per case would spend most of its time importing JAX), with stdout
and stderr redirected at the file-descriptor level, so native aborts and library logging are caught too.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # runnable from a checkout without installing

# The module (or, for the demo's SFT script, the file) each command of the table runs.
COMMANDS = {
    "train": "c2f_jax.train",
    "export": "c2f_jax.cli.export",
    "generate": "c2f_jax.cli.generate",
    "merge": "c2f_jax.cli.merge",
    "sweep": "c2f_jax.cli.sweep",
    "evaluate": "c2f_jax.cli.evaluate",
    "plot": "c2f_jax.cli.plot",
    "plan": "c2f_jax.cli.plan",
    "lm_eval": "c2f_jax.cli.lm_eval",
    "local_job": "c2f_jax.runtime.local_job",
    "sft": ROOT / "scripts" / "sft.py",
}


@dataclasses.dataclass(frozen=True)
class Case:
    """`tool` (a key of COMMANDS) with `argv(env)`; `setup(env)` prepares the case's folder first."""

    name: str
    tool: str
    argv: Callable[["Env"], list[str]]
    setup: Callable[["Env"], None] | None = None


@dataclasses.dataclass
class Env:
    """Where a case runs: `box` (its own empty folder, also the working directory) and the shared inputs."""

    box: Path
    fixtures: Path  # hf/ (a causal LM), rm/ (a reward model), and small bad files
    run: Path  # a coarse training workdir with at least two checkpoints (read-only: copy before breaking it)
    run_args: list[str]  # the overrides that made `run` (a resume must pass them to get past the config check)

    def f(self, name: str) -> str:
        return str(self.fixtures / name)

    def copy_run(self) -> str:
        """A copy of `run` with its last two checkpoints only (all a resume reads), as box/w."""
        keep = {p.name for p in _steps(self.run)[-2:]}

        def skip(folder, names):
            if Path(folder) == self.run:
                return [n for n in names if n == "reward_run"]  # the demo's inline reward job: done, not read
            if Path(folder) == self.run / "checkpoints":
                return [n for n in names if n.isdigit() and n not in keep]
            return []

        shutil.copytree(self.run, self.box / "w", symlinks=True, ignore=skip)
        return str(self.box / "w")


# ----------------------------------------------------------------------------- breaking things


def _steps(workdir: Path) -> list[Path]:
    return sorted((p for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()), key=lambda p: int(p.name))


def _largest_file(folder: Path) -> Path:
    return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def truncate_latest(env: Env) -> None:
    """Cuts the latest checkpoint's largest array file in half (a disk that filled up mid-copy)."""
    env.copy_run()
    f = _largest_file(_steps(env.box / "w")[-1] / "state")
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size // 2)


def truncate_latest_arrays(env: Env) -> None:
    """Cuts every array file of the latest checkpoint in half: whichever part a command reads is broken."""
    env.copy_run()
    for f in (_steps(env.box / "w")[-1] / "state").rglob("d/*"):
        with open(f, "r+b") as fh:
            fh.truncate(f.stat().st_size // 2)


def truncate_all(env: Env) -> None:
    env.copy_run()
    for step in _steps(env.box / "w"):
        f = _largest_file(step / "state")
        with open(f, "r+b") as fh:
            fh.truncate(f.stat().st_size // 2)


def delete_in_latest(name: str) -> Callable[[Env], None]:
    def setup(env: Env) -> None:
        env.copy_run()
        for p in sorted(_steps(env.box / "w")[-1].rglob(name)):
            p.unlink()

    return setup


def garble_run_config(env: Env) -> None:
    env.copy_run()
    (env.box / "w" / "run_config.json").write_text("{not json")


def truncate_safetensors(env: Env) -> None:
    shutil.copytree(env.fixtures / "hf", env.box / "m")
    f = env.box / "m" / "model.safetensors"
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size // 2)


def short_reward_model(env: Env) -> None:
    """fixtures/rm with 64 positions: shorter than the demo's 128-token prompt bucket."""
    shutil.copytree(env.fixtures / "rm", env.box / "rm")
    config = json.loads((env.box / "rm" / "config.json").read_text())
    (env.box / "rm" / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 64}))


def copy_hf(env: Env) -> None:
    shutil.copytree(env.fixtures / "hf", env.box / "m")


def nan_weight(source: str) -> Callable[[Env], None]:
    """A copy of fixtures/`source` as box/m with one NaN in its first floating-point tensor."""

    def setup(env: Env) -> None:
        from safetensors.numpy import load_file, save_file

        shutil.copytree(env.fixtures / source, env.box / "m")
        f = env.box / "m" / "model.safetensors"
        tensors = load_file(f)
        name = sorted(tensors)[0]
        tensors[name] = tensors[name].copy()
        tensors[name].flat[3] = float("nan")
        save_file(tensors, f, metadata={"format": "pt"})

    return setup


def wider_config(env: Env) -> None:
    """box/m: fixtures/hf whose config.json says intermediate_size is twice what its tensors hold."""
    copy_hf(env)
    config = json.loads((env.box / "m" / "config.json").read_text())
    (env.box / "m" / "config.json").write_text(
        json.dumps({**config, "intermediate_size": 2 * config["intermediate_size"]})
    )


def an_existing_folder(env: Env) -> None:
    """box/out: a folder holding a file, which a refused command must leave as it is."""
    (env.box / "out").mkdir()
    (env.box / "out" / "keep.txt").write_text("days of work\n")


def an_existing_file(env: Env) -> None:
    (env.box / "out.txt").write_text("keep me\n")


def metrics_line(line: str, at: str) -> Callable[[Env], None]:
    """A copy of the run whose metrics.jsonl has `line` added at its end or put in place of its first row."""

    def setup(env: Env) -> None:
        env.copy_run()
        f = env.box / "w" / "metrics.jsonl"
        rows = f.read_text().splitlines()
        rows = [*rows, line] if at == "end" else [line, *rows[1:]]
        f.write_text("\n".join(rows) + ("\n" if at != "end" else ""))

    return setup


def recipe(text: str) -> Callable[[Env], None]:
    """box/r.yml holding `text`, with {hf} and {sft} the fixtures' model folders."""
    return lambda env: (env.box / "r.yml").write_text(text.format(hf=env.f("hf"), sft=env.f("sft")))


YAML_BOMB = (
    "a: &a [x, x, x, x, x, x, x, x, x]\n"
    + "".join(f"{b}: &{b} [{', '.join(['*' + a] * 9)}]\n" for a, b in zip("abcdefgh", "bcdefghi"))
    + "merge_method: linear\n"
)


# ----------------------------------------------------------------------------- the cases


def _train(*extra: str) -> Callable[[Env], list[str]]:
    return lambda env: ["--config", "tiny_coarse.py", *extra, "--workdir", str(env.box / "w")]


def _reward(*extra: str) -> Callable[[Env], list[str]]:
    return lambda env: ["--config", "tiny_reward.py", *extra, "--workdir", str(env.box / "w")]


def _resume(*extra: str) -> Callable[[Env], list[str]]:
    return lambda env: ["--config", "tiny_coarse.py", *env.run_args, *extra, "--workdir", str(env.box / "w")]


def _config_file(text: str) -> Callable[[Env], None]:
    return lambda env: (env.box / "conf.py").write_text(text)


def _export(*extra: str, out: str = "out") -> Callable[[Env], list[str]]:
    return lambda env: ["--checkpoint", str(env.run), "--out", str(env.box / out), *extra]


def _generate(*extra: str) -> Callable[[Env], list[str]]:
    return lambda env: ["--model", env.f("hf"), "--prompt", "Hi", *extra]


def _merge(*extra: str, out: Callable[[Env], str] = lambda env: str(env.box / "out")) -> Callable[[Env], list[str]]:
    return lambda env: ["--coarse", env.f("hf"), "--sft", env.f("sft"), "--gamma", "0.5", "--out", out(env), *extra]


def _sweep(
    *extra: str,
    out: Callable[[Env], str] = lambda env: str(env.box / "out"),
    coarse: Callable[[Env], str] = lambda env: str(env.run),
) -> Callable[[Env], list[str]]:
    return lambda env: [
        "--coarse",
        coarse(env),
        "--sft",
        env.f("hf"),
        "--reward-model",
        env.f("rm"),
        "--gammas",
        "0.5",
        "--out",
        out(env),
        "--limit",
        "2",
        "--max-new-tokens",
        "4",
        *extra,
    ]


def _sft(*extra: str) -> Callable[[Env], list[str]]:
    return lambda env: [
        "--base",
        env.f("hf"),
        "--out",
        str(env.box / "out"),
        "--steps",
        "1",
        "--batch-size",
        "2",
        *extra,
    ]


def _evaluate(*extra: str) -> Callable[[Env], list[str]]:
    return lambda env: ["--model", env.f("hf"), "--limit", "2", "--max-new-tokens", "4", *extra]


CASES = [
    # train: numbers out of range, each refused before any work
    *[
        Case(f"train {o}", "train", _train(o))
        for o in (
            "--config.steps=-5",
            "--config.steps=0",
            "--config.checkpoint_every=0",
            "--config.keep_checkpoints=0",
            "--config.seed=-1",
            "--config.ppo.actor.lr=-1",
            "--config.ppo.critic.lr=0",
            "--config.ppo.actor.warmup_steps=-1",
            "--config.ppo.actor.max_grad_norm=0",
            "--config.ppo.critic.weight_decay=-1",
            "--config.ppo.kl_coef=-0.1",
            "--config.ppo.gamma=1.5",
            "--config.ppo.lam=-0.1",
            "--config.ppo.clip_ratio=0",
            "--config.ppo.value_clip=-1",
            "--config.ppo.reward_clip=0",
            "--config.ppo.epochs=0",
            "--config.ppo.kl_estimator=k9",
            "--config.ppo.kl_target=-1",
            "--config.ppo.kl_horizon=0",
            "--config.ppo.actor.decay_steps=-1",
            "--config.cm.window=1",
            "--config.cm.buckets=(16,8)",
            "--config.cm.buckets=(8,4096)",
            "--config.reward_model.train.data.seq_buckets=(8192,)",
            "--config.cm.threshold=2",
            "--config.cm.mode=bogus",
            "--config.cm.min_steps=-1",
            "--config.rollout.temperature=0",
            "--config.rollout.top_p=0",
            "--config.rollout.top_k=-1",
            "--config.data.batch_size=0",
            "--config.data.batch_size=-4",
            "--config.data.prompt_buckets=(0,)",
            "--config.model.param_dtype=int8",
            "--config.model.compute_dtype=abc",
            "--config.model.reference_dtype=int32",
            "--config.model.remat=bogus",
            "--config.model.pretrain_steps=-1",
            "--config.reward_model.dtype=int8",
            "--config.reward_model.train.steps=-1",
            "--config.reward_model.train.optim.lr=-1",
            "--config.reward_model.train.data.batch_size=0",
            "--config.reward_model.train.data.eval_fraction=1.5",
            "--config.mesh.tensor=0",
            "--config.mesh.data=-1",
            "--config.mesh.fsdp=64",
            "--config.job=bogus",
        )
    ],
    # train: the command line and the config file
    Case("train unknown key (suggestion)", "train", _train("--config.ppo.kl_coeff=0.1")),
    Case("train unknown top-level key", "train", _train("--config.nonexistent=1")),
    Case("train value of the wrong type", "train", _train("--config.steps=abc")),
    Case("train no --config", "train", lambda env: ["--workdir", str(env.box / "w")]),
    Case("train config file not found", "train", lambda env: ["--config", "nope.py"]),
    Case(
        "train config syntax error",
        "train",
        lambda env: ["--config", str(env.box / "conf.py")],
        _config_file("def get_config(:\n"),
    ),
    Case(
        "train config raises",
        "train",
        lambda env: ["--config", str(env.box / "conf.py")],
        _config_file("def get_config():\n    return 1 / 0\n"),
    ),
    Case(
        "train config without get_config",
        "train",
        lambda env: ["--config", str(env.box / "conf.py")],
        _config_file("x = 1\n"),
    ),
    Case(
        "train --workdir is a file",
        "train",
        lambda env: ["--config", "tiny_coarse.py", "--workdir", env.f("empty.jsonl")],
    ),
    # train: data
    Case("train empty .jsonl", "train", lambda env: _train(f"--config.data.source={env.f('empty.jsonl')}")(env)),
    Case("train garbage .jsonl", "train", lambda env: _train(f"--config.data.source={env.f('garbage.jsonl')}")(env)),
    Case(
        "train .jsonl without the columns",
        "train",
        lambda env: _train(f"--config.data.source={env.f('nocols.jsonl')}")(env),
    ),
    Case("train data file not found", "train", _train("--config.data.source=/nowhere/pairs.jsonl")),
    Case(
        "train data file of another type",
        "train",
        lambda env: _train(f"--config.data.source={env.f('prompts.txt')}")(env),
    ),
    # train: models
    Case("train model.base not found", "train", _train("--config.model.base=/nowhere/mistral")),
    Case("train model.base is a file", "train", lambda env: _train(f"--config.model.base={env.f('empty.jsonl')}")(env)),
    Case(
        "train model.base has no config.json", "train", lambda env: _train(f"--config.model.base={env.fixtures}")(env)
    ),
    Case("train model.base is a reward model", "train", lambda env: _train(f"--config.model.base={env.f('rm')}")(env)),
    Case("train reward_model.path not found", "train", _train("--config.reward_model.path=/nowhere/rm")),
    Case(
        "train reward_model.path is a causal LM",
        "train",
        lambda env: _train(f"--config.reward_model.path={env.f('hf')}")(env),
    ),
    Case(
        "train reward model with fewer positions than the buckets",
        "train",
        lambda env: _train(f"--config.reward_model.path={env.box / 'rm'}")(env),
        short_reward_model,
    ),
    # train: the workdir and its checkpoints
    Case("train incompatible workdir", "train", _resume("--config.ppo.kl_coef=0.5"), lambda env: env.copy_run()),
    Case("train truncated checkpoint file", "train", _resume(), truncate_latest),
    Case("train every checkpoint truncated", "train", _resume(), truncate_all),
    Case("train checkpoint _METADATA deleted", "train", _resume(), delete_in_latest("_METADATA")),
    Case("train checkpoint manifest deleted", "train", _resume(), delete_in_latest("manifest.ocdbt")),
    Case("train checkpoint meta deleted", "train", _resume(), delete_in_latest("metadata")),
    Case("train run_config.json garbled", "train", _resume(), garble_run_config),
    # the reward job
    *[
        Case(f"train reward {o}", "train", _reward(o))
        for o in (
            "--config.optim.lr=-1",
            "--config.eval_every=0",
            "--config.data.seq_buckets=(0,)",
            "--config.data.seq_buckets=(8192,)",
            "--config.data.eval_fraction=0",
            "--config.steps=-1",
        )
    ],
    # export
    Case("export --dtype int8", "export", _export("--dtype", "int8")),
    Case("export --dtype abc", "export", _export("--dtype", "abc")),
    Case(
        "export --checkpoint not found", "export", lambda env: ["--checkpoint", "/nowhere", "--out", str(env.box / "o")]
    ),
    Case(
        "export --checkpoint is an HF folder",
        "export",
        lambda env: ["--checkpoint", env.f("hf"), "--out", str(env.box / "o")],
    ),
    Case("export --step without a checkpoint", "export", _export("--step", "999")),
    Case(
        "export --out is the workdir",
        "export",
        lambda env: ["--checkpoint", str(env.box / "w"), "--out", str(env.box / "w"), "--overwrite"],
        lambda env: env.copy_run(),
    ),
    Case(
        "export --out inside the checkpoints",
        "export",
        lambda env: ["--checkpoint", str(env.box / "w"), "--out", str(env.box / "w" / "checkpoints" / "x")],
        lambda env: env.copy_run(),
    ),
    Case(
        "export truncated checkpoint",
        "export",
        lambda env: ["--checkpoint", str(env.box / "w"), "--out", str(env.box / "o")],
        truncate_latest_arrays,
    ),
    Case(
        "export checkpoint _METADATA deleted",
        "export",
        lambda env: ["--checkpoint", str(env.box / "w"), "--out", str(env.box / "o")],
        delete_in_latest("_METADATA"),
    ),
    # generate
    Case("generate --dtype int8", "generate", _generate("--dtype", "int8")),
    Case("generate --dtype abc", "generate", _generate("--dtype", "abc")),
    Case("generate --max-new-tokens 1000000000", "generate", _generate("--max-new-tokens", "1000000000")),
    Case("generate --max-new-tokens 0", "generate", _generate("--max-new-tokens", "0")),
    Case("generate --batch-size 0", "generate", _generate("--batch-size", "0")),
    Case("generate --prompt-buckets 0,abc", "generate", _generate("--prompt-buckets", "0,abc")),
    Case("generate --top-p 0", "generate", _generate("--top-p", "0")),
    Case("generate --temperature -1", "generate", _generate("--temperature", "-1")),
    Case("generate --model not found", "generate", lambda env: ["--model", "/nowhere", "--prompt", "Hi"]),
    Case("generate --model is a reward model", "generate", lambda env: ["--model", env.f("rm"), "--prompt", "Hi"]),
    Case(
        "generate truncated safetensors",
        "generate",
        lambda env: ["--model", str(env.box / "m"), "--prompt", "Hi"],
        truncate_safetensors,
    ),
    Case(
        "generate empty prompts file",
        "generate",
        lambda env: ["--model", env.f("hf"), "--prompts-file", env.f("empty.txt")],
    ),
    Case(
        "generate --out inside --model",
        "generate",
        lambda env: ["--model", str(env.box / "m"), "--prompt", "Hi", "--out", str(env.box / "m" / "o.jsonl")],
        copy_hf,
    ),
    # merge
    Case("merge --out inside --sft", "merge", _merge(out=lambda env: env.f("sft") + "/merged")),
    Case("merge --out inside --coarse", "merge", _merge(out=lambda env: env.f("hf") + "/merged")),
    Case("merge --out is --sft", "merge", _merge("--overwrite", out=lambda env: env.f("sft"))),
    Case("merge --out contains --sft", "merge", _merge("--overwrite", out=lambda env: str(env.fixtures))),
    Case("merge --gamma 1.5", "merge", _merge("--gamma", "1.5")),
    Case("merge --gamma abc", "merge", _merge("--gamma", "abc")),
    Case(
        "merge --coarse not found",
        "merge",
        lambda env: ["--coarse", "/nowhere", "--sft", env.f("sft"), "--gamma", "0.5", "--out", str(env.box / "o")],
    ),
    Case("merge --max-shard-size abc", "merge", _merge("--max-shard-size", "abc")),
    Case(
        "merge truncated coarse checkpoint",
        "merge",
        lambda env: [
            "--coarse",
            str(env.box / "w"),
            "--sft",
            env.f("sft"),
            "--gamma",
            "0.5",
            "--out",
            str(env.box / "o"),
        ],
        truncate_latest_arrays,
    ),
    # sweep
    Case(
        "sweep --out inside the coarse workdir",
        "sweep",
        _sweep(out=lambda env: str(env.box / "w" / "sweep"), coarse=lambda env: str(env.box / "w")),
        lambda env: env.copy_run(),
    ),
    Case("sweep --out inside --sft", "sweep", _sweep(out=lambda env: env.f("hf") + "/sweep")),
    Case("sweep --gammas 2", "sweep", _sweep("--gammas", "2")),
    Case("sweep --reward-model not found", "sweep", _sweep("--reward-model", "/nowhere")),
    Case("sweep --max-new-tokens 0", "sweep", _sweep("--max-new-tokens", "0")),
    Case("sweep --dtype int8", "sweep", _sweep("--dtype", "int8")),
    # sft
    Case("sft --steps 0", "sft", _sft("--steps", "0")),
    Case("sft --lr -1", "sft", _sft("--lr", "-1")),
    Case("sft --base not found", "sft", lambda env: ["--base", "/nowhere", "--out", str(env.box / "o")]),
    Case(
        "sft --out inside --base",
        "sft",
        lambda env: ["--base", str(env.box / "m"), "--out", str(env.box / "m" / "sft")],
        copy_hf,
    ),
    Case("sft empty data", "sft", lambda env: _sft("--data", env.f("empty.jsonl"))(env)),
    # evaluate
    Case(
        "evaluate --json inside --model",
        "evaluate",
        lambda env: ["--model", str(env.box / "m"), "--json", str(env.box / "m" / "e.json")],
        copy_hf,
    ),
    Case("evaluate --model not found", "evaluate", lambda env: ["--model", "/nowhere"]),
    Case("evaluate empty prompts file", "evaluate", lambda env: _evaluate("--prompts", env.f("empty.txt"))(env)),
    Case("evaluate --dtype int8", "evaluate", _evaluate("--dtype", "int8")),
    Case("evaluate --tasks with bad shots", "evaluate", _evaluate("--tasks", "arc_easy:x")),
    Case("evaluate --limit 0", "evaluate", _evaluate("--limit", "0")),
    Case("evaluate unknown lm-eval task", "evaluate", _evaluate("--tasks", "no_such_task")),
    Case("evaluate --temperature nan", "evaluate", _evaluate("--temperature", "nan")),
    Case(
        "evaluate --json is an existing folder",
        "evaluate",
        _evaluate("--json", "out", "--overwrite"),
        an_existing_folder,
    ),
    Case("evaluate --json exists", "evaluate", _evaluate("--json", "out.txt"), an_existing_file),
    Case(
        "evaluate --model with a NaN weight",
        "evaluate",
        lambda env: ["--model", str(env.box / "m"), "--limit", "2"],
        nan_weight("hf"),
    ),
    # train: non-finite numbers, inputs and outputs that overlap, prompts that do not fit, torn files
    *[
        Case(f"train {o}", "train", _train(o))
        for o in (
            "--config.rollout.temperature=nan",
            "--config.cm.w_critic=nan",
            "--config.ppo.actor.lr=inf",
            "--config.cm.bias=inf",
            "--config.ppo.kl_coef=-inf",
        )
    ],
    Case(
        "train --workdir is model.base",
        "train",
        lambda env: [
            "--config",
            "tiny_coarse.py",
            f"--config.model.base={env.box / 'm'}",
            "--workdir",
            str(env.box / "m"),
        ],
        copy_hf,
    ),
    Case(
        "train --workdir inside model.base",
        "train",
        lambda env: [
            "--config",
            "tiny_coarse.py",
            f"--config.model.base={env.box / 'm'}",
            "--workdir",
            str(env.box / "m" / "run"),
        ],
        copy_hf,
    ),
    Case(
        "train model.base with a NaN weight",
        "train",
        lambda env: _train(
            f"--config.model.base={env.box / 'm'}",
            f"--config.reward_model.path={env.f('rm')}",
            "--config.cm.buckets=(4,)",
            "--config.data.prompt_buckets=(128,)",
        )(env),
        nan_weight("hf"),
    ),
    Case(
        "train model.base config.json disagrees with its tensors",
        "train",
        lambda env: _train(f"--config.model.base={env.box / 'm'}", f"--config.reward_model.path={env.f('rm')}")(env),
        wider_config,
    ),
    Case(
        "train prompts longer than every bucket, truncation off",
        "train",
        _train("--config.data.truncate_prompts=False", "--config.data.prompt_buckets=(8,)"),
    ),
    Case("train metrics.jsonl with a garbled row", "train", _resume(), metrics_line("{garbled", "first")),
    # export
    Case("export --dtype float8_e4m3fn", "export", _export("--dtype", "float8_e4m3fn")),
    Case("export --out exists", "export", _export(), an_existing_folder),
    Case("export --out is an existing file", "export", _export("--overwrite", out="out.txt"), an_existing_file),
    # generate
    Case("generate --temperature nan", "generate", _generate("--temperature", "nan")),
    Case(
        "generate --out is an existing folder",
        "generate",
        lambda env: _generate("--out", str(env.box / "out"), "--overwrite")(env),
        an_existing_folder,
    ),
    Case(
        "generate --out exists",
        "generate",
        lambda env: _generate("--out", str(env.box / "out.txt"))(env),
        an_existing_file,
    ),
    Case(
        "generate --model with a NaN weight",
        "generate",
        lambda env: ["--model", str(env.box / "m"), "--prompt", "Hi"],
        nan_weight("hf"),
    ),
    # merge
    Case("merge --out exists", "merge", _merge(), an_existing_folder),
    Case(
        "merge --sft with a NaN weight",
        "merge",
        lambda env: [
            "--coarse",
            env.f("hf"),
            "--sft",
            str(env.box / "m"),
            "--gamma",
            "0.5",
            "--out",
            str(env.box / "o"),
        ],
        nan_weight("sft"),
    ),
    Case(
        "merge --config YAML alias bomb",
        "merge",
        lambda env: ["--config", str(env.box / "r.yml"), "--out", str(env.box / "o")],
        recipe(YAML_BOMB),
    ),
    Case(
        "merge --config null model",
        "merge",
        lambda env: ["--config", str(env.box / "r.yml"), "--out", str(env.box / "o")],
        recipe("merge_method: linear\nmodels:\n  - model:\n    parameters: {{weight: 1}}\n"),
    ),
    Case(
        "merge --config parameters as a list",
        "merge",
        lambda env: ["--config", str(env.box / "r.yml"), "--out", str(env.box / "o")],
        recipe("merge_method: linear\nmodels:\n  - model: {hf}\n    parameters: [1, 2]\n"),
    ),
    Case(
        "merge --config linear weights summing to 0",
        "merge",
        lambda env: ["--config", str(env.box / "r.yml"), "--out", str(env.box / "o")],
        recipe(
            "merge_method: linear\nmodels:\n  - model: {hf}\n    parameters: {{weight: 1}}\n"
            "  - model: {sft}\n    parameters: {{weight: -1}}\n"
        ),
    ),
    Case(
        "merge --config ties density -0.5",
        "merge",
        lambda env: ["--config", str(env.box / "r.yml"), "--out", str(env.box / "o")],
        recipe(
            "merge_method: ties\nbase_model: {sft}\nmodels:\n  - model: {hf}\n"
            "    parameters: {{weight: 1, density: -0.5}}\n"
        ),
    ),
    # sweep
    Case("sweep unknown lm-eval task", "sweep", _sweep("--tasks", "no_such_task")),
    Case("sweep --out exists", "sweep", _sweep(), an_existing_folder),
    # plot
    Case(
        "plot --out is an existing folder",
        "plot",
        lambda env: [str(env.box / "w"), "--out", str(env.box / "out"), "--overwrite"],
        lambda env: (env.copy_run(), an_existing_folder(env)),
    ),
    Case(
        "plot --out is the workdir",
        "plot",
        lambda env: [str(env.box / "w"), "--out", str(env.box / "w"), "--overwrite"],
        lambda env: env.copy_run(),
    ),
    Case(
        "plot metrics.jsonl torn last line",
        "plot",
        lambda env: [str(env.box / "w")],
        metrics_line('{"step": 9, "rew', "end"),
    ),
    Case("plot not a workdir", "plot", lambda env: [env.f("hf")]),
    # plan, local_job
    Case("plan --devices 0", "plan", lambda env: ["--config", "tiny_coarse.py", "--devices", "0"]),
    Case("local_job --processes 0", "local_job", lambda env: ["--processes", "0", "--", "true"]),
    # lm_eval
    *[
        Case(
            f"lm_eval {name}",
            "lm_eval",
            lambda env, a=args: [
                "--model",
                "c2f-jax",
                "--model_args",
                a.format(hf=env.f("hf"), run=env.run),
                "--tasks",
                "arc_easy",
                "--limit",
                "1",
            ],
        )
        for name, args in (
            ("pretrained not found", "pretrained=/nowhere"),
            ("step without a checkpoint", "pretrained={run},step=999"),
            ("gamma 2", "coarse={hf},sft={hf},gamma=2"),
            ("coarse without sft", "coarse={hf},gamma=0.5"),
            ("mesh larger than the devices", "pretrained={hf},mesh=4x4x4"),
        )
    ],
    Case(
        "lm_eval --batch_size 0",
        "lm_eval",
        lambda env: [
            "--model",
            "c2f-jax",
            "--model_args",
            f"pretrained={env.f('hf')}",
            "--batch_size",
            "0",
            "--tasks",
            "arc_easy",
        ],
    ),
    Case(
        "lm_eval unknown task",
        "lm_eval",
        lambda env: ["--model", "c2f-jax", "--model_args", f"pretrained={env.f('hf')}", "--tasks", "no_such_task"],
    ),
]


# ----------------------------------------------------------------------------- running a case


def _entry(tool: str):
    """The `main` a shell command runs for `tool`."""
    where = COMMANDS[tool]
    if isinstance(where, str):
        return importlib.import_module(where).main
    spec = importlib.util.spec_from_file_location(f"{tool}_script", where)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def snapshot(folder: Path) -> dict:
    """Every path under `folder` with its size and modification time (files) or None (folders): a write
    changes one of them, a read neither."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        out[rel] = (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() and not p.is_symlink() else None
    return out


def _fork_run(main, argv: list[str], cwd: Path, log: Path, timeout: float) -> tuple[int, float]:
    from c2f_jax.runtime import cli

    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # the child: the command as a shell would run it
        code = 1
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.chdir(cwd)
            sys.argv = ["c2f", *argv]
            cli.run(lambda: main(argv))
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    deadline = start + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status), time.perf_counter() - start
        if time.perf_counter() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return -9, time.perf_counter() - start
        time.sleep(0.05)


def _subprocess_run(tool: str, argv: list[str], cwd: Path, log: Path, timeout: float) -> tuple[int, float]:
    where = COMMANDS[tool]
    cmd = [sys.executable, "-m", where] if isinstance(where, str) else [sys.executable, str(where)]
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(log, "w") as fh:
        try:
            rc = subprocess.run([*cmd, *argv], cwd=cwd, stdout=fh, stderr=fh, timeout=timeout, env=env).returncode
        except subprocess.TimeoutExpired:
            rc = -9
    return rc, time.perf_counter() - start


def verdict(rc: int, output: str, changed: list[str]) -> str:
    """'' when refused cleanly, else what was wrong."""
    lines = [line for line in output.splitlines() if line.strip()]
    if rc == -9:
        return "not refused within the time limit (it went to work)"
    if rc != 2:
        return f"exit status {rc}"
    if "Traceback" in output:
        return "a traceback"
    if len(lines) != 1 or not lines[0].startswith("error: "):
        return f"{len(lines)} lines of output, not one 'error: ...'"
    if changed:
        return f"created or changed {changed[:3]}"
    return ""


def run_case(case: Case, env: Env, mode: str = "fork", timeout: float = 90) -> dict:
    env.box.mkdir(parents=True)
    if case.setup:
        case.setup(env)
    argv = case.argv(env)
    # The case's folder, its siblings' folder and the shared inputs: a refused case changes none of them.
    watched = [env.box, env.box.parent, env.fixtures, env.run]
    before = [snapshot(w) for w in watched]
    log = Path(tempfile.mkstemp(suffix=".log")[1])
    if mode == "fork":
        rc, seconds = _fork_run(_entry(case.tool), argv, env.box, log, timeout)
    else:
        rc, seconds = _subprocess_run(case.tool, argv, env.box, log, timeout)
    output = log.read_text(errors="replace")
    log.unlink()
    changed = []
    for w, b in zip(watched, before):
        a = snapshot(w)
        changed += [f"{w.name}/{k}" for k in sorted(set(a) | set(b)) if a.get(k, "absent") != b.get(k, "absent")]
    return {
        "name": case.name,
        "tool": case.tool,
        "argv": argv,
        "rc": rc,
        "output": output.strip()[-3000:],
        "seconds": round(seconds, 2),
        "problem": verdict(rc, output, changed),
    }


# ----------------------------------------------------------------------------- fixtures


BAD_FILES = {
    "empty.jsonl": "",
    "garbage.jsonl": "{this is not json\n\x00\x01 nor this\n",
    "nocols.jsonl": '{"question": "a", "answer": "b"}\n',
    "empty.txt": "\n\n",
    "prompts.txt": "Why is the sky blue?\n",
}


def make_fixtures(folder: Path, with_run: bool = True) -> None:
    """hf/ and sft/ (tiny random causal LMs), rm/ (a reward model), the bad files, and (`with_run`) a coarse
    workdir run/ with two checkpoints and run_args.json, the overrides that made it. In a process of its own:
    it starts JAX's backend, after which this process could not fork safely."""
    code = f"""
import json, sys
from pathlib import Path
sys.path.insert(0, {str(ROOT)!r})
import jax
from c2f_jax import train
from c2f_jax.jobs import coarse
from c2f_jax.model import hf, model, tokenizer
from c2f_jax.rl import reward
folder = Path({str(folder)!r})
tok = tokenizer.load_tokenizer(None)
for name, seed in (("hf", 0), ("sft", 1)):
    params = model.init_params(model.TINY, jax.random.key(seed))
    hf.save_pretrained(folder / name, model.TINY, params, tokenizer_source=tok)
rm_config, rm_params = reward.init_from_base(model.TINY, params, jax.random.key(2))
hf.save_pretrained(folder / "rm", rm_config, rm_params, tokenizer_source=tok)
args = ["--config.steps=2", "--config.checkpoint_every=1", f"--config.model.base={{folder / 'hf'}}",
        f"--config.reward_model.path={{folder / 'rm'}}", "--config.cm.buckets=(4,)", "--config.data.prompt_buckets=(128,)"]
if {with_run!r}:
    config, _ = train.parse_args(["--config", "tiny_coarse.py", *args])
    coarse.run_coarse(config, folder / "run", show_progress=False)
    (folder / "run_args.json").write_text(json.dumps(args))
"""
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def write_bad_files(folder: Path) -> None:
    for name, text in BAD_FILES.items():
        (folder / name).write_text(text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fixtures", help="folder with hf/, sft/, rm/ (made when missing)")
    p.add_argument("--run", help="a coarse workdir with two or more checkpoints (default FIXTURES/run)")
    p.add_argument("--run-args", help="JSON list of the overrides that made --run (default FIXTURES/run_args.json)")
    p.add_argument("--only", action="append", help="run the cases whose name contains this (repeatable)")
    p.add_argument("--subprocess", action="store_true", help="a fresh interpreter per case instead of a fork")
    p.add_argument("--timeout", type=float, default=90, help="seconds a case may take before it counts as accepted")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    fixtures = Path(args.fixtures or tempfile.mkdtemp(prefix="c2f-bad-fixtures-")).absolute()
    if not (fixtures / "hf").is_dir():
        print(f"making fixtures in {fixtures} ...", file=sys.stderr)
        make_fixtures(fixtures, with_run=args.run is None)
    write_bad_files(fixtures)
    run = Path(args.run).absolute() if args.run else fixtures / "run"
    run_args = json.loads(Path(args.run_args or fixtures / "run_args.json").read_text())
    # Import every CLI once, before forking: each child then starts at once.
    for tool in COMMANDS:
        _entry(tool)
    scratch = Path(tempfile.mkdtemp(prefix="c2f-bad-"))
    results = []
    for i, case in enumerate(c for c in CASES if not args.only or any(o in c.name for o in args.only)):
        env = Env(scratch / f"case{i}", fixtures, run, run_args)
        r = run_case(case, env, "subprocess" if args.subprocess else "fork", args.timeout)
        results.append(r)
        shutil.rmtree(env.box, ignore_errors=True)
        last = r["output"].splitlines()[-1] if r["output"] else ""
        print(
            f"{'ok  ' if not r['problem'] else 'FAIL'} {r['seconds']:6.1f} s  {case.name}: {r['problem'] or last}",
            flush=True,
        )
    bad = [r for r in results if r["problem"]]
    print(f"{len(results) - len(bad)} of {len(results)} refused cleanly")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    shutil.rmtree(scratch, ignore_errors=True)
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
