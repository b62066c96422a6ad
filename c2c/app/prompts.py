"""Prompt files and prompt encoding.

A prompt file is either UTF-8 text, one prompt per line (blank lines and lines starting with `#`
skipped), or JSONL as Spec-Bench's and MT-Bench's question files: one JSON object a line with
`turns` (a list of user turns; the later ones are asked after the model's own answers to the
earlier ones), and optionally `category` and `question_id`. A file is read as JSONL when its name
ends in .jsonl or its first non-blank line starts with `{`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserInputError


@dataclass(frozen=True)
class Question:
    """One conversation of a prompt file: its user turns, in order; a plain line is one turn."""

    turns: tuple[str, ...]
    category: str | None = None
    question_id: str | int | None = None


def read_questions(path: str | Path) -> list[Question]:
    """The questions of a prompt file (plain lines or JSONL, see the module's docstring)."""
    path = Path(path)
    lines = _read_lines(path)
    first = next((line.strip() for line in lines if line.strip()), "")
    if path.suffix.lower() != ".jsonl" and not first.startswith("{"):
        return [Question((prompt,), None, i) for i, prompt in enumerate(read_prompts(path), 1)]
    questions = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        questions.append(_question(line, number, path))
    if not questions:
        raise UserInputError(f"prompt file {path} holds no questions (JSONL: one object with \"turns\" a line)")
    return questions


def _question(line: str, number: int, path: Path) -> Question:
    where = f"{path} line {number}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserInputError(f"{where} is not JSON ({e.msg}): a JSONL prompt file holds one object a line, "
                             'e.g. {"question_id": 1, "category": "writing", "turns": ["..."]}') from None
    turns = record.get("turns") if isinstance(record, dict) else None
    if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
        raise UserInputError(f"{where}: \"turns\" must be a non-empty list of non-empty strings (the user's turns), "
                             f"got {str(turns)[:80] if turns is not None else 'no turns'}")
    category = record.get("category")
    return Question(tuple(turns), None if category is None else str(category), record.get("question_id", number))


def read_prompts(path: str | Path) -> list[str]:
    """The prompts of a plain prompt file, one a line (for JSONL files, see `read_questions`)."""
    path = Path(path)
    lines = _read_lines(path)
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise UserInputError(f"prompt file {path} holds no prompts (one per line; blank and # lines are skipped)")
    return prompts


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8-sig").splitlines()  # -sig: a byte-order mark is not part of a prompt
    except FileNotFoundError:
        raise UserInputError(f"prompt file not found: {path} (pass --prompts with an existing file)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserInputError(f"cannot read prompt file {path}: {e} (it must be UTF-8 text, one prompt per line, "
                             "or JSONL)") from None


def conversation(turns: list[str], answers: list[str]) -> list[dict]:
    """The chat messages of a turn: every user turn so far, each earlier one followed by its answer."""
    messages = []
    for i, turn in enumerate(turns):
        messages.append({"role": "user", "content": turn})
        if i < len(answers):
            messages.append({"role": "assistant", "content": answers[i]})
    return messages


def encode_prompt(tokenizer, prompt: str | list[dict], enable_thinking: bool = False) -> list[int]:
    """Token ids for one user prompt, or a conversation's messages (`conversation`) ending with a user
    turn: through the chat template when the tokenizer has one; raw otherwise (a conversation's
    messages joined by newlines)."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=True,
            enable_thinking=enable_thinking,
        )
    else:
        text = "\n".join(m["content"] for m in messages)
    ids = tokenizer(text, add_special_tokens=not getattr(tokenizer, "chat_template", None))["input_ids"]
    if not ids:
        raise UserInputError(f"prompt {messages[-1]['content']!r} encodes to no tokens")
    return list(ids)
