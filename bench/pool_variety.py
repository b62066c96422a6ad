#!/usr/bin/env python3
"""Distinct batch compositions and padding share of the trainer's length pool on small data: 48 and
300 answers of distinct lengths, batches of 8, 500 seeded draws, pool 1 (random) and 16.

    python bench/pool_variety.py

The last stdout line is one JSON object.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from c2c.tools import train_data  # noqa: E402


def variety(rows: int, pool: int, draws: int = 500, batch: int = 8) -> dict:
    g = torch.Generator().manual_seed(0)
    items = [(torch.randint(3, 300, (8 + k,), generator=g).tolist(), 5) for k in range(rows)]
    data, rng = train_data.SplitData.from_answers(items, 3), random.Random(0)
    seen, padding, total = set(), 0, 0
    for _ in range(draws):
        b = data.sample_blocks(rng, batch, pool)
        seen.add(tuple(sorted(b.rows)))
        padding, total = padding + b.padding, total + b.x.numel()
    return {"rows": rows, "pool": pool, "compositions": len(seen), "padding_share": round(padding / total, 3)}


if __name__ == "__main__":
    print(json.dumps([variety(rows, pool) for rows in (48, 300) for pool in (1, 16)]))
