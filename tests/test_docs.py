"""The docs cannot drift from the code: every command shown in README.md and docs/ uses flags its parser has and
config keys its config has, every relative link resolves, the configuration reference is the configs' own,
and the site builds with `mkdocs build --strict`."""

import contextlib
import functools
import importlib
import io
import re
import shlex
import subprocess
import sys

import pytest
from conftest import ROOT

PAGES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").rglob("*.md"))]
# A command as the docs show it -> the module whose main() it runs (or a script run by path).
MODULES = {
    "c2f-train": "c2f_jax.train",
    "c2f-export": "c2f_jax.cli.export",
    "c2f-merge": "c2f_jax.cli.merge",
    "c2f-generate": "c2f_jax.cli.generate",
    "c2f-evaluate": "c2f_jax.cli.evaluate",
    "c2f-sweep": "c2f_jax.cli.sweep",
    "c2f-plot": "c2f_jax.cli.plot",
    "c2f-plan": "c2f_jax.cli.plan",
    "c2f-lm-eval": "c2f_jax.cli.lm_eval",
}
ALIASES = {
    ("python", "-m", "c2f_jax.train"): "c2f-train",
    ("python", "-m", "c2f_jax.eval.lm_eval"): "c2f-lm-eval",
    ("python", "tools/merge.py"): "c2f-merge",
    **{("python", "-m", module): name for name, module in MODULES.items()},
}
FLAG = re.compile(r"(?<![\w-])(--[a-zA-Z][\w-]*)")


def _code_lines(text: str):
    """The shell lines of a page: fenced bash/sh/console blocks and inline `code` that starts with a command."""
    for block in re.findall(r"```(?:bash|sh|shell|console)\n(.*?)```", text, re.S):
        yield from block.replace("\\\n", " ").splitlines()
    yield from (m for m in re.findall(r"`([^`\n]+)`", text) if m.split(" ")[0] in MODULES or m.startswith("python "))


def scripts():
    """(page, script path, argv) of every `python benchmarks/...` or `python scripts/...` the docs show."""
    found = []
    for page in PAGES:
        for line in _code_lines(page.read_text()):
            for part in re.split(r"&&|;|\|", line.split(" #")[0]):
                words = part.split()
                if (
                    len(words) > 1
                    and words[0] in ("python", "python3")
                    and re.match(r"(benchmarks|scripts)/", words[1])
                ):
                    found.append((page.relative_to(ROOT), words[1], words[2:]))
    return found


def commands():
    """(page, command name, argv) of every command the docs show."""
    found = []
    for page in PAGES:
        for line in _code_lines(page.read_text()):
            line = line.split(" #")[0].strip().lstrip("$ ")
            for part in re.split(r"&&|;|\|", line):
                try:
                    words = shlex.split(part)
                except ValueError:
                    continue
                while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
                    words = words[1:]
                words = ["python" if w in ("python3",) else w for w in words]
                name = (
                    words[0]
                    if words and words[0] in MODULES
                    else next((n for k, n in ALIASES.items() if tuple(words[: len(k)]) == k), None)
                )
                if name is not None:
                    skip = 1 if words[0] in MODULES else next(len(k) for k in ALIASES if tuple(words[: len(k)]) == k)
                    found.append((page.relative_to(ROOT), name, words[skip:]))
    return found


@functools.cache
def help_text(name: str, *argv: str) -> str:
    module = importlib.import_module(MODULES[name])
    out = io.StringIO()
    saved = sys.argv
    sys.argv = [name, *argv, "--help"]
    try:
        with contextlib.redirect_stdout(out):
            try:
                module.main([*argv, "--help"])
            except SystemExit:
                pass
    finally:
        sys.argv = saved
    return out.getvalue()


def test_the_docs_show_every_installed_command():
    shown = {name for _, name, _ in commands()}
    assert set(MODULES) <= shown, sorted(set(MODULES) - shown)


@pytest.mark.parametrize("page, name, argv", commands(), ids=lambda v: str(v)[:60] if isinstance(v, str) else None)
def test_each_flag_shown_exists(page, name, argv):
    if name == "c2f-lm-eval":
        known = set(FLAG.findall(help_text(name, "run")))
    elif name in ("c2f-train", "c2f-plan"):
        config = next(
            (
                a.split("=", 1)[1] if "=" in a else argv[i + 1]
                for i, a in enumerate(argv)
                if a == "--config" or a.startswith("--config=")
            ),
            None,
        )
        if config is None or not (ROOT / "configs" / config.split("/")[-1]).is_file():
            known = {"--config", "--workdir", "--help"}
        else:
            keys = help_text("c2f-train", "--config", "configs/" + config.split("/")[-1])
            known = {"--config", "--workdir", "--help"} | {
                f"--config.{k}" for k in re.findall(r"^  (\S+)  ", keys, re.M)
            }
        if name == "c2f-plan":
            known |= set(FLAG.findall(help_text(name)))
            keys = help_text("c2f-train", "--config", "configs/" + (config or "coarse.py").split("/")[-1])
            known |= {f"--config.{k}" for k in re.findall(r"^  (\S+)  ", keys, re.M)}
    else:
        known = set(FLAG.findall(help_text(name)))
    for arg in argv:
        flag = arg.split("=", 1)[0]
        if flag.startswith("--") and flag not in known:
            pytest.fail(f"{page}: `{name} ... {flag}`: no such flag (known: {', '.join(sorted(known)[:12])} ...)")


@functools.cache
def script_help(script: str) -> str:
    done = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, f"{script} --help: {done.stderr[-1000:]}"
    return done.stdout


@pytest.mark.slow  # each script's --help imports JAX in a process of its own
@pytest.mark.parametrize("page, script, argv", scripts(), ids=lambda v: str(v)[:60] if isinstance(v, str) else None)
def test_each_script_flag_shown_exists(page, script, argv):
    known = set(FLAG.findall(script_help(script)))
    for flag in (a.split("=", 1)[0] for a in argv if a.startswith("--")):
        assert flag in known, f"{page}: `python {script} ... {flag}`: no such flag"


def test_every_relative_link_resolves():
    bad = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)|src=\"([^\"]+)\"", page.read_text()):
            link = next(t for t in target if t)
            if re.match(r"[a-z]+:", link) or link.startswith("#"):
                continue
            path = (page.parent / link.split("#")[0]).resolve()
            if not path.exists():
                bad.append(f"{page.relative_to(ROOT)}: {link}")
    assert not bad, bad


def test_the_configuration_reference_is_the_configs_own():
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "config_reference.py"), "--check"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-2000:]


def test_the_site_builds_strictly(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
