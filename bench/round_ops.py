#!/usr/bin/env python3
"""What the host does in one compiled speculative round: forced-accept rounds (every draft accepted,
so every round is a full gamma round) of the engine's fast path on random-init models, counted
with the torch profiler; with --tree B,D,K, tree rounds of that shape (greedy, or sampled with
--temperature), counted over a window of full-shape rounds. Reports per round the compiled calls (graph replays on CUDA) and the
eager aten ops the host issues between them (launches on a GPU, view ops listed apart), and the
round's host-side time (median of --runs runs; at tiny shapes the models cost almost nothing, so
this is mostly host work).

    OMP_NUM_THREADS=1 python bench/round_ops.py --synthetic tiny --gamma 4 --runs 5
    OMP_NUM_THREADS=1 python bench/round_ops.py --synthetic tiny --tree 16,4,4 --temperature 0.8
    OMP_NUM_THREADS=1 python bench/round_ops.py --synthetic tiny --gamma 8 --parallel --temperature 0.8

Chain counts are the difference between a long and a short run divided by the difference in rounds,
so the prefill and the last (shorter, eager) rounds cancel out; tree counts come from a profiler
started and stopped by the round hook around rounds that all have the full shape (the hook's own
cache-length reads are taken out). The last stdout line is one JSON object.
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

from c2c.tools import synthetic  # noqa: E402
from c2c.app.cli import run_main  # noqa: E402
from c2c.core.engine import CompiledSteps, SpecConfig, SpeculativeDecoder  # noqa: E402
from c2c.core.sampling import SamplingConfig  # noqa: E402
from c2c.core.tree import TreeShape  # noqa: E402

VIEWS = {"aten::view", "aten::slice", "aten::select", "aten::unsqueeze", "aten::squeeze", "aten::resolve_conj",
         "aten::resolve_neg", "aten::alias", "aten::detach", "aten::lift_fresh", "aten::t", "aten::transpose"}


def count_round_ops(target, draft, fuser, compiled: CompiledSteps, gamma: int, prompt: list[int],
                    parallel: list[int] | None = None, sampling: SamplingConfig = SamplingConfig()) -> tuple[float, dict]:
    """Per full compiled forced-accept round: (compiled calls, {eager aten op: count}), the difference
    of a 12-round and a 4-round run (the prefill and the shorter last rounds cancel out). `parallel`:
    the mask ids of parallel rounds (None: chain rounds)."""

    def count(rounds: int):
        spec = SpecConfig(gamma, rounds * (gamma + 1) + 1, parallel=parallel is not None)
        dec = SpeculativeDecoder(target, draft, spec, sampling, set(), fuser=fuser, compiled=compiled, force_accept=True,
                                 masks=parallel)
        dec.generate(prompt)  # builds every graph of this run's shapes
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            result = dec.generate(prompt)
        return (result.counters.rounds, *_tally(prof))

    (r1, g1, o1), (r2, g2, o2) = count(4), count(12)
    per = {k: (o2.get(k, 0) - o1.get(k, 0)) / (r2 - r1) for k in set(o1) | set(o2)}
    return (g2 - g1) / (r2 - r1), _sorted(per)


def _sorted(per: dict) -> dict:
    return dict(sorted(((k, v) for k, v in per.items() if v), key=lambda item: (-item[1], item[0])))


def _tally(prof) -> tuple[int, dict]:
    """Top-level events: compiled calls, and the eager aten ops by name."""
    regions, ops = 0, {}
    for event in prof.events():
        if event.cpu_parent is not None:
            continue
        if "Compiled" in event.name:
            regions += 1
        elif event.name.startswith("aten::"):
            ops[event.name] = ops.get(event.name, 0) + 1
    return regions, ops


def count_tree_round_ops(target, draft, fuser, compiled: CompiledSteps, shape: TreeShape, prompt: list[int],
                         sampling: SamplingConfig = SamplingConfig(), rounds: int = 8) -> tuple[float, dict]:
    """Per full compiled tree round: (compiled calls, {eager aten op: count}), from a profiler the
    round hook starts after round 2 and stops after round 2 + `rounds` (every round between them has
    the full shape: the run is long enough). The hook's RoundInfo holds host values only (no device read)."""
    spec = SpecConfig(4, (rounds + 4) * (shape.depth + 1) + 2, tree=shape)

    def run(generator):
        prof = profile(activities=[ProfilerActivity.CPU])

        def hook(info):
            if info.round == 2:
                prof.start()
            elif info.round == 2 + rounds:
                prof.stop()

        dec = SpeculativeDecoder(target, draft, spec, sampling, set(), fuser=fuser, compiled=compiled, generator=generator,
                                 on_round=hook)
        dec.generate(prompt)
        return dec, prof

    device = next(draft.parameters()).device  # the round's draws happen on the draft's device
    run(torch.Generator(device=device).manual_seed(0))  # builds every graph of this run's shapes
    dec, prof = run(torch.Generator(device=device).manual_seed(0))
    regions, ops = _tally(prof)
    per = {k: v / rounds for k, v in ops.items()}
    return regions / rounds, _sorted(per)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    synthetic.add_arguments(ap, device="cpu")
    ap.add_argument("--gamma", type=int, default=4)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--runs", type=int, default=5, help="timed runs of --rounds rounds each (median)")
    ap.add_argument("--rounds", type=int, default=80)
    ap.add_argument("--tree", default=None, metavar="B,D,K", help="count tree rounds of this shape (budget, depth, top_k)")
    ap.add_argument("--parallel", action="store_true", help="count parallel-drafting rounds (one draft forward of gamma drafts)")
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="with --tree or --parallel: sampled rounds (0: greedy); chain rounds are counted greedy")
    args = ap.parse_args(argv)
    shape = None
    if args.tree is not None:
        try:
            shape = TreeShape(*(int(x) for x in args.tree.split(",")))
        except (TypeError, ValueError) as e:
            raise SystemExit(f"error: --tree takes BUDGET,DEPTH,TOPK (e.g. 16,4,4): {e}") from None
    device, dtype = synthetic.resolve(args)
    pair = synthetic.build(args.synthetic, device, dtype)
    if args.parallel and shape is not None:
        raise SystemExit("error: --parallel drafts a chain: drop --tree")
    sampling = SamplingConfig(temperature=args.temperature if shape is not None or args.parallel else 0.0)
    masks = [pair.draft.config.vocab_size - 1] if args.parallel else None  # timing only: any id serves
    compiled = CompiledSteps()
    prompt = torch.randint(0, pair.target.config.vocab_size, (args.context,)).tolist()
    with torch.inference_mode():
        print(f"compiling ({args.synthetic}, {device}, {dtype}{'' if shape is None else ', tree ' + args.tree}) ...", flush=True)
        if shape is None:
            calls, per = count_round_ops(pair.target, pair.draft, pair.fuser, compiled, args.gamma, prompt, masks, sampling)
            spec = SpecConfig(args.gamma, args.rounds * (args.gamma + 1) + 1, parallel=args.parallel)
        else:
            calls, per = count_tree_round_ops(pair.target, pair.draft, pair.fuser, compiled, shape, prompt, sampling)
            spec = SpecConfig(args.gamma, args.rounds * (shape.depth + 1) + 1, tree=shape)
        times = []
        for i in range(args.runs + 1):  # the first builds the long run's cache size
            dec = SpeculativeDecoder(pair.target, pair.draft, spec, sampling, set(), fuser=pair.fuser, compiled=compiled,
                                     generator=torch.Generator(device=device).manual_seed(i), force_accept=True, masks=masks)
            result = dec.generate(prompt)
            times.append(result.latency / result.counters.rounds)
        times = times[1:]
    launches = {k: v for k, v in per.items() if k not in VIEWS}
    shape_fields = ({"gamma": args.gamma, "parallel": args.parallel, "temperature": sampling.temperature} if shape is None else
                    {"tree": {"budget": shape.budget, "depth": shape.depth, "top_k": shape.top_k}, "temperature": args.temperature})
    report = {"synthetic": args.synthetic, "device": str(device), "dtype": str(dtype).removeprefix("torch."), **shape_fields,
              "torch": torch.__version__, "compiled_calls_per_round": calls,
              "eager_ops_per_round": sum(per.values()), "eager_launches_per_round": sum(launches.values()),
              "eager_launches": launches, "eager_views": {k: v for k, v in per.items() if k in VIEWS},
              "round_ms_median": statistics.median(times) * 1e3, "round_ms_runs": [round(t * 1e3, 3) for t in times]}
    print(f"per {'round' if shape is None else 'tree round'}: {calls:g} compiled calls, {report['eager_launches_per_round']:g} "
          f"eager launches ({', '.join(f'{k[6:]} {v:g}' for k, v in launches.items())}), "
          f"{sum(report['eager_views'].values()):g} views; round {report['round_ms_median']:.3f} ms "
          f"(forced acceptance, median of {args.runs})")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
