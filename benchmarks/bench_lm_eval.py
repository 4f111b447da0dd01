"""lm-eval throughput: our model `c2f-jax` against lm-eval's `hf` backend on the same tasks, side by side.

  python benchmarks/bench_lm_eval.py                 # 8 layers, d=512 (the CPU bench shape), float32
  python benchmarks/bench_lm_eval.py --size 4x256 --requests 32

The same random weights (one HF folder, real Mistral tokenizer) run four local tasks built from the
bundled HH sample: multiple choice (4 whole responses as choices, loglikelihood), the paper's multiple-choice
shape (3 shots, a short question, choices of 4 words), documents (loglikelihood_rolling, windows at
--max-length) and greedy generation (generate_until, 32 tokens). Each backend evaluates them twice in one
process: the first pass includes our compilation, the second is timed. Prints a Markdown table of requests
per second per request type, the ratio ours / hf, and our compile time (first pass minus second).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: {output_type}
{body}
metadata:
  version: 1.0
"""
BODIES = {
    "bench_mc": (
        "multiple_choice",
        'doc_to_text: "{{q}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: 0\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true",
    ),
    # The paper's multiple-choice benchmarks' shape (ARC, HellaSwag, MMLU): a few-shot context, short choices.
    "bench_mc_shots": (
        "multiple_choice",
        'doc_to_text: "Question: {{q}}\\nAnswer:"\ndoc_to_choice: "{{choices}}"\n'
        "doc_to_target: 0\nnum_fewshot: 3\nfewshot_split: test\n"
        "fewshot_config:\n  sampler: first_n\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n"
        "    higher_is_better: true",
    ),
    "bench_rolling": (
        "loglikelihood_rolling",
        'doc_to_text: ""\ndoc_to_target: "{{text}}"\nmetric_list:\n'
        "  - metric: byte_perplexity\n    aggregation: weighted_perplexity\n"
        "    higher_is_better: false",
    ),
    "bench_gen": (
        "generate_until",
        'doc_to_text: "{{q}}"\ndoc_to_target: "{{a}}"\ngeneration_kwargs:\n'
        '  until: ["\\n\\nHuman:"]\n  max_gen_toks: 32\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n"
        "    higher_is_better: true",
    ),
}


def write_tasks(folder: Path, requests: int) -> None:
    """Task YAMLs and their data from the bundled preference sample: `requests` documents per task."""
    from c2f_jax import data

    pairs, _ = data.load_pairs("bundled")
    rows = {
        "bench_mc": [
            {"q": p.prompt, "choices": [p.chosen, p.rejected, pairs[i - 1].chosen, pairs[i - 2].rejected]}
            for i, p in enumerate(pairs[:requests], start=2)
        ],
        "bench_mc_shots": [
            {
                "q": " ".join(p.prompt.split()[:24]),
                "choices": [
                    " ".join(c.split()[:4]) for c in (p.chosen, p.rejected, pairs[i - 1].chosen, pairs[i - 2].rejected)
                ],
            }
            for i, p in enumerate(pairs[:requests], start=2)
        ],
        "bench_rolling": [{"text": p.prompt + " " + p.chosen} for p in pairs[:requests]],
        "bench_gen": [{"q": p.prompt, "a": p.chosen} for p in pairs[:requests]],
    }
    for name, (output_type, body) in BODIES.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[name]))
        (folder / f"{name}.yaml").write_text(
            TASK.format(name=name, data=folder / f"{name}.jsonl", output_type=output_type, body=body)
        )


def timed(model: str, model_args: str, tasks_dir: Path, task: str, batch_size: int) -> tuple[float, float, int]:
    """(seconds of the first pass, of the second, requests) for one task through one backend."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(tasks_dir))
    if model == "hf":
        lm = lm_eval.api.registry.get_model("hf").create_from_arg_string(
            model_args, {"batch_size": batch_size, "device": "cpu"}
        )
    else:
        lm = lm_eval.api.registry.get_model("c2f-jax").create_from_arg_string(model_args, {"batch_size": batch_size})
    seconds = []
    for _ in range(2):
        start = time.perf_counter()
        out = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=manager, log_samples=True, verbosity="ERROR")
        seconds.append(time.perf_counter() - start)
    requests = sum(len(s["arguments"]) for s in out["samples"][task])
    return seconds[0], seconds[1], requests


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="8x512", help="LAYERSxWIDTH of the random model")
    p.add_argument("--requests", type=int, default=64, help="documents per task")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import jax
    import torch
    from bench_rollout import bench_config

    import c2f_jax.eval.lm_eval  # noqa: F401  (registers c2f-jax)
    from c2f_jax.model import hf, model, tokenizer

    torch.set_num_threads(os.cpu_count() or 1)
    layers, d = (int(x) for x in args.size.split("x"))
    config = bench_config(layers, d).replace(max_position_embeddings=max(4096, args.max_length))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        hf.save_pretrained(
            tmp / "model",
            config,
            model.init_params(config, jax.random.key(0)),
            tokenizer_source=tokenizer.load_tokenizer(None),
        )
        (tmp / "tasks").mkdir()
        write_tasks(tmp / "tasks", args.requests)
        common = f"pretrained={tmp / 'model'},max_length={args.max_length}"
        print(
            f"{layers} layers, d={d}, float32, batch {args.batch_size}, max_length {args.max_length}, "
            f"{platform.machine()} CPU x {os.cpu_count()}\n"
        )
        print("| task (request type) | requests | ours req/s | hf req/s | ours / hf | our compile s |")
        print("|---|---|---|---|---|---|")
        for task, (kind, _) in BODIES.items():
            first, ours, n = timed("c2f-jax", common, tmp / "tasks", task, args.batch_size)
            _, theirs, _ = timed("hf", common + ",dtype=float32", tmp / "tasks", task, args.batch_size)
            print(
                f"| {task} ({kind}) | {n} | {n / ours:.1f} | {n / theirs:.1f} | {theirs / ours:.2f}x | "
                f"{max(first - ours, 0):.1f} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
