#!/usr/bin/env python3
"""What a verify of N tokens costs the target, and a tree depth (one draft forward over the frontier's
F nodes) costs the draft, for tree rounds: one forward of 1, 5, 8, 16, 32, 64 target tokens, and of
1, 2, 4, 8 draft tokens, after a cached context, at real shapes without weights (`--synthetic qwen3`: a random-init
Qwen3-14B, bf16 on a GPU). A batch-1 verify reads the whole model's weights whatever N is, so a tree
of 32 nodes should cost little more than a chain of 5; this measures by how much. Eager always;
`--compiled 5 32` also times those sizes compiled (CUDA graphs: one compile each, minutes on a fresh
machine). Random weights: timing only.

    python bench/verify_blocks.py --synthetic qwen3 --compiled 5 32      # one GPU
    OMP_NUM_THREADS=1 python bench/verify_blocks.py --synthetic tiny --device cpu

Writes <output_dir>/verify_blocks_<time>.json; the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from c2c.tools import synthetic  # noqa: E402
from c2c.app.cli import run_main  # noqa: E402
from c2c.core.engine import CompiledSteps  # noqa: E402
from c2c.app.results import check_output_dir, command_line, environment, save_json_atomic  # noqa: E402


def run(args, argv) -> int:
    check_output_dir(args.output_dir)
    device, dtype = synthetic.resolve(args)
    target = synthetic.build_model(args.synthetic, "target", device, dtype)
    draft = synthetic.build_model(args.synthetic, "draft", device, dtype) if args.draft_blocks or args.draft_compiled else None
    timings = {"eager": {}, "compiled": {}, "draft_eager": {}, "draft_compiled": {}}
    for n in args.blocks:
        timings["eager"][n] = synthetic.forward_time(target, n, args.context, None, args.iters, args.warmup) * 1e3
        print(f"verify {n:3d} tokens eager    {timings['eager'][n]:9.3f} ms", file=sys.stderr)
    compiled = CompiledSteps() if args.compiled or args.draft_compiled else None
    for n in args.compiled:
        timings["compiled"][n] = synthetic.forward_time(target, n, args.context, compiled, args.iters, args.warmup) * 1e3
        print(f"verify {n:3d} tokens compiled {timings['compiled'][n]:9.3f} ms", file=sys.stderr)
    for n in args.draft_blocks:
        timings["draft_eager"][n] = synthetic.forward_time(draft, n, args.context, None, args.iters, args.warmup) * 1e3
        print(f"draft   {n:3d} tokens eager    {timings['draft_eager'][n]:9.3f} ms", file=sys.stderr)
    for n in args.draft_compiled:  # parallel drafting's one forward of 2K tokens (window K+1, K-1 masks)
        timings["draft_compiled"][n] = synthetic.forward_time(draft, n, args.context, compiled, args.iters, args.warmup) * 1e3
        print(f"draft   {n:3d} tokens compiled {timings['draft_compiled'][n]:9.3f} ms", file=sys.stderr)
    ratios = {kind: {n: ms / t[min(t)] for n, ms in t.items()} for kind, t in timings.items() if t}
    result = {"config": {"command": command_line(argv), "synthetic": args.synthetic, "context": args.context,
                         "blocks": args.blocks, "compiled": args.compiled, "draft_blocks": args.draft_blocks,
                         "draft_compiled": args.draft_compiled, "dtype": str(dtype).removeprefix("torch.")},
              "environment": environment(device), "ms": timings, "vs_smallest": ratios}
    path = save_json_atomic(result, args.output_dir, prefix="verify_blocks")
    print(json.dumps({"ms": timings, "vs_smallest": ratios, "path": str(path)}))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    synthetic.add_arguments(p, synthetic="qwen3")
    p.add_argument("--blocks", type=int, nargs="+", default=[1, 5, 8, 16, 32, 64], help="verify sizes timed eager")
    p.add_argument("--compiled", type=int, nargs="*", default=[], help="verify sizes also timed compiled")
    p.add_argument("--draft_blocks", type=int, nargs="*", default=[1, 2, 4, 8],
                   help="draft forwards timed eager (a tree depth feeds --tree_topk frontier nodes at once)")
    p.add_argument("--draft_compiled", type=int, nargs="*", default=[],
                   help="draft forwards also timed compiled (parallel drafting runs one forward of 2K tokens a round)")
    p.add_argument("--context", type=int, default=256, help="cached positions before the verify")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--output_dir", default="output/verify_blocks")
    args = p.parse_args(argv)
    return run_main(run, args, argv)


if __name__ == "__main__":
    sys.exit(main())
