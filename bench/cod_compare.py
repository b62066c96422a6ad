#!/usr/bin/env python3
"""Is PARD's conditional drop-token (COD, `train_fuser --cod_rate`) better per second of training? The
arith pair's parallel draft trained without fusion (PARD alone, the cheaper arm) with the build's data,
seed and schedule, three ways: every query (`--cod_rate 0`) for --steps; COD for the same steps; COD for
as many steps as the first run's seconds allowed (the per-second comparison). Each is scored by the
trainer's held-out per-offset agreement (the same held-out answers, thousands of positions per offset).

    OMP_NUM_THREADS=1 python bench/cod_compare.py --steps 1200 --out /tmp/cod
    OMP_NUM_THREADS=1 python bench/cod_compare.py --steps 1200 --fused --out /tmp/cod_fused

`seconds` is the whole arm (the target answering the build's prompts, then training): the same data
work in every arm, so equal seconds are equal training time.

Timing is wall-clock on whatever else the machine runs: run it on a quiet core. The last stdout line is
one JSON object (also written to <out>/cod_compare.json).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "presets"))


def arm(scratch: Path, name: str, steps: int, rate: float, args) -> dict:
    import build_arith

    bargs = build_arith.build_parser().parse_args(["--threads", "1", "--seed", str(args.seed), "--fuser_suffixes", "all"])
    extra = ("--parallel_drafts", str(args.k), "--draft_adapter", "lora", "--adapter_rank", "8", "--adapter_lr", "3e-3",
             "--eval_prompts", "0", "--eval_tokens", "3600", "--cod_rate", str(rate)) + (() if args.fused else ("--no-fusion",))
    info = build_arith.train_fuser(scratch, bargs, name, extra, steps, draft="pard_draft" if args.fused else "draft")
    last = info["last_eval"]
    return {"steps": steps, "cod_rate": rate, "seconds": info["seconds"],
            "agreement": [round(a, 4) for a in last["parallel_agreement_fused" if args.fused else "parallel_agreement_unfused"]],
            "positions": last["parallel_positions"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--rate", type=float, default=0.7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fused", action="store_true", help="the fused arm on top of the shipped PARD draft (presets/arith/"
                   "pard_draft, as build_parallel --fused_from pard) instead of PARD alone")
    p.add_argument("--out", type=Path, default=Path("output/cod_compare"))
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="cod_"))
    for name in ("draft", "target", "pard_draft"):
        (scratch / name).symlink_to(ROOT / "presets" / "arith" / name)
    runs = {"all_queries": arm(scratch, "all", args.steps, 0.0, args),
            "cod_same_steps": arm(scratch, "cod", args.steps, args.rate, args)}
    ratio = runs["all_queries"]["seconds"] / max(runs["cod_same_steps"]["seconds"], 1)
    runs["cod_same_seconds"] = arm(scratch, "cod_time", round(args.steps * ratio), args.rate, args)
    result = {"pair": "arith", "arm": "fused on the PARD draft" if args.fused else "PARD alone", "k": args.k, "rate": args.rate, "floor": 0.2, "runs": runs,
              "command": "python bench/cod_compare.py " + " ".join(sys.argv[1:])}
    (args.out / "cod_compare.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
