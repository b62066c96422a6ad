"""The trainer's engine figure: does this fuser raise the engine's tokens per target call, and how sure is that?

Greedy speculative decoding of held-out prompts, fused and with the plain draft, counted per prompt
(tokens emitted, target forward passes with the prefill: their ratio is the demo's average accepted
length). The first evaluation decodes as many prompts as a time budget allows and every later one the
same prompts, so figures along a run compare. The verdict is a paired bootstrap over prompts of the
ratio fused/unfused of tokens per target call: a 95% interval above 1 says fusion raises decoding,
below 1 that it lowers it, and one holding 1 that these prompts cannot tell. With fewer than
`MIN_PROMPTS` prompts there is no verdict (a percentile bootstrap of a handful of prompts claims more
certainty than it has).

This module knows nothing about training; it decodes with `c2c.core.engine`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

MIN_PROMPTS = 10  # fewer prompts: no verdict
DRAWS = 2000  # bootstrap resamples (seeded: the same counts give the same interval)
LEVEL = 0.95


@dataclass(frozen=True)
class Counts:
    """Per prompt: tokens emitted and target forward passes (prefill included)."""

    tokens: tuple[int, ...]
    calls: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.tokens)

    def head(self, n: int) -> "Counts":
        return Counts(self.tokens[:n], self.calls[:n])

    @property
    def per_call(self) -> float:
        return sum(self.tokens) / sum(self.calls)


@torch.no_grad()
def decode_counts(fuser, target, draft, prompts: list[list[int]], gamma: int, max_new_tokens: int, eos_ids: set[int],
                  adapter=None, masks: list[int] | None = None) -> Counts:
    """Counts of greedy speculative decoding of each prompt at `gamma`; `fuser` None: the plain draft
    (its adapter, if any, switched off). `masks`: parallel drafting with these mask ids."""
    from contextlib import nullcontext

    from ..core.engine import SpecConfig, SpeculativeDecoder
    from ..core.sampling import SamplingConfig

    spec = SpecConfig(gamma=gamma, max_new_tokens=max_new_tokens, parallel=masks is not None)
    decoder = SpeculativeDecoder(target, draft, spec, SamplingConfig(), eos_ids, fuser=fuser, masks=masks)
    tokens, calls = [], []
    with adapter.disabled() if adapter is not None and fuser is None else nullcontext():
        for prompt in prompts:
            result = decoder.generate(prompt)
            tokens.append(len(result.output_ids))
            calls.append(result.counters.target_calls)
    return Counts(tuple(tokens), tuple(calls))


@torch.no_grad()
def first_counts(fuser, target, draft, prompts: list[list[int]], gamma: int, max_new_tokens: int, eos_ids: set[int],
                 seconds: float, adapter=None) -> tuple[Counts, Counts]:
    """(fused, unfused) counts of as many of `prompts`, in order, as `seconds` allow (each prompt both
    ways; at least one prompt): the prompts every later evaluation decodes."""
    fused, unfused = Counts((), ()), Counts((), ())
    started = time.perf_counter()
    for prompt in prompts:
        if len(fused) and time.perf_counter() - started >= seconds:
            break
        u = decode_counts(None, target, draft, [prompt], gamma, max_new_tokens, eos_ids, adapter)
        f = decode_counts(fuser, target, draft, [prompt], gamma, max_new_tokens, eos_ids, adapter)
        unfused = Counts(unfused.tokens + u.tokens, unfused.calls + u.calls)
        fused = Counts(fused.tokens + f.tokens, fused.calls + f.calls)
    return fused, unfused


def paired_interval(fused: Counts, unfused: Counts, draws: int = DRAWS, level: float = LEVEL,
                    seed: int = 0) -> tuple[float, float]:
    """Percentile interval of the ratio fused/unfused of tokens per target call, prompts resampled
    with replacement as pairs (a prompt's fused and unfused counts stay together)."""
    g = torch.Generator().manual_seed(seed)
    pick = torch.randint(len(fused), (draws, len(fused)), generator=g)  # (draws, n)
    ft, fc, ut, uc = (torch.tensor(v, dtype=torch.float64)[pick].sum(1)
                      for v in (fused.tokens, fused.calls, unfused.tokens, unfused.calls))  # (draws,) each
    ratio = (ft / fc) / (ut / uc)
    tail = (1 - level) / 2
    low, high = torch.quantile(ratio, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return low, high


def figures(fused: Counts, unfused: Counts) -> dict:
    """The engine figures of one evaluation: totals, per-prompt wins and losses, the ratio and its interval."""
    f_rate = [t / c for t, c in zip(fused.tokens, fused.calls)]
    u_rate = [t / c for t, c in zip(unfused.tokens, unfused.calls)]
    out = {"engine_prompts": len(fused), "engine_tokens": sum(fused.tokens),
           "tokens_per_call_fused": fused.per_call, "tokens_per_call_unfused": unfused.per_call,
           "engine_wins": sum(a > b for a, b in zip(f_rate, u_rate)),
           "engine_losses": sum(a < b for a, b in zip(f_rate, u_rate)),
           "engine_ratio": fused.per_call / unfused.per_call, "engine_ratio_low": None, "engine_ratio_high": None}
    if len(fused) >= 2:
        out["engine_ratio_low"], out["engine_ratio_high"] = paired_interval(fused, unfused)
    return out


def verdict(fig: dict) -> tuple[str, str | None]:
    """(what the engine figure says, a warning or None): a warning only when the interval lies below 1."""
    n, low, high = fig["engine_prompts"], fig["engine_ratio_low"], fig["engine_ratio_high"]
    if n < MIN_PROMPTS:
        return (f"too few held-out prompts ({n}, fewer than {MIN_PROMPTS}) to tell whether fusion helps decoding: "
                "give more data, a larger --heldout_fraction or a longer --eval_seconds"), None
    span = f"{LEVEL:.0%} interval of the ratio {low:.3f}-{high:.3f}"
    if low > 1:
        return f"fusion raises decoding ({span}, above 1)", None
    if high < 1:
        return (f"fusion lowers decoding ({span}, below 1)",
                f"fusion lowers the engine's tokens per target call on {n} held-out prompts ({span}): this fuser makes "
                "decoding slower than no fuser; train longer or on more data, or run with --fuser_checkpoint none")
    return (f"these {n} prompts cannot tell whether fusion helps decoding ({span} holds 1): for a verdict decode more "
            "(--eval_seconds, more held-out data) or train longer"), None
