"""Writes docs/configuration-reference.md: every key of the shipped configs, its value in each, and its meaning.

  python scripts/config_reference.py            # rewrite the page
  python scripts/config_reference.py --check    # exit 1 if the page on disk differs from what this script renders
  python scripts/config_reference.py --print    # print the page instead of writing it

The configs are ml_collections files (configs/*.py, each with get_config()) that import each other by name, so
their folder goes on sys.path. Nothing here compiles or runs JAX. A key without an entry in MEANINGS is an error:
add its one-line description below when you add a key to a config.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = ROOT / "configs"
PAGE = ROOT / "docs" / "configuration-reference.md"
# Column order: the 7B jobs, then the CPU demo that derives from each.
CONFIGS = ("coarse.py", "tiny_coarse.py", "reward.py", "tiny_reward.py")
SECTIONS = ("", "model", "reward_model", "data", "mesh", "rollout", "ppo", "ppo.actor", "ppo.critic", "cm", "optim")
# A config section that is itself a whole job config: shown as one row, not flattened.
NESTED_JOBS = ("reward_model.train",)
LONG = 40  # strings longer than this are shortened in the table

MEANINGS = {
    # every job
    "job": "which job runs: `coarse` (the Coarse Actor, PPO with Continuous Maximization) or `reward` (a reward model)",
    "seed": "seed of the initialisation, the data order and every step's sampling keys; an integer >= 0",
    "steps": "PPO iterations (coarse) or optimizer steps (reward) to run in total; may be raised on a resume",
    "checkpoint_every": "save a checkpoint every this many steps (and at the last step); may change on a resume",
    "keep_checkpoints": "how many of the latest checkpoints to keep on disk; >= 1",
    "eval_every": "reward job: held-out loss, accuracy and margin every this many steps (and at the last step)",
    # model
    "model.base": "the base model: an HF `MistralForCausalLM` folder (safetensors), or the preset `tiny`",
    "model.param_dtype": "dtype of the trained master weights (float32: a bf16 weight cannot hold a step at lr 5e-7)",
    "model.compute_dtype": "dtype of activations and matmul inputs (bfloat16 on accelerators, float32 on a CPU)",
    "model.reference_dtype": "coarse job: dtype the frozen reference policy is stored in",
    "model.remat": "activation checkpointing: `none`, `dots` (keep matmul outputs) or `full` (recompute every layer)",
    "model.pretrain_steps": (
        "with `model.base=tiny`: next-token steps that teach the random tiny model the dialogues "
        "first (WORKDIR/base_model)"
    ),
    # reward model of a coarse job
    "reward_model.path": (
        "coarse job: HF `MistralForSequenceClassification` folder of the reward model (an exported "
        "reward run); empty to train one inline from `reward_model.train`"
    ),
    "reward_model.dtype": "coarse job: dtype the frozen reward model is stored in",
    "reward_model.train": (
        "a reward job config run first, in WORKDIR/reward_run, when `reward_model.path` is empty "
        "(it takes this run's base, data, mesh and seed)"
    ),
    # data
    "data.source": (
        "`Anthropic/hh-rlhf` (from the hub), a local .jsonl/.json/.parquet with `chosen` and `rejected`, "
        "or `bundled` (the 360-pair sample in the package)"
    ),
    "data.data_dir": "hub subset of HH-RLHF, such as `helpful-base` or `harmless-base`; empty for files",
    "data.split": "dataset split to read",
    "data.system_prompt": (
        "text placed before each dialogue: the Coarse Actor samples with it (the paper's system "
        "prompt), its reward model scores without it; the reward job trains with it"
    ),
    "data.prompt_buckets": "coarse job: prompt lengths in tokens; each batch is left-padded to the smallest that fits",
    "data.truncate_prompts": (
        "coarse job: keep the end of a dialogue longer than the largest prompt bucket "
        "(false: such a dialogue is an error)"
    ),
    "data.seq_buckets": (
        "reward job: lengths in tokens of a whole dialogue; a batch is padded to the smallest that fits"
    ),
    "data.eval_fraction": "reward job: share of the pairs held out for evaluation, in (0, 1)",
    "data.batch_size": (
        "coarse: prompts per PPO iteration; reward: preference pairs per step; must split over `mesh.data x mesh.fsdp`"
    ),
    # mesh
    "mesh.data": "devices on the data-parallel axis (batch split, weights replicated)",
    "mesh.fsdp": "devices on the FSDP axis (batch split, weights, gradients and AdamW moments sharded)",
    "mesh.tensor": (
        "devices on the tensor-parallel axis (heads, MLP and vocabulary split); "
        "data x fsdp x tensor must equal the job's devices"
    ),
    # rollout
    "rollout.temperature": (
        "sampling temperature of the coarse job's rollouts, > 0 (PPO needs a stochastic policy); "
        "every config carries it, the reward job ignores it"
    ),
    "rollout.top_k": "sample among the k most likely tokens only; 0 switches the filter off",
    "rollout.top_p": "nucleus sampling: the smallest set of tokens holding this probability; 1 switches it off",
    "rollout.suppress_stop_tokens": (
        "never sample EOS and the tokenizer's stop tokens, so every response runs to the "
        "length limit (the paper's setting); PPO scores the same suppressed policy"
    ),
    # ppo
    "ppo.kl_coef": "weight of the per-token KL penalty to the reference; with `kl_target > 0` its starting value",
    "ppo.kl_estimator": "KL estimator in the penalty: `k1` (`log pi - log pi_ref`, the default) or `k3`",
    "ppo.kl_target": "> 0: adapt `kl_coef` towards this KL in nats per response token; 0 keeps `kl_coef` fixed",
    "ppo.kl_horizon": "horizon of the adaptive KL controller, in responses; larger adapts more slowly",
    "ppo.reward_clip": "the reward-model score is clipped to +-this before it is added at the last token",
    "ppo.gamma": "discount of the returns, in [0, 1]",
    "ppo.lam": "GAE lambda, in [0, 1]",
    "ppo.clip_ratio": "PPO's clip range of the policy ratio",
    "ppo.value_clip": "clip range of the value prediction around the old value",
    "ppo.epochs": "passes over each batch of experience",
    "ppo.minibatches": "minibatches per epoch; a minibatch must split over `mesh.data x mesh.fsdp`",
    # optimizers (ppo.actor, ppo.critic, optim)
    "lr": "peak learning rate of AdamW; > 0",
    "warmup_steps": "optimizer updates of linear warmup from 0 to `lr`",
    "decay_steps": "linear decay: after warmup the lr falls to 0 over this many updates (0: constant lr)",
    "max_grad_norm": "global gradient norm clip; > 0",
    "weight_decay": "AdamW's decoupled weight decay; >= 0",
    # continuous maximization
    "cm.mode": "`logistic` (advance the length limit by the controller) or `fixed` (stay at the first bucket)",
    "cm.buckets": "response length limits in tokens, strictly increasing; the limit starts at the first",
    "cm.window": "iterations at the current bucket over which the reward trend and critic-loss spread are measured",
    "cm.min_steps": "iterations a bucket runs at least before the limit may advance",
    "cm.threshold": "advance when the controller's probability exceeds this, in (0, 1)",
    "cm.bias": "the controller's constant term (higher advances sooner)",
    "cm.w_drop": "weight of a falling reward trend against advancing",
    "cm.w_rise": "weight of a rising reward trend against advancing",
    "cm.w_critic": "weight of the critic loss's coefficient of variation against advancing",
}
OPTIMIZER_SECTIONS = ("ppo.actor.", "ppo.critic.", "optim.")
OPTIMIZER_OWNER = {"ppo.actor.": "actor: ", "ppo.critic.": "critic: ", "optim.": "reward model: "}


def load_configs(folder: Path = CONFIG_DIR) -> dict[str, object]:
    """name -> the ConfigDict its get_config() returns, the folder on sys.path (the configs import each other)."""
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(folder))
    configs = {}
    for name in CONFIGS:
        spec = importlib.util.spec_from_file_location(f"_c2f_config_{Path(name).stem}", folder / name)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        configs[name] = module.get_config()
    return configs


def flatten(node, prefix: str = "") -> dict[str, object]:
    """Dotted key -> value; a whole job config nested in another (NESTED_JOBS) stays one value."""
    out = {}
    for key, value in node.items():
        path = prefix + key
        if hasattr(value, "items") and path not in NESTED_JOBS:
            out.update(flatten(value, path + "."))
        else:
            out[path] = value
    return out


def meaning(key: str) -> str | None:
    if key in MEANINGS:
        return MEANINGS[key]
    for section in OPTIMIZER_SECTIONS:
        if key.startswith(section) and key[len(section) :] in MEANINGS:
            return OPTIMIZER_OWNER[section] + MEANINGS[key[len(section) :]]
    return None


def show(value, nested_names: dict[str, str]) -> str:
    """A value as a table cell."""
    if hasattr(value, "items"):
        plain = value.to_dict() if hasattr(value, "to_dict") else dict(value)
        for name, other in nested_names.items():
            if plain == other:
                return f"the {name} config"
        return "a reward job config"
    if isinstance(value, str):
        if not value:
            return '`""`'
        if len(value) > LONG:
            return f"`{value[: LONG - 10].rstrip()}…` ({len(value)} characters)"
        return f"`{value}`"
    if isinstance(value, (list, tuple)):
        return "`(" + ", ".join(str(v) for v in value) + ("," if len(value) == 1 else "") + ")`"
    return f"`{value}`"


def order(key: str) -> int:
    """Keys in the order MEANINGS lists them (optimizer keys by their field), not alphabetically."""
    names = list(MEANINGS)
    for section in OPTIMIZER_SECTIONS:
        if key.startswith(section):
            key = key[len(section) :]
    return names.index(key)


def section_of(key: str) -> str:
    for section in sorted(SECTIONS, key=len, reverse=True):
        if section and key.startswith(section + "."):
            return section
    return ""


def render(configs: dict[str, object] | None = None) -> str:
    """The page, as Markdown."""
    configs = load_configs() if configs is None else configs
    flat = {name: flatten(c) for name, c in configs.items()}
    nested_names = {name: c.to_dict() for name, c in configs.items()}
    keys = list(dict.fromkeys(k for name in CONFIGS for k in flat[name]))
    missing = [k for k in keys if meaning(k) is None]
    if missing:
        raise ValueError(f"no description for config keys {missing}: add them to MEANINGS in {Path(__file__).name}")
    unknown = [k for k in keys if section_of(k) not in SECTIONS]
    if unknown:
        raise ValueError(f"config keys {unknown} are in no section of SECTIONS")
    lines = [
        "---",
        "hide:",  # the wide tables get the whole width of the docs site
        "  - navigation",
        "  - toc",
        "---",
        "",
        "# Configuration reference",
        "",
        "<!-- Generated by scripts/config_reference.py from configs/*.py; do not edit by hand. -->",
        "",
        "Every key of the four shipped configs, with its value in each and what it means. `-` means the config "
        "has no such key. Override any key on the command line with `--config.KEY=VALUE`; "
        "[Configuration](configuration.md) explains files, overrides and resuming. `coarse.py` and `reward.py` are "
        "the 7B jobs; `tiny_coarse.py` and `tiny_reward.py` are the CPU demo built on them.",
        "",
    ]
    lines += ['<div class="config-reference" markdown>', ""]  # docs/stylesheets/extra.css keeps its cells unbroken
    for section in SECTIONS:
        in_section = sorted((k for k in keys if section_of(k) == section), key=order)
        if not in_section:
            continue
        lines += [
            f"## {'Run' if not section else '`' + section + '`'}",
            "",
            "| key | " + " | ".join(f"`{n}`" for n in CONFIGS) + " | meaning |",
            "|---|" + "---|" * len(CONFIGS) + "---|",
        ]
        for key in in_section:
            cells = [show(flat[n][key], nested_names) if key in flat[n] else "-" for n in CONFIGS]
            lines.append(f"| `{key}` | " + " | ".join(cells) + f" | {meaning(key)} |")
        lines.append("")
    lines += ["</div>", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help=f"exit 1 if {PAGE.relative_to(ROOT)} is out of date")
    mode.add_argument("--print", action="store_true", help="print the page instead of writing it")
    args = p.parse_args(argv)
    page = render()
    if args.print:
        print(page, end="")
        return 0
    if args.check:
        current = PAGE.read_text() if PAGE.is_file() else ""
        if current == page:
            return 0
        sys.stdout.writelines(
            difflib.unified_diff(
                current.splitlines(True), page.splitlines(True), str(PAGE.relative_to(ROOT)), "rendered"
            )
        )
        print(f"{PAGE.relative_to(ROOT)} is out of date: run python scripts/config_reference.py", file=sys.stderr)
        return 1
    PAGE.parent.mkdir(parents=True, exist_ok=True)
    PAGE.write_text(page)
    print(f"wrote {PAGE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
