#!/usr/bin/env python3
"""One decode fusion call at real shapes (Qwen3-0.6B <- Qwen3-14B fuser: 28 projectors, hidden 1024,
8 KV heads x 128 on both sides, bf16, random weights) on the CPU: the per-layer C2C path against the
batched path the engine uses. Counts the matrix products and all aten ops of one call (what becomes
kernel launches on a GPU), checks the two agree bit for bit, and times both (median of --iters).

    OMP_NUM_THREADS=1 python bench/fusion_ops.py --tokens 5 --iters 10

Timings on a CPU say little about a GPU (there the per-layer path is launch-bound); the op counts
carry over. The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from c2c.core.fuser import C2CFuser, KVShape  # noqa: E402

MATMULS = {"mm", "bmm", "addmm", "baddbmm", "matmul", "linear"}


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = self.matmuls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in ("detach", "view", "_unsafe_view", "t", "transpose", "permute", "expand", "unsqueeze",
                        "squeeze", "select", "slice", "alias"):  # metadata-only ops launch nothing
            self.ops += 1
        self.matmuls += name in MATMULS
        return func(*args, **(kwargs or {}))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=5, help="positions fused (gamma + 1)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    draft, target = KVShape(28, 8, 128), KVShape(40, 8, 128)
    fuser = C2CFuser.create(draft, target, dtype=torch.bfloat16).to(torch.bfloat16)
    for proj in fuser.projectors:
        proj.key_gate_logit.data.fill_(1.0)
        proj.value_gate_logit.data.fill_(1.0)
    fuser.eval().requires_grad_(False)
    n = len(fuser.draft_layers)
    make = lambda heads: torch.randn(n, 1, heads, args.tokens, 128).to(torch.bfloat16)  # noqa: E731
    inputs = (make(8), make(8), make(8), make(8))
    result = {"tokens": args.tokens, "projectors": n,
              "parameters": sum(q.numel() for q in fuser.parameters()), "torch": torch.__version__}
    with torch.inference_mode():
        outputs = {}
        for name, fusion in (("per_layer", fuser), ("batched", None)):
            fusion = fusion or fuser.batched()
            with OpCounter() as counter:
                outputs[name] = fusion.fuse_layers(*inputs)
            seconds = []
            for _ in range(args.iters):
                t0 = time.perf_counter()
                fusion.fuse_layers(*inputs)
                seconds.append(time.perf_counter() - t0)
            result[name] = {"aten_ops": counter.ops, "matmuls": counter.matmuls,
                            "ms_median": round(1000 * statistics.median(seconds), 2)}
        result["bit_identical"] = all(torch.equal(a, b) for a, b in zip(outputs["per_layer"], outputs["batched"]))
    for name in ("per_layer", "batched"):
        r = result[name]
        print(f"{name:10s} {r['matmuls']:4d} matmuls, {r['aten_ops']:5d} aten ops, {r['ms_median']:8.2f} ms", file=sys.stderr)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
