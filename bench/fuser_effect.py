#!/usr/bin/env python3
"""Why `c2c.core.effect.EFFECT_FLOOR` is 1e-3: the shipped tiny and arith fusers with their output
projections scaled down, each projector's effect on the draft's K/V (relative, hard gates) against
what greedy speculative decoding of 20 held-out prompts does with it (prompts whose counts equal the
plain draft's, target calls fused and plain). CPU, float32, gamma 4, 48 new tokens.

    OMP_NUM_THREADS=1 python bench/fuser_effect.py

The last stdout line is one JSON object.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from c2c.app.loading import eos_token_ids, load_model, load_tokenizer  # noqa: E402
from c2c.app.prompts import encode_prompt, read_prompts  # noqa: E402
from c2c.core.effect import projector_effects  # noqa: E402
from c2c.core.engine import SpecConfig, SpeculativeDecoder  # noqa: E402
from c2c.core.fuser import KVShape, load_fuser  # noqa: E402
from c2c.core.sampling import SamplingConfig  # noqa: E402

SCALES = (1.0, 1e-1, 1e-2, 3e-3, 1e-3, 1e-4, 1e-6)
PAIRS = {"tiny": "eval_prompts.txt", "arith": "eval_additions.txt"}


def scaled(fuser, scale: float):
    out = copy.deepcopy(fuser)
    with torch.no_grad():
        for p in out.projectors:
            for kind in ("key", "value"):
                for part in ("weight", "bias"):
                    getattr(getattr(p, f"{kind}_proj_out"), part).mul_(scale)
    return out


def counts(target, draft, fuser, prompts, eos) -> list[tuple[int, int]]:
    decoder = SpeculativeDecoder(target, draft, SpecConfig(gamma=4, max_new_tokens=48), SamplingConfig(), eos, fuser=fuser)
    return [(r.counters.total_accepted, r.counters.target_calls) for r in map(decoder.generate, prompts)]


def measure(name: str) -> list[dict]:
    root, cpu = ROOT / "presets" / name, torch.device("cpu")
    target = load_model(str(root / "target"), "target", torch.float32, cpu)
    draft = load_model(str(root / "draft"), "draft", torch.float32, cpu)
    eos = eos_token_ids(target, load_tokenizer(str(root / "target")))
    tokenizer = load_tokenizer(str(root / "target"))
    prompts = [encode_prompt(tokenizer, p) for p in read_prompts(root / PAIRS[name])][:20]
    fuser = load_fuser(root / "fuser", KVShape.of(draft.config), KVShape.of(target.config), dtype=torch.float32)
    ids = torch.tensor([prompts[0] + prompts[1]])  # (1, N)
    plain = counts(target, draft, None, prompts, eos)
    rows = []
    for scale in SCALES:
        f = scaled(fuser, scale)
        fused = counts(target, draft, f, prompts, eos)
        row = {"pair": name, "scale": scale, "effects": projector_effects(f, target, draft, ids),
               "same_counts": sum(a == b for a, b in zip(fused, plain)), "prompts": len(prompts),
               "target_calls_fused": sum(c for _, c in fused), "target_calls_plain": sum(c for _, c in plain)}
        print(row, file=sys.stderr)
        rows.append(row)
    return rows


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(json.dumps([row for name in PAIRS for row in measure(name)]))
