"""How much a fuser changes the draft's cache, per projector, and closing the projectors that change nothing.

A projector's effect is the relative change fusion makes to the draft's K/V at the layer it writes,
as inference runs it (hard gates): rms(fused - own) / rms(own) over every head, position and channel,
the larger of K and V, on the K/V both models compute for given token ids (the draft's own from a
plain pass, the target's at the mapped layer). A closed gate's effect is 0 exactly.

Below `EFFECT_FLOOR` a projector changes nothing that decoding can use, yet costs its fusion time;
`close_inert` closes its gates, so the engine treats it as it treats any closed gate (a fuser with
none open is skipped whole). Why 1e-3 (docs/training.md#a-fuser-that-changes-nothing): the shipped
fusers' effects are 0.05 (tiny) and 15 (arith); scaled down, the smallest effect seen to change any
decoding count on 20 held-out prompts was 0.054, and from 0.0054 (tiny) and 0.15 (arith) down every
prompt decoded with the plain draft's counts. 1e-3 is 50x below the first and about the rms rounding
bf16 (a GPU's cache dtype) applies to every cached value (2^-9 / sqrt(3) = 1.1e-3).

This module knows nothing about training or prompts: it measures on the ids it is given.
"""

from __future__ import annotations

import torch

from . import cache as kv

EFFECT_FLOOR = 1e-3  # relative K/V change below which a projector is closed (see the docstring)


def _relative(new: torch.Tensor, old: torch.Tensor) -> float:
    old = old.float()
    scale = old.pow(2).mean().sqrt().clamp_min(1e-12)
    return float((new.float() - old).pow(2).mean().sqrt() / scale)  # sync: once per layer, outside decoding


@torch.no_grad()
def projector_effects(fuser, target, draft, ids: torch.Tensor) -> list[float]:
    """Effect of each projector (indexed as fuser.projectors; 0.0 for one the map does not use) on the
    K/V of `ids` (1, N) on the models' device."""
    tcache, dcache = kv.new_cache(target), kv.new_cache(draft)
    kv.forward(target, ids.to(next(target.parameters()).device), tcache, 0, logits_to_keep=1)
    kv.forward(draft, ids.to(next(draft.parameters()).device), dcache, 0, logits_to_keep=1)
    n = ids.shape[1]
    was_training = fuser.training
    fuser.eval()
    try:
        effects = [0.0] * len(fuser.projectors)
        for layer, (target_layer, idx) in fuser.layer_map.items():
            own = kv.read_kv(dcache, layer, 0, n)
            fused = fuser.fuse_layer(layer, kv.read_kv(tcache, target_layer, 0, n), own)
            effects[idx] = max(_relative(f, o.to(f.device)) for f, o in zip(fused, own))
    finally:
        fuser.train(was_training)
    return effects


def inert(effects: list[float], floor: float = EFFECT_FLOOR) -> list[int]:
    """The projectors whose effect is below `floor`."""
    return [i for i, e in enumerate(effects) if e < floor]


@torch.no_grad()
def close_inert(fuser, effects: list[float], floor: float = EFFECT_FLOOR) -> list[int]:
    """Close the gates of the projectors whose effect is below `floor` (inference only: a closed gate
    adds nothing, and a fuser with every gate closed is skipped by the engine). Returns their indices."""
    closed = [i for i in inert(effects, floor) if i in {idx for _, idx in fuser.layer_map.values()}]
    for i in closed:
        for gate in (fuser.projectors[i].key_gate_logit, fuser.projectors[i].value_gate_logit):
            gate.fill_(min(float(gate), 0.0))  # logit <= 0: the hard gate is 0
    return closed
