"""Prompt files and prompt encoding.

A prompt file is UTF-8 text, one prompt per line; blank lines and lines starting with `#` are skipped.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UserInputError


def read_prompts(path: str | Path) -> list[str]:
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()  # -sig: a byte-order mark is not part of a prompt
    except FileNotFoundError:
        raise UserInputError(f"prompt file not found: {path} (pass --prompts with an existing file)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserInputError(f"cannot read prompt file {path}: {e} (it must be UTF-8 text, one prompt per line)") from None
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise UserInputError(f"prompt file {path} holds no prompts (one per line; blank and # lines are skipped)")
    return prompts


def encode_prompt(tokenizer, prompt: str, enable_thinking: bool = False) -> list[int]:
    """Token ids for one user prompt: through the chat template when the tokenizer has one, raw otherwise."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            tokenize=False,
            add_generation_prompt=True,
            enable_thinking=enable_thinking,
        )
    else:
        text = prompt
    ids = tokenizer(text, add_special_tokens=not getattr(tokenizer, "chat_template", None))["input_ids"]
    if not ids:
        raise UserInputError(f"prompt {prompt!r} encodes to no tokens")
    return list(ids)
