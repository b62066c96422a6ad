#!/usr/bin/env python3
"""What the host does in one compiled speculative round: forced-accept rounds (every draft accepted,
so every round is a full gamma round) of the engine's fast path on random-init models, counted
with the torch profiler. Reports per round the compiled calls (graph replays on CUDA) and the
eager aten ops the host issues between them (launches on a GPU, view ops listed apart), and the
round's host-side time (median of --runs runs; at tiny shapes the models cost almost nothing, so
this is mostly host work).

    OMP_NUM_THREADS=1 python bench/round_ops.py --synthetic tiny --gamma 4 --runs 5

Counts are the difference between a long and a short run divided by the difference in rounds, so
the prefill and the last (shorter, eager) rounds cancel out. The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from c2c import synthetic  # noqa: E402
from c2c.cli import run_main  # noqa: E402
from c2c.engine import CompiledSteps, SpecConfig, SpeculativeDecoder  # noqa: E402
from c2c.sampling import SamplingConfig  # noqa: E402

VIEWS = {"aten::view", "aten::slice", "aten::select", "aten::unsqueeze", "aten::squeeze", "aten::resolve_conj",
         "aten::resolve_neg", "aten::alias", "aten::detach", "aten::lift_fresh", "aten::t", "aten::transpose"}


def count_round_ops(target, draft, fuser, compiled: CompiledSteps, gamma: int, prompt: list[int]) -> tuple[float, dict]:
    """Per full compiled forced-accept round: (compiled calls, {eager aten op: count}), the difference
    of a 12-round and a 4-round run (the prefill and the shorter last rounds cancel out)."""

    def count(rounds: int):
        dec = SpeculativeDecoder(target, draft, SpecConfig(gamma, rounds * (gamma + 1) + 1), SamplingConfig(), set(),
                                 fuser=fuser, compiled=compiled, force_accept=True)
        dec.generate(prompt)  # builds every graph of this run's shapes
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            result = dec.generate(prompt)
        regions, ops = 0, {}
        for event in prof.events():
            if event.cpu_parent is not None:
                continue
            if "Compiled" in event.name:
                regions += 1
            elif event.name.startswith("aten::"):
                ops[event.name] = ops.get(event.name, 0) + 1
        return result.counters.rounds, regions, ops

    (r1, g1, o1), (r2, g2, o2) = count(4), count(12)
    per = {k: (o2.get(k, 0) - o1.get(k, 0)) / (r2 - r1) for k in set(o1) | set(o2)}
    return (g2 - g1) / (r2 - r1), dict(sorted(((k, v) for k, v in per.items() if v), key=lambda kv: (-kv[1], kv[0])))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    synthetic.add_arguments(ap, device="cpu")
    ap.add_argument("--gamma", type=int, default=4)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--runs", type=int, default=5, help="timed runs of --rounds rounds each (median)")
    ap.add_argument("--rounds", type=int, default=80)
    args = ap.parse_args(argv)
    device, dtype = synthetic.resolve(args)
    pair = synthetic.build(args.synthetic, device, dtype)
    compiled = CompiledSteps()
    prompt = torch.randint(0, pair.target.config.vocab_size, (args.context,)).tolist()
    spec = SpecConfig(args.gamma, args.rounds * (args.gamma + 1) + 1)
    with torch.inference_mode():
        print(f"compiling ({args.synthetic}, {device}, {dtype}) ...", flush=True)
        calls, per = count_round_ops(pair.target, pair.draft, pair.fuser, compiled, args.gamma, prompt)
        times = []
        for _ in range(args.runs + 1):  # the first builds the long run's cache size
            dec = SpeculativeDecoder(pair.target, pair.draft, spec, SamplingConfig(), set(), fuser=pair.fuser,
                                     compiled=compiled, force_accept=True)
            result = dec.generate(prompt)
            times.append(result.latency / result.counters.rounds)
        times = times[1:]
    launches = {k: v for k, v in per.items() if k not in VIEWS}
    report = {"synthetic": args.synthetic, "device": str(device), "dtype": str(dtype).removeprefix("torch."),
              "gamma": args.gamma, "torch": torch.__version__, "compiled_calls_per_round": calls,
              "eager_ops_per_round": sum(per.values()), "eager_launches_per_round": sum(launches.values()),
              "eager_launches": launches, "eager_views": {k: v for k, v in per.items() if k in VIEWS},
              "round_ms_median": statistics.median(times) * 1e3, "round_ms_runs": [round(t * 1e3, 3) for t in times]}
    print(f"per round: {calls:g} compiled calls, {report['eager_launches_per_round']:g} "
          f"eager launches ({', '.join(f'{k[6:]} {v:g}' for k, v in launches.items())}), "
          f"{sum(report['eager_views'].values()):g} views; round {report['round_ms_median']:.3f} ms (median of {args.runs})")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
