"""Tokenizers: a model folder's own, or the real Mistral-7B v0.1 one bundled in `mistral-common`.

Also the prompt format the Coarse Actor samples with, and the stop tokens it suppresses.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

if importlib.util.find_spec("torch") is None:
    # We use transformers for tokenizers only; without torch it warns on import that models are unavailable.
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import transformers  # noqa: E402

from c2f_jax.model.hf import TOKENIZER_FILES

# The paper's system prompt for the Coarse Actor (Mistral-C2F, section 3).
COARSE_SYSTEM_PROMPT = (
    "Below is an instruction that describes a task. Write a detailed analytical and reasoning response that "
    "appropriately completes the request, and don't generate any end of sentence tokens."
)
HUMAN, ASSISTANT = "\n\nHuman: ", "\n\nAssistant:"


class TokenizerError(ValueError):
    """A tokenizer that cannot be found or loaded."""


def bundled_model_file() -> Path:
    """The sentencepiece model of Mistral-7B v0.1 (vocab 32000) shipped inside `mistral-common`."""
    import mistral_common

    return Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"


def _bundled_folder() -> Path:
    """A folder with the bundled tokenizer, converted once and cached (conversion takes seconds)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "c2f_jax" / "mistral-v0.1-tokenizer"
    if (cache / "tokenizer.json").exists():
        return cache
    src = cache.parent / f".src-{os.getpid()}"
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir(parents=True)
    shutil.copy(bundled_model_file(), src / "tokenizer.model")
    (src / "tokenizer_config.json").write_text(
        json.dumps(
            {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "legacy": False}
        )
    )
    tok = transformers.AutoTokenizer.from_pretrained(src)
    tmp = cache.parent / f".tok-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tok.save_pretrained(tmp)
    shutil.copy(src / "tokenizer.model", tmp / "tokenizer.model")
    shutil.rmtree(src)
    try:
        tmp.rename(cache)
    except OSError:  # another process got there first
        shutil.rmtree(tmp, ignore_errors=True)
    return cache


def load_tokenizer(path: str | os.PathLike | None = None):
    """The tokenizer of a model folder, or the bundled Mistral v0.1 tokenizer when path is None.

    Never runs remote code. Left padding, as the rollout expects; pad falls back to unk.
    """
    if path is None:
        path = _bundled_folder()
    path = Path(path)
    if not any((path / name).exists() for name in TOKENIZER_FILES):
        raise TokenizerError(f"{path}: no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    try:
        tok = transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise TokenizerError(f"{path}: cannot load tokenizer: {str(e).splitlines()[0]}") from None
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token or tok.eos_token
    return tok


def stop_token_ids(tokenizer) -> tuple[int, ...]:
    """Tokens the Coarse Actor never samples: EOS, and BOS/UNK/PAD, which have no place inside a response."""
    ids = {tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.unk_token_id, tokenizer.pad_token_id}
    return tuple(sorted(i for i in ids if i is not None))


def system_prompt(value: str | None) -> str | None:
    """A --system-prompt value: 'coarse' names the paper's COARSE_SYSTEM_PROMPT, anything else is the text."""
    return COARSE_SYSTEM_PROMPT if value == "coarse" else value


def format_prompt(question: str, system_prompt: str | None = None) -> str:
    """A single-turn HH-style prompt ending in 'Assistant:', optionally behind a system prompt.

    A text that already holds 'Human:'/'Assistant:' turns is kept as the dialogue.
    """
    text = question if HUMAN.strip() in question else HUMAN + question.strip()
    if not text.rstrip().endswith(ASSISTANT.strip()):
        text = text.rstrip() + ASSISTANT
    return (system_prompt.strip() + text) if system_prompt else text.lstrip()
