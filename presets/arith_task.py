"""The arithmetic task of the `arith` preset: problems, answers and the held-out split.

Two prompt forms, both plain ASCII (every digit is its own token in the preset's tokenizer):
- addition `A+B=`, answer the decimal digits of A+B (normal order, so the first digit needs every carry);
- chain `A,B,` (two 3-digit terms, leading zeros kept), answer the next CHAIN_TERMS terms of
  x(n+1) = (x(n-1) + x(n)) mod 1000, each written with 3 digits and followed by a comma.
The model ends every answer with an end-of-sequence token (not part of the strings here).

Held-out problems are drawn by a seeded generator before any training sample, and training never
draws them: held-out additions are (A, B) pairs, held-out chains are starting pairs.
"""

from __future__ import annotations

import random

CHAIN_TERMS = 8


def addition(a: int, b: int) -> tuple[str, str]:
    return f"{a}+{b}=", str(a + b)


def chain(a: int, b: int, terms: int = CHAIN_TERMS) -> tuple[str, str]:
    out, x0, x1 = [], a, b
    for _ in range(terms):
        x0, x1 = x1, (x0 + x1) % 1000
        out.append(f"{x1:03d},")
    return f"{a:03d},{b:03d},", "".join(out)


def answer(prompt: str) -> str:
    """The correct answer of a prompt of either form (ValueError for anything else)."""
    if prompt.endswith("=") and "+" in prompt:
        a, b = prompt[:-1].split("+")
        return addition(int(a), int(b))[1]
    parts = prompt.split(",")
    if len(parts) == 3 and parts[2] == "" and all(len(p) == 3 and p.isdigit() for p in parts[:2]):
        return chain(int(parts[0]), int(parts[1]))[1]
    raise ValueError(f"not an arith prompt: {prompt!r} (expected A+B= or AAA,BBB,)")


def heldout(seed: int, additions: int, chains: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Held-out 3-digit addition pairs (100-999) and chain starting pairs (000-999), distinct."""
    rng = random.Random(seed)
    adds: set[tuple[int, int]] = set()
    while len(adds) < additions:
        adds.add((rng.randint(100, 999), rng.randint(100, 999)))
    starts: set[tuple[int, int]] = set()
    while len(starts) < chains:
        starts.add((rng.randint(0, 999), rng.randint(0, 999)))
    return sorted(adds, key=lambda p: rng.random()), sorted(starts, key=lambda p: rng.random())


class TrainingProblems:
    """An endless seeded stream of training problems (prompt, answer) that avoids the held-out ones.

    Mix: `chain_fraction` chains; the rest additions, 3-digit operands most of the time (the
    evaluation case) and 1-3 digits otherwise.
    """

    def __init__(self, seed: int, held_additions, held_chains, chain_fraction: float = 0.5):
        self.rng = random.Random(seed)
        self.held_additions, self.held_chains = set(held_additions), set(held_chains)
        self.chain_fraction = chain_fraction

    def _operand(self) -> int:
        if self.rng.random() < 0.8:
            return self.rng.randint(100, 999)
        digits = self.rng.randint(1, 3)
        return self.rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)

    def batch(self, size: int, chain_fraction: float | None = None) -> list[tuple[str, str]]:
        """`size` problems of one form (chains with probability `chain_fraction`, default the stream's
        own): batches of one form need little padding."""
        chains = self.rng.random() < (self.chain_fraction if chain_fraction is None else chain_fraction)
        return [self.next(chains) for _ in range(size)]

    def next(self, chains: bool | None = None) -> tuple[str, str]:
        rng = self.rng
        while True:
            if chains if chains is not None else rng.random() < self.chain_fraction:
                pair = (rng.randint(0, 999), rng.randint(0, 999))
                if pair not in self.held_chains:
                    return chain(*pair)
            else:
                pair = (self._operand(), self._operand())
                if pair not in self.held_additions:
                    return addition(*pair)
