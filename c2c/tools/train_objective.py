"""The trainer's objective: target and fused-draft logits over a batch, the losses, the held-out figure.

A draft query at position p in a block starting at m (see `train_data.block_layout`) attends the
fused K/V of every position before m and the draft's own K/V from m to p: the draft's cache while it
drafts a round after m committed tokens. Which draft K/V go into the fuser (`draft_kv`):

- "decode" (the default: measured no better or worse than "plain" in what it trains, see
  docs/training.md, but exact and one draft pass cheaper): the K/V decoding gives the fuser.
  While decoding, the draft computes its K/V at a generated position in the round that first feeds
  it, attending the already fused cache before the round, and decode fusion then fuses those. One
  draft pass reproduces it: at every layer the pass's own K/V are fused at once (inside attention,
  `cache.fusing_cache`) and each query sees [fused before its block start, own from it on], so the
  next layer's K/V are computed as decoding computes them (prompt positions attend their own K/V
  only, as prefill does). Exact for every layer, for rounds that coincide with the blocks.
- "plain" (the earlier objective): the fuser gets the draft's K/V from a plain causal pass (pass 1),
  then the draft runs again with the block mask over them (pass 2). At the first layer these equal the
  decode-time K/V; from the second layer on they differ at generated positions (the plain pass
  never saw fused keys).

`fused_suffix_logits` is the one-split computation, kept as the reference the tests compare blocks
against (and the bench scripts' per-split reader). This module knows nothing about data files or
the training loop.
"""

from __future__ import annotations

import torch

from ..core import cache as kv
from ..errors import UserInputError

DRAFT_KV = ("decode", "plain")


def block_allowed(starts: torch.Tensor) -> torch.Tensor:
    """(B, L, 2L) bool: query p may attend the fused keys (the first L) of positions before its block
    start and its own keys (the last L) from the block start up to p."""
    L = starts.shape[1]
    pos = torch.arange(L, device=starts.device)
    start = starts.unsqueeze(-1)  # (B, L, 1)
    fused = pos.view(1, 1, L) < start
    own = (pos.view(1, 1, L) >= start) & (pos.view(1, 1, L) <= pos.view(1, L, 1))
    return torch.cat([fused, own], dim=-1)


def draft_block_mask(draft, starts: torch.Tensor):
    """The mask the draft's pass over [fused, own] keys takes: `block_allowed`, with its sliding-window
    layers limited to their window as decoding limits them (both key halves sit at positions 0..L-1)."""
    L = starts.shape[1]
    pos = torch.arange(L, device=starts.device).view(1, L)
    return kv.layer_masks(draft, block_allowed(starts), pos, torch.cat([pos, pos], 1))


def _target_pass(target, x: torch.Tensor):
    with torch.no_grad():
        tcache = kv.new_cache(target)
        return kv.forward(target, x, tcache, 0), tcache  # (B, L, V)


def all_position_logits(fuser, target, draft, x: torch.Tensor, starts: torch.Tensor, fuse: bool = True,
                        draft_grad: bool = False, draft_kv: str = "decode"):
    """Target and draft logits at every position, each (B, L, V): the draft's at position p as it
    guesses after a fused prefix of starts[p] tokens. x (B, L) right-padded token ids on the models'
    device. One target forward, then one draft pass ("decode") or two ("plain"); without fusion, one
    plain draft pass (its own cache is what the draft decodes with). `draft_grad`: the draft is being
    trained (an adapter), so its plain pass keeps gradients too."""
    if draft_kv not in DRAFT_KV:
        raise UserInputError(f"--draft_kv must be {' or '.join(DRAFT_KV)}, got {draft_kv!r}")
    B, L = x.shape
    target_logits, tcache = _target_pass(target, x)
    positions = torch.arange(L, device=x.device).expand(B, L)
    if not fuse:
        with torch.set_grad_enabled(draft_grad and torch.is_grad_enabled()):
            return target_logits, kv.forward(draft, x, kv.new_cache(draft), 0)
    kv.check_custom_masks(draft, "draft", "the trainer needs attention that takes a custom mask",
                          "load it with attn_implementation='sdpa'")
    mask = draft_block_mask(draft, starts.to(x.device))
    if draft_kv == "plain":
        plain = kv.new_cache(draft)
        with torch.set_grad_enabled(draft_grad and torch.is_grad_enabled()):
            kv.forward(draft, x, plain, 0, logits_to_keep=1)  # pass 1

        def source(layer, keys, values):  # the plain pass's K/V, whatever this pass computes
            return kv.read_kv(plain, layer, 0, L)
    else:
        def source(layer, keys, values):  # this pass's own K/V: what decoding fuses
            return keys, values

    def fuse_layer(layer, keys, values):
        draft_kv_ = source(layer, keys, values)
        if layer not in fuser.layer_map:
            return draft_kv_
        target_layer, _ = fuser.layer_map[layer]
        return fuser.fuse_layer(layer, kv.read_kv(tcache, target_layer, 0, L), draft_kv_)

    draft_logits = kv.forward_masked(draft, x, kv.fusing_cache(draft, fuse_layer), positions, mask)
    return target_logits, draft_logits


def fused_suffix_logits(fuser, target, draft, x: torch.Tensor, m: int, s: int, fuse: bool = True, draft_grad: bool = False):
    """Target and draft logits for the s suffix tokens after a (fused) prefix of m tokens, the draft's
    prefix K/V from a plain pass (the reference of `draft_kv="plain"`).

    x (B, L) token ids on the models' device. Returns (target_logits, draft_logits), each (B, s, V):
    position j predicts token m+j+1.
    """
    with torch.no_grad():
        tcache, dcache = kv.new_cache(target), kv.new_cache(draft)
        target_logits = kv.forward(target, x[:, : m + s], tcache, 0)[:, m:]  # (B, s, V)
    with torch.set_grad_enabled(draft_grad and torch.is_grad_enabled()):
        kv.forward(draft, x[:, :m], dcache, 0, logits_to_keep=1)
    if fuse:
        for layer in range(kv.num_layers(dcache)):
            if layer in fuser.layer_map:
                fused = fuser.fuse_layer(layer, kv.read_kv(tcache, fuser.layer_map[layer][0], 0, m), kv.read_kv(dcache, layer, 0, m))
                kv.replace_kv(dcache, layer, *fused)
    draft_logits = kv.forward(draft, x[:, m : m + s], dcache, m)  # (B, s, V), through the fused cache
    return target_logits, draft_logits


def token_losses(target_logits: torch.Tensor, draft_logits: torch.Tensor, objective: str) -> torch.Tensor:
    """Per-position loss (...,): KL(p_target || q_draft) or cross-entropy on the target's greedy token."""
    log_q = draft_logits.float().log_softmax(-1)
    if objective == "ce":
        return -log_q.gather(-1, target_logits.argmax(-1, keepdim=True)).squeeze(-1)
    log_p = target_logits.float().log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def loss_fn(target_logits: torch.Tensor, draft_logits: torch.Tensor, objective: str) -> torch.Tensor:
    """The mean of token_losses over every position given."""
    return token_losses(target_logits, draft_logits, objective).mean()


@torch.no_grad()
def paired_agreement(fuser, target, draft, heldout, tokens: int, batch_size: int, objective: str = "kl",
                     device=None, adapter=None, fuse: bool = True, draft_kv: str = "decode") -> dict:
    """Held-out top-1 agreement of draft and target at every span position of the held-out sequences
    (blocks of gamma+1 as in training), fused (as the fuser is: hard gates in eval mode) and unfused,
    with the paired counts: won = right only when fused, lost = right only unfused. At least `tokens`
    positions; `heldout_sequences` says how many distinct sequences they come from.

    With a draft adapter, "fused" is the draft as the fused modes run it (adapter on, fusion on unless
    `fuse` is False), "unfused" the plain draft (adapter off, no fusion: the baseline a user compares
    with), and "adapter_only" the adapted draft without fusion (how much the adapter does alone).
    """
    counts = {"fused": 0, "unfused": 0, "won": 0, "lost": 0, "adapter_only": 0}
    total, loss, rows = 0, 0.0, set()
    for batch in heldout.evaluation(tokens, batch_size):
        x, mask = batch.x.to(device), batch.supervised.to(device)
        t_logits, fused = all_position_logits(fuser, target, draft, x, batch.starts, fuse=fuse, draft_kv=draft_kv)
        want = t_logits.argmax(-1)[mask]
        if adapter is None:
            unfused = all_position_logits(fuser, target, draft, x, batch.starts, fuse=False)[1]
        else:
            alone = all_position_logits(fuser, target, draft, x, batch.starts, fuse=False)[1] if fuse else fused
            counts["adapter_only"] += int((alone.argmax(-1)[mask] == want).sum())
            with adapter.disabled():
                unfused = all_position_logits(fuser, target, draft, x, batch.starts, fuse=False)[1]  # the plain draft
        right_f, right_u = fused.argmax(-1)[mask] == want, unfused.argmax(-1)[mask] == want
        counts["fused"] += int(right_f.sum())
        counts["unfused"] += int(right_u.sum())
        counts["won"] += int((right_f & ~right_u).sum())
        counts["lost"] += int((right_u & ~right_f).sum())
        loss += token_losses(t_logits[mask], fused[mask], objective).sum().item()
        total += want.numel()
        rows.update(batch.rows)
    open_gates, gates = fuser.open_gates() if fuser is not None else (0, 0)
    figures = {
        "heldout_loss": loss / total, "heldout_tokens": total, "heldout_sequences": len(rows),
        "agreement_fused": counts["fused"] / total, "agreement_unfused": counts["unfused"] / total,
        "won": counts["won"], "lost": counts["lost"], "open_gates": open_gates, "gates": gates,
    }
    if adapter is not None:
        figures["agreement_adapter_only"] = counts["adapter_only"] / total
    return figures
