"""Streamed output: each round's tokens printed as they commit, marked by where they came from.

Accepted draft tokens, those a tree round took from the draft's other choices (not its first), the
target's correction (after a rejection) and the target's bonus token (every draft accepted, or the
prefill's first token) get a colour on a terminal and bracket marks otherwise ([draft] (branch)
<correction> {bonus}), so a log file stays readable. Every round ends with the
target's token, which is where one round stops and the next begins. Printing happens in the
engine's hook, whose time the engine leaves out of the latency (see engine.HookTimer).
"""

from __future__ import annotations

import sys
from typing import TextIO

from ..core.engine import RoundInfo

KINDS = ("draft", "branch", "correction", "bonus")
COLOURS = {"draft": "\033[32m", "branch": "\033[35m", "correction": "\033[31;1m", "bonus": "\033[36m"}  # green, magenta, bold red, cyan
RESET = "\033[0m"
BRACKETS = {"draft": ("[", "]"), "branch": ("(", ")"), "correction": ("<", ">"), "bonus": ("{", "}")}


def use_colour(out: TextIO, no_color: bool = False) -> bool:
    """Colour only on a terminal, and never when asked not to."""
    isatty = getattr(out, "isatty", None)
    return not no_color and bool(isatty and isatty())


LABELS = {
    "en": {"legend": "legend", "draft": "draft tokens the target accepted",
           "branch": "accepted from the draft's other choices (tree rounds)", "correction": "the target's correction",
           "bonus": "the target's bonus token (all drafts accepted; or the first token)",
           "rounds": "(each round ends with the target's token)", "standard": "standard (target only):",
           "speculative": "speculative ({gamma}):"},
    "zh": {"legend": "图例", "draft": "目标模型接受的草稿 token", "branch": "来自草稿其他候选的已接受 token (树推测)",
           "correction": "目标模型的纠正",
           "bonus": "目标模型的奖励 token (草稿全部被接受; 或第一个 token)",
           "rounds": "(每一轮以目标模型的 token 结束)", "standard": "标准 (仅目标模型):",
           "speculative": "推测解码 ({gamma}):"},
}


def legend(colour: bool, lang: str = "en") -> str:
    L = LABELS[lang]
    return f"{L['legend']}: " + "  ".join(mark(kind, L[kind], colour) for kind in KINDS) + f"  {L['rounds']}"


def mark(kind: str, text: str, colour: bool) -> str:
    if not text:
        return ""
    if colour:
        return f"{COLOURS[kind]}{text}{RESET}"
    opening, closing = BRACKETS[kind]
    return f"{opening}{text}{closing}"


class TextStream:
    """Turns token ids into text pieces as they arrive, so that the pieces join to the final text.

    Decodes the whole output each time (byte-level tokens can split a character) and hands out what
    is new; an unfinished character (a trailing U+FFFD) waits for the next token.
    """

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.text = tokenizer, [], ""

    def push(self, ids) -> str:
        self.ids.extend(ids)
        full = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        stable = full.rstrip("\ufffd")
        if not stable.startswith(self.text):  # the decoder rewrote earlier text: wait for the end
            return ""
        new, self.text = stable[len(self.text):], stable
        return new

    def flush(self) -> str:
        full = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        new = full[len(self.text):] if full.startswith(self.text) else ""
        self.text += new
        return new


class StreamPrinter:
    """Hooks for the engine: `round` (speculative, marked) and `token` (the standard run, plain).

    `pieces` keeps (kind, text) of everything written; joined, the texts equal the decoded output.
    """

    def __init__(self, tokenizer, out: TextIO | None = None, colour: bool = False, lang: str = "en"):
        self.tokenizer, self.out, self.colour = tokenizer, out or sys.stdout, colour
        self.labels = LABELS[lang]  # the run labels, in the report's language
        self.begin()

    def begin(self, label: str | None = None) -> None:
        """Start a new output (after `label`, on its own line)."""
        self.text = TextStream(self.tokenizer)
        self.pieces: list[tuple[str, str]] = []
        if label:
            self._write(f"{label}\n")

    def round(self, info: RoundInfo) -> None:
        tokens = list(info.tokens)
        split = info.accepted if info.branched_at is None else info.branched_at  # a tree's other choices from here
        self._piece("draft", self.text.push(tokens[:split]))
        self._piece("branch", self.text.push(tokens[split : info.accepted]))
        rest = tokens[info.accepted:]
        if rest:  # the target's own token (absent when an end-of-sequence token ended the drafts)
            kind = "correction" if info.accepted < info.drafted else "bonus"
            self._piece(kind, self.text.push(rest))

    def token(self, token_id: int) -> None:
        self._piece("plain", self.text.push([token_id]))

    def end(self) -> None:
        self._piece("plain", self.text.flush())
        self._write("\n")

    def streamed_text(self) -> str:
        return "".join(text for _, text in self.pieces)

    def _piece(self, kind: str, text: str) -> None:
        if not text:
            return
        self.pieces.append((kind, text))
        self._write(text if kind == "plain" else mark(kind, text, self.colour))

    def _write(self, s: str) -> None:
        self.out.write(s)
        self.out.flush()
