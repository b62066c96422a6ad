"""Parallel drafting (PARD, arXiv 2504.18583): the draft proposes all K drafts of a round in ONE
forward. Nothing here knows about the target, fusion or the loop (c2c.core.rounds runs a round).

The draft's input is the committed tokens it has not seen (the last round's accepted drafts and the
target's token, the pending one last), then K-1 copies of a mask id, at consecutive positions, with
ordinary causal attention: each mask sees the context and the masks before it. The output at the
last real token is draft 1, at mask i draft i+1. The K/V written at the mask positions are dropped
after the round (the cache's write position moves back to the committed tokens) and overwritten by
the next one. A draft trained for it (PARD's `amd/PARD-Qwen3-0.6B`, or our trainer's
`--parallel_drafts`) names its mask id in its config; any other draft drafts garbage past offset 1,
which the target rejects (the output is still the target's).

Fixed shapes (one compiled graph for every round): the unseen tokens sit in a window of K+1 slots
(a round commits at most K+1 tokens) of which the first `count` are real; the block is
[window's real tokens, K-1 masks, padding], 2K tokens, padding last so that causality hides it.
"""

from __future__ import annotations

import torch

from . import cache as kv
from .sampling import SamplingConfig, probabilities

# Where a draft's config names its mask id, in the order vLLM reads them (dflash_config is a dict).
MASK_KEYS = ("dflash_config.mask_token_id", "mask_token_id", "pard_token", "ptd_token_id")


def config_mask_ids(config) -> list[int] | None:
    """The mask id(s) a draft's config names (a list gives one id per offset: entry i stands for draft
    i+2), the first of MASK_KEYS present; None when it names none."""
    for key in MASK_KEYS:
        value = config
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else getattr(value, part, None)
            if value is None:
                break
        if value is not None:
            ids = [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]
            if ids:
                return ids
    return None


def mask_row(ids: list[int], k: int) -> list[int]:
    """The K-1 mask ids of a round of K drafts: one per mask, the last listed id repeated past the list
    (released drafts trained at 8 are used at 12: offsets extrapolate)."""
    return [ids[min(i, len(ids) - 1)] for i in range(k - 1)]


def block(window: torch.Tensor, count: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """The draft's input (W + M,): window (W,) whose first `count` (0-d) entries are the unseen
    tokens, then masks (M,), then padding (the last mask id; W - count slots, never attended: causality). On the
    device, fixed shape."""
    w, m = window.shape[0], masks.shape[0]
    index = torch.arange(w + m, device=window.device)  # (W+M,)
    real = window.index_select(0, index.clamp_max(w - 1))
    if m == 0:
        return torch.where(index < count, real, real[:1])
    masked = masks.index_select(0, (index - count).clamp(0, m - 1))
    return torch.where(index < count, real, masked)


def parallel_draft(model, cache, window: torch.Tensor, count: torch.Tensor, masks: torch.Tensor, keyword: str,
                   sampling: SamplingConfig, uniforms: torch.Tensor | None):
    """One draft forward of [unseen tokens, masks] at the static cache's write position, then the
    write position set to just after the unseen tokens (the mask K/V dropped). Returns (drafted (K,),
    q (K, V) the warped distributions they were drawn from, or None when greedy).

    Sampled drafts: draft i is drawn from q_i by inverse CDF with uniforms[i] (drawn by the caller with
    the user's generator). q_i depends on the prefix alone (the masks stand for drafts 1..i-1), so
    P(d_i | prefix, d_1..d_i-1) = q_i: the rejection rule's q, and the output stays exactly the target's."""
    k = masks.shape[0] + 1
    start = kv.write_position(cache).clone()  # a copy: the forward moves the write position in place
    tokens = block(window, count, masks)  # (2K,) for a window of K+1
    # padding sits at the last mask's position: never past what the real tokens and masks reach (a model
    # with learned absolute positions has no embedding beyond its context)
    positions = start + torch.arange(tokens.shape[0], device=tokens.device).clamp_max(count + k - 2)
    keep = count - 1 + torch.arange(k, device=tokens.device)  # the last real token and the masks
    logits = kv.forward_masked(model, tokens.view(1, -1), cache, positions.view(1, -1), None, 0, keyword)[0]
    logits = logits.index_select(0, keep.to(logits.device))  # (K, V)
    kv.set_length(cache, start + count)
    if sampling.greedy:
        return logits.argmax(-1), None
    q = probabilities(logits, sampling)  # (K, V)
    cdf = q.double().cumsum(-1)  # float64: a float32 running sum over a large vocabulary drifts (~1e-3 in total variation)
    drafted = torch.searchsorted(cdf, (uniforms.double().view(-1, 1) * cdf[:, -1:]).contiguous(), right=True).view(-1)
    return drafted.clamp_max(q.shape[-1] - 1), q


def next_window(decided: torch.Tensor, g: int) -> tuple[torch.Tensor, torch.Tensor]:
    """After a round: the tokens it committed as the next window. decided (g+2,): [n, d_1..d_g, the
    target's token]. Returns (window (g+1,): d_1..d_n then the token, count n+1 (0-d)); on the device."""
    n = decided[:1]
    window = decided[1 : g + 2].clone().index_copy_(0, n, decided[g + 1 :])
    return window, n[0] + 1
