"""Training data as conversations: JSONL (or local parquet) records in OpenAI style (`messages`:
[{"role", "content"}]) or ShareGPT style (`conversations`: [{"from", "value"}]), plus the plain
`text` / `prompt` records the trainer has always read.

A conversation becomes one training item per assistant turn: the tokens of the conversation up to
the end of that turn (rendered with the target tokenizer's chat template) and where the turn's
content starts. The loss then falls on assistant tokens only (the turn's content and its end
token); everything before, earlier assistant turns included, is the fused prefix. A conversation
that ends with a user turn is a prompt: the target answers it (`--generate_from_target N`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserInputError

ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "model": "assistant",
         "bot": "assistant", "system": "system"}


@dataclass(frozen=True)
class Record:
    """One line of training data: plain text, or a conversation (a list of {"role", "content"})."""

    text: str | None = None
    messages: tuple[dict, ...] | None = None

    @property
    def is_chat(self) -> bool:
        return self.messages is not None

    @property
    def needs_answer(self) -> bool:
        """A conversation whose last turn is the user's: a prompt for the target to answer."""
        return self.messages is not None and self.messages[-1]["role"] != "assistant"


def _messages(record: dict, where: str) -> tuple[dict, ...]:
    if "messages" in record:
        raw, role_key, text_key = record["messages"], "role", "content"
    else:
        raw, role_key, text_key = record["conversations"], "from", "value"
    if not isinstance(raw, list) or not raw:
        raise UserInputError(f"{where}: expected a non-empty list of turns")
    out = []
    for turn in raw:
        role = turn.get(role_key) if isinstance(turn, dict) else None
        if not isinstance(turn, dict) or not isinstance(turn.get(text_key), str) or not isinstance(role, str) or role not in ROLES:
            raise UserInputError(f"{where}: each turn needs {role_key!r} (a string: {', '.join(sorted(ROLES))}) and a "
                                 f"{text_key!r} string; fix the turn {_short(turn)}")
        if ROLES[role] == "assistant" and not turn[text_key].strip():
            raise UserInputError(f"{where}: an assistant turn is empty (nothing to train on, and training on it teaches "
                                 f"the draft to end at once): give it its answer or remove the turn {_short(turn)}")
        out.append({"role": ROLES[turn[role_key]], "content": turn[text_key]})
    return tuple(out)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def parse_record(record, where: str) -> Record:
    if isinstance(record, str):
        if not record.strip():
            raise UserInputError(f"{where}: the text is empty: remove the record or give it text")
        return Record(text=record)
    if isinstance(record, dict):
        if "messages" in record or "conversations" in record:
            return Record(messages=_messages(record, where))
        for key in ("text", "prompt"):
            if key in record:
                if not isinstance(record[key], str) or not record[key].strip():
                    raise UserInputError(f"{where}: {key!r} must be a non-empty string, got {_short(record[key])}: "
                                         "remove the record or give it text")
                return Record(text=record[key])
    raise UserInputError(f"{where}: expected an object with \"messages\", \"conversations\", \"text\" or \"prompt\", "
                         f"got {_short(record)}")


def _text(path: Path, data: bytes, line: int | None = None) -> str:
    """UTF-8 text (a byte-order mark at the start of the file is dropped), or an error naming the line."""
    try:
        return data.decode("utf-8-sig" if line in (None, 1) else "utf-8")
    except UnicodeDecodeError as e:
        where = f"{path}:{line}" if line is not None else str(path)
        raise UserInputError(f"{where}: not UTF-8 text (byte {e.start}: {data[e.start:e.start + 1]!r}): "
                             "re-save the file as UTF-8") from None


def read_records(path: str | Path) -> list[Record]:
    """Plain text (the whole file is one text), JSONL (one record per line), JSON (an array of records,
    or one record) or parquet (one per row). A malformed record is an error naming its file and line."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"training data not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise UserInputError(f"{path}: reading parquet needs pyarrow (pip install pyarrow), or convert it to JSONL") from None
        rows = pq.read_table(path).to_pylist()
        records = [parse_record(row, f"{path} row {n}") for n, row in enumerate(rows, 1)]
    elif suffix == ".json":
        try:
            raw = json.loads(_text(path, path.read_bytes()))
        except json.JSONDecodeError as e:
            raise UserInputError(f"{path}:{e.lineno}: not JSON ({e.msg}); a .json file holds one array of records "
                                 "(use .jsonl for one record per line)") from None
        raw = raw if isinstance(raw, list) else [raw]
        records = [parse_record(r, f"{path} record {n}") for n, r in enumerate(raw, 1)]
    elif suffix == ".jsonl":
        records = []
        for n, data in enumerate(path.read_bytes().splitlines(), 1):
            line = _text(path, data, n)
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserInputError(f"{path}:{n}: not JSON ({e.msg})") from None
            records.append(parse_record(raw, f"{path}:{n}"))
    else:
        text = _text(path, path.read_bytes())
        if not text.strip():
            raise UserInputError(f"{path} is empty: give the trainer text, or JSONL records")
        return [Record(text=text)]
    if not records:
        raise UserInputError(f"{path} holds no records")
    return records


def _render(tokenizer, messages, add_generation_prompt: bool, enable_thinking: bool) -> list[int]:
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt,
                                         enable_thinking=enable_thinking)
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])  # long ones are fine here


def prompt_ids(tokenizer, messages, enable_thinking: bool = False) -> list[int]:
    """The conversation so far, ready for the assistant's answer (the generation prompt appended)."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserInputError("chat data needs a tokenizer with a chat template (the target's has none)")
    return _render(tokenizer, messages, True, enable_thinking)


def assistant_items(tokenizer, messages, eos_ids: set[int], enable_thinking: bool = False) -> list[tuple[list[int], int]]:
    """(ids, n0) per assistant turn: the conversation up to the end of that turn (its end-of-turn token
    included, nothing after it) and the position where the turn's content starts."""
    items = []
    for k, turn in enumerate(messages):
        if turn["role"] != "assistant" or k == 0:
            continue
        before = prompt_ids(tokenizer, messages[:k], enable_thinking)
        full = _render(tokenizer, messages[: k + 1], False, enable_thinking)
        n0 = 0  # the common prefix: templates may render the turn's opening differently once it is written
        while n0 < min(len(before), len(full)) and before[n0] == full[n0]:
            n0 += 1
        n0 = _after_empty_think(tokenizer, full, n0)
        end = next((i + 1 for i in range(n0, len(full)) if full[i] in eos_ids), len(full))
        if end - n0 >= 2:  # at least one supervised position (the last token predicts nothing)
            items.append((full[:end], n0))
    return items


def _after_empty_think(tokenizer, ids: list[int], n0: int) -> int:
    """Where the turn's content starts when the template wrote an empty thinking block at n0
    (`<think>\\n\\n</think>\\n\\n`, Qwen3's for the last assistant turn when thinking is on): the
    target would think there while decoding, so the empty block is not supervised (a block with
    reasoning in it is). Otherwise n0."""
    opening, closing = tokenizer.convert_tokens_to_ids("<think>"), tokenizer.convert_tokens_to_ids("</think>")
    unk = getattr(tokenizer, "unk_token_id", None)
    if opening in (None, unk) or closing in (None, unk) or n0 >= len(ids) or ids[n0] != opening:
        return n0
    close = next((i for i in range(n0 + 1, len(ids)) if ids[i] == closing), None)
    if close is None or tokenizer.decode(ids[n0 + 1 : close]).strip():
        return n0
    start = close + 1
    while start < len(ids) and not tokenizer.decode(ids[start : start + 1]).strip():
        start += 1
    return start
