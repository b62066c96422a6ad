"""Logit warping and the speculative acceptance rule (Leviathan et al. 2023, arXiv 2211.17192;
Chen et al. 2023, arXiv 2302.01318). Variable names follow the papers: p is the target's
distribution, q the draft's, gamma the number of drafted tokens.

Everything here stays on the device: no host synchronisation. The engine reads the result once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 means greedy (argmax); top_k 0 and top_p 1.0 mean "off"."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if not (0 <= self.temperature < float("inf")):  # also rejects nan
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:  # also rejects nan
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def probabilities(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """Warped distribution (..., V) in float32: temperature, then top-k, then top-p (nucleus)."""
    logits = logits.float() / cfg.temperature
    if cfg.top_k:
        kth = torch.topk(logits, min(cfg.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the first token always stays)
        drop_sorted = (sorted_probs.cumsum(-1) - sorted_probs) >= cfg.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(-1)


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token id per row of probs (..., V) -> (...)."""
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])


def next_token(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None):
    """Pick a token from logits (..., V). Returns (token (...), probs or None when greedy)."""
    if cfg.greedy:
        return logits.argmax(-1), None
    probs = probabilities(logits, cfg)
    return sample(probs, generator), probs


def accept_greedy(draft_tokens: torch.Tensor, target_logits: torch.Tensor,
                  force: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy verification.

    draft_tokens (gamma,), target_logits (gamma+1, V). Returns (n accepted, 0-d; next token, 0-d):
    the longest prefix where the draft equals the target's argmax, then the target's own token there.
    `force` (0-d bool, timing only): where true, every draft counts as accepted and the token is the
    target's bonus (a device flag, so one compiled graph serves both).
    """
    target_tokens = target_logits.argmax(-1)  # (gamma+1,)
    gamma = draft_tokens.shape[0]
    n = (draft_tokens == target_tokens[:gamma]).long().cumprod(0).sum()  # 0-d
    if force is not None:
        n = torch.where(force, gamma, n)
    return n, target_tokens.index_select(0, n.view(1)).squeeze(0)  # index_select: no implicit .item()


def accept_sampled(
    draft_tokens: torch.Tensor, q: torch.Tensor, p: torch.Tensor, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling's rejection rule; the emitted tokens are distributed exactly as p.

    draft_tokens (gamma,) sampled from q (gamma, V); p (gamma+1, V) the target's warped probs.
    Accept x_i with probability min(1, p_i(x_i) / q_i(x_i)); at the first rejection sample from
    norm(max(0, p_i - q_i)); if all gamma are accepted, sample the bonus token from p_gamma.
    """
    gamma = draft_tokens.shape[0]
    idx = draft_tokens.unsqueeze(-1)  # (gamma, 1)
    p_x = p[:gamma].gather(-1, idx).squeeze(-1)  # (gamma,)
    q_x = q.gather(-1, idx).squeeze(-1)  # (gamma,)
    r = torch.rand(gamma, device=p.device, generator=generator)
    accepted = r * q_x < p_x  # r < p/q without dividing by q
    n = accepted.long().cumprod(0).sum()  # 0-d
    residual = torch.cat([(p[:gamma] - q).clamp_min(0), p[gamma:]], dim=0)  # (gamma+1, V)
    at_n = n.view(1)
    row = residual.index_select(0, at_n).squeeze(0)  # (V,) selected on the device: no sync
    mass = row.sum()
    fallback = p.index_select(0, at_n).squeeze(0)  # p == q exactly leaves no residual mass
    row = torch.where(mass > 0, row / mass.clamp_min(1e-30), fallback)
    return n, sample(row, generator)
