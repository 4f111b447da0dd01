"""Merge benchmark: tools/merge.py against mergekit's linear merge and the raw I/O floor, on ~1 GB fp32 checkpoints.

  python benchmarks/bench_merge.py                 # ours, a 5-gamma sweep of ours, and the I/O floor
  python benchmarks/bench_merge.py --mergekit      # also mergekit (installed into WORKDIR/mergekit-venv on first use)

Two synthetic Mistral-shaped fp32 checkpoints (random weights, sharded with an index) are written once under
--workdir and reused. Each contender runs as its own process; wall time is the whole process, start-up
included; peak RSS and CPU time (user + system) come from wait4() for that process alone (started from a
small launcher). Contenders take turns, so load from other work on the machine falls on all alike.
"Start-up" is the same program doing nothing (--help), so "above start-up" is what the merge itself costs in
memory. The I/O floor reads both inputs and writes one output of the same size (five for the sweep's
floor), fsync'd, in 8 MiB chunks. Inputs are warm in the page cache for every contender. Prints Markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np

from c2f_jax.model import hf, model, safetensors_io
from c2f_jax.runtime import workdir

ROOT = Path(__file__).resolve().parent.parent
GAMMA = 0.7
# For the venv only: 2.13.0 is the CPU build on this disk; a bare `torch` would pull a multi-GB CUDA build.
TORCH_PIN = "torch==2.13.0"

# Reads every input shard, then writes `outputs` files of one model's size each, fsync'd.
FLOOR = """
import os, sys
outputs, ins, out = int(sys.argv[1]), sys.argv[2:-1], sys.argv[-1]
buf = bytearray(8 << 20)
total = 0
for path in ins:
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            total += n
for k in range(outputs):
    with open(f"{out}.{k}", "wb", buffering=0) as f:
        left = total // 2  # one model's worth
        while left > 0:
            left -= f.write(memoryview(buf)[:min(len(buf), left)])
        os.fsync(f.fileno())
"""


def bench_config(layers: int) -> model.MistralConfig:
    """Mistral-7B's vocabulary and head layout at width 1024: 14 layers make ~1.0 GB of fp32."""
    return model.MistralConfig(
        hidden_size=1024,
        intermediate_size=3584,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=4,
        head_dim=64,
    )


def write_checkpoint(folder: Path, config: model.MistralConfig, seed: int, shard_bytes: int = 300 << 20) -> None:
    """A sharded fp32 HF folder of random weights, tensor by tensor."""
    if (folder / "config.json").exists():
        return
    rng = np.random.default_rng(seed)
    tensors = [
        (
            s.hf_name,
            s.hf_shape,
            np.float32,
            lambda s=s: rng.standard_normal(s.hf_shape, dtype=np.float32) * np.float32(0.02),
        )
        for s in hf.tensor_specs(config)
    ]

    def fill(tmp: Path) -> None:
        safetensors_io.write_checkpoint(tmp, tensors, shard_bytes)
        (tmp / "config.json").write_text(json.dumps(config.to_hf("float32"), indent=2))

    workdir.write(folder, fill, overwrite=True, folder=True)  # replaces a folder a killed run left unfinished


# Runs the command and reports its wall time, peak RSS and CPU time. A small launcher process in between,
# because a child's ru_maxrss starts from its parent's RSS at fork (Linux carries the high-water mark across
# exec), and this benchmark's own process is large.
LAUNCHER = """
import os, subprocess, sys, time
start = time.perf_counter()
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
_, status, usage = os.wait4(proc.pid, 0)
print(os.waitstatus_to_exitcode(status), time.perf_counter() - start, usage.ru_maxrss, usage.ru_utime + usage.ru_stime)
"""


def measure(cmd: list[str], env: dict | None = None) -> tuple[float, float, float]:
    """(wall seconds, peak RSS MiB, CPU seconds) of one run of `cmd`; raises if it fails."""
    r = subprocess.run([sys.executable, "-c", LAUNCHER, *map(str, cmd)], capture_output=True, text=True, env=env)
    code, wall, maxrss, cpu = r.stdout.split() if r.returncode == 0 else (r.returncode, 0, 0, 0)
    if int(code):
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({code}): {r.stderr[-2000:]}")
    return float(wall), int(maxrss) / 1024, float(cpu)  # Linux reports KiB


def mergekit_venv(work: Path) -> Path:
    """WORKDIR/mergekit-venv with torch (CPU, pinned first) and mergekit; created on first use."""
    venv = work / "mergekit-venv"
    exe = venv / "bin" / "mergekit-yaml"
    if exe.exists():
        return exe
    print(f"installing mergekit into {venv} ...", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    subprocess.run(pip + [TORCH_PIN], check=True)
    subprocess.run(pip + ["mergekit", TORCH_PIN], check=True)  # keep the pin, so nothing swaps in a CUDA build
    return exe


def mergekit_config(path: Path, coarse: Path, sft: Path) -> Path:
    path.write_text(
        "merge_method: linear\n"
        f"models:\n  - model: {coarse}\n    parameters: {{weight: {GAMMA}}}\n"
        f"  - model: {sft}\n    parameters: {{weight: {1 - GAMMA:.10g}}}\n"
        "parameters: {normalize: false}\n"
        "dtype: float32\nout_dtype: float32\n"
    )
    return path


def method_recipe(path: Path, method: str, coarse: Path, sft: Path) -> Path:
    """A mergekit YAML recipe of `method` on the pair: the SFT model as base (SLERP's t = 0 end), the coarse
    model as the other (weight and t GAMMA, density 0.5)."""
    params = f"{{t: {GAMMA}}}" if method == "slerp" else "{normalize: false}"
    model = "" if method == "slerp" else f"\n    parameters: {{weight: {GAMMA}, density: 0.5}}"
    path.write_text(
        f"merge_method: {method}\nbase_model: {sft}\nmodels:\n  - model: {coarse}{model}\n"
        f"parameters: {params}\ndtype: float32\nout_dtype: float32\n"
    )
    return path


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({platform.machine()})"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def max_difference(a: Path, b: Path) -> float:
    ra, rb = hf.CheckpointReader(a), hf.CheckpointReader(b)
    name = "model.layers.0.mlp.down_proj.weight"
    return float(np.abs(np.asarray(ra.get(name)) - np.asarray(rb.get(name))).max())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="/tmp/c2f_bench_merge", help="inputs, outputs and the mergekit venv")
    p.add_argument("--layers", type=int, default=14, help="decoder layers of the synthetic model (14: ~1.0 GB fp32)")
    p.add_argument("--repeats", type=int, default=2, help="runs per contender; best wall and CPU time, highest RSS")
    p.add_argument("--mergekit", action="store_true", help="also time mergekit (creates its venv if needed)")
    p.add_argument("--no-sweep", action="store_true", help="skip the 5-gamma sweep")
    p.add_argument(
        "--methods",
        default="",
        help="comma-separated recipe methods to time too (slerp, "
        "task_arithmetic, ties, dare_linear, dare_ties): SFT as base, the coarse model as the one model",
    )
    args = p.parse_args(argv)

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    config = bench_config(args.layers)
    coarse, sft = work / f"coarse-{args.layers}l", work / f"sft-{args.layers}l"
    write_checkpoint(coarse, config, seed=0)
    write_checkpoint(sft, config, seed=1)
    model_bytes = sum(f.stat().st_size for f in coarse.glob("*.safetensors"))
    shards = sorted(str(f) for d in (coarse, sft) for f in d.glob("*.safetensors"))
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")
    load = os.getloadavg()  # other work on the machine slows every contender; say how busy it was

    # (name, command, start-up command, I/O floor it is compared with); floors name themselves.
    floor = lambda n: [sys.executable, "-c", FLOOR, str(n), *shards, str(work / "floor")]
    tool = [sys.executable, str(ROOT / "tools" / "merge.py")]
    ours = tool + ["--coarse", str(coarse), "--sft", str(sft), "--max-shard-size", "400MB", "--overwrite"]
    runs = [
        ("I/O floor: read 2 inputs, write 1 output", floor(1), [sys.executable, "-c", "pass"], 0),
        ("ours: tools/merge.py", ours + ["--gamma", str(GAMMA), "--out", str(work / "out-ours")], tool + ["--help"], 0),
    ]
    if not args.no_sweep:
        runs += [
            ("I/O floor: read 2 inputs, write 5 outputs", floor(5), [sys.executable, "-c", "pass"], 2),
            (
                "ours: sweep of 5 gammas, 5 outputs",
                ours + ["--gamma", "0.1,0.3,0.5,0.7,0.9", "--out", str(work / "out-sweep")],
                tool + ["--help"],
                2,
            ),
        ]
    if args.mergekit:
        exe = mergekit_venv(work)
        cfg = mergekit_config(work / "mergekit.yml", coarse, sft)
        mk = [
            str(exe),
            str(cfg),
            str(work / "out-mergekit"),
            "--no-copy-tokenizer",
            "--no-write-model-card",
            "--out-shard-size",
            "100M",
            "--quiet",
        ]
        runs.append(("mergekit linear: mergekit-yaml", mk, [str(exe), "--help"], 0))
    for method in args.methods.split(",") if args.methods else []:
        recipe = method_recipe(work / f"{method}.yml", method, coarse, sft)
        runs.append(
            (
                f"ours {method}: tools/merge.py --config",
                tool
                + [
                    "--config",
                    str(recipe),
                    "--out",
                    str(work / f"out-ours-{method}"),
                    "--max-shard-size",
                    "400MB",
                    "--overwrite",
                ],
                tool + ["--help"],
                0,
            )
        )
        if args.mergekit:
            runs.append(
                (
                    f"mergekit {method}: mergekit-yaml",
                    [
                        str(exe),
                        str(recipe),
                        str(work / f"out-mk-{method}"),
                        "--no-copy-tokenizer",
                        "--no-write-model-card",
                        "--out-shard-size",
                        "100M",
                        "--quiet",
                    ],
                    [str(exe), "--help"],
                    0,
                )
            )

    for f in shards:  # warm the page cache the same way for everyone
        Path(f).read_bytes()
    startup = [measure(r[2], env)[1] for r in runs]
    # Round-robin, so that load from other work on the machine falls on every contender alike.
    results = [[] for _ in runs]
    for _ in range(args.repeats):
        for r, out in zip(runs, results):
            out.append(measure(r[1], env))
    best = [(min(x[0] for x in out), max(x[1] for x in out), min(x[2] for x in out)) for out in results]
    check = ""
    if args.mergekit:
        check = f"; max |ours - mergekit| on one tensor: {max_difference(work / 'out-ours', work / 'out-mergekit'):.3g}"

    print(
        f"machine: {cpu_name()}, {os.cpu_count()} CPUs, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM; "
        f"model: {model_bytes / 1e9:.2f} GB fp32 per input, {len(shards) // 2} shards each; gamma {GAMMA}; "
        f"best of {args.repeats} (round-robin), page cache warm, load average before {load[0]:.1f}{check}\n"
    )
    print(
        "| run | wall s | x its I/O floor | CPU s | peak RSS MiB | start-up RSS MiB | above start-up, % of one model |"
    )
    print("|---|---|---|---|---|---|---|")
    for (name, _, _, floor_row), (wall, peak, cpu), start in zip(runs, best, startup):
        above = 100 * (peak - start) * 2**20 / model_bytes
        print(
            f"| {name} | {wall:.2f} | {wall / best[floor_row][0]:.2f} | {cpu:.2f} | {peak:.0f} | {start:.0f} | "
            f"{above:.1f}% |"
        )


if __name__ == "__main__":
    main()
