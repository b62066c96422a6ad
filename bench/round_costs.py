#!/usr/bin/env python3
"""Where a compiled round's time goes, chain against parallel drafting, on a shipped pair: the median
time of the draft's part (a chain: gamma steps in one compiled graph; parallel: one forward of the
window and gamma-1 masks) and of the target's verify with the acceptance, per round, for each gamma,
over greedy runs of the preset's held-out prompts (each output checked equal to the target's).

    OMP_NUM_THREADS=1 python bench/round_costs.py --preset arith --draft presets/arith/pard_draft

On this CPU a chain's draft steps inside one compiled graph cost little each (the graph call itself
costs most of the draft's part), so a parallel round can save at most that small per-step cost: the
table says how much, which bounds what parallel drafting can gain over a chain here at equal
acceptance. Timing only: no speedup is asserted. The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="arith", choices=("arith", "tiny"))
    p.add_argument("--draft", default=None, help="the draft folder (default: the preset's PARD draft, pard_draft/)")
    p.add_argument("--gammas", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--prompts", type=int, default=40, help="held-out prompts (the preset's eval files, first ones)")
    p.add_argument("--max_new_tokens", type=int, default=32)
    args = p.parse_args(argv)

    import torch

    from c2c import SpeculativePipeline
    from c2c.app.presets import PRESET_ROOT
    from c2c.core import rounds

    torch.set_num_threads(1)
    folder = PRESET_ROOT / args.preset
    files = sorted(folder.glob("eval_*.txt"))
    per_file = max(1, args.prompts // len(files))
    prompts = [line.strip() for f in files for line in f.read_text(encoding="utf-8").splitlines()[:per_file] if line.strip()]
    draft = args.draft or str(folder / "pard_draft")
    pipe = SpeculativePipeline.load(draft, str(folder / "target"), fuser=None, device="cpu", dtype="float32", compile=True)
    times: dict[str, list[float]] = {}

    def timed(cls, name, key):
        inner = getattr(cls, name)

        def wrapper(*a, **k):
            start = time.perf_counter()
            out = inner(*a, **k)
            times.setdefault(key, []).append(time.perf_counter() - start)
            return out
        setattr(cls, name, wrapper)
        return inner

    saved = [(rounds.ChainRound, "propose", timed(rounds.ChainRound, "propose", "chain")),
             (rounds.ParallelRound, "propose", timed(rounds.ParallelRound, "propose", "parallel")),
             (rounds.ChainRound, "verify", timed(rounds.ChainRound, "verify", "verify"))]
    rows = []
    try:
        for gamma in args.gammas:
            for parallel in (False, True):
                for prompt in prompts[:2]:  # compile this shape, untimed
                    pipe.generate(prompt, max_new_tokens=args.max_new_tokens, gamma=gamma, parallel_drafting=parallel)
                times.clear()
                accepted = []
                for prompt in prompts:
                    out = pipe.generate(prompt, max_new_tokens=args.max_new_tokens, gamma=gamma, parallel_drafting=parallel,
                                        compare=True)
                    if not out.comparison["outputs_match"]:
                        raise SystemExit(f"output differs from the target's on {prompt!r}")
                    accepted.append(out.metrics["average_accepted_length"])
                kind = "parallel" if parallel else "chain"
                row = {"kind": kind, "gamma": gamma, "draft_ms": statistics.median(times[kind]) * 1e3,
                       "verify_ms": statistics.median(times["verify"]) * 1e3, "rounds": len(times["verify"]),
                       "accepted_length": statistics.mean(accepted)}
                rows.append(row)
                print(f"{kind:8s} gamma {gamma}: draft {row['draft_ms']:.3f} ms, verify {row['verify_ms']:.3f} ms "
                      f"({row['rounds']} rounds)", file=sys.stderr)
    finally:
        for cls, name, inner in saved:
            setattr(cls, name, inner)
    chain = {r["gamma"]: r for r in rows if r["kind"] == "chain"}
    if len(chain) >= 2:  # the chain's draft part = fixed graph call + gamma steps: least squares over the gammas
        g = list(chain)
        mean_g = statistics.mean(g)
        mean_t = statistics.mean(chain[x]["draft_ms"] for x in g)
        slope = sum((x - mean_g) * (chain[x]["draft_ms"] - mean_t) for x in g) / sum((x - mean_g) ** 2 for x in g)
        fit = {"per_step_ms": slope, "fixed_ms": mean_t - slope * mean_g}
    else:
        fit = None
    result = {"preset": args.preset, "draft": draft, "rows": rows, "chain_draft_fit": fit,
              "torch": torch.__version__, "threads": 1,
              "command": "python bench/round_costs.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
