#!/usr/bin/env python3
"""Tokens per target call of tree rounds against chains on a shipped pair (CPU, greedy; uncompiled, or
the fast path with --compile): every
chain gamma and every tree shape in the grid decode the same held-out prompts with the pair's fuser,
each output checked equal to the target's. Tokens per target call = tokens emitted / target forward
passes, prefill included (the demo's average accepted length); nodes per round and the seconds are
reported beside it (CPU seconds say nothing about a GPU's verify cost).

With --timed R (and --compile for the fast path), every row is then timed R more times, the rows
taking turns in a rotating order so that a busy moment of a shared machine falls on all of them: the
median seconds and tokens/s per row, and how often the fastest tree beat the fastest chain
(paired by turn).

    OMP_NUM_THREADS=1 python bench/tree_sweep.py --preset tiny --prompts 40
    OMP_NUM_THREADS=1 python bench/tree_sweep.py --preset arith --prompts 100 --prompt_file eval_chains.txt
    OMP_NUM_THREADS=1 python bench/tree_sweep.py --preset tiny --prompts 40 --compile --timed 7 \
        --gammas 2 3 4 --trees 2,1,2 3,1,3 3,2,2 6,3,2 8,2,4 16,4,4

The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from c2c.core.engine import CompiledSteps, SpecConfig, SpeculativeDecoder, standard_generate  # noqa: E402
from c2c.core.fuser import KVShape, load_fuser  # noqa: E402
from c2c.app.loading import eos_token_ids, load_model, load_tokenizer  # noqa: E402
from c2c.app.prompts import encode_prompt, read_prompts  # noqa: E402
from c2c.core.sampling import SamplingConfig  # noqa: E402
from c2c.core.tree import TreeShape, grown_nodes  # noqa: E402


@torch.inference_mode()
def run(target, draft, fuser, prompts, references, eos, spec: SpecConfig, compiled=None) -> dict:
    decoder = SpeculativeDecoder(target, draft, spec, SamplingConfig(), eos, fuser=fuser, compiled=compiled)
    tokens = calls = rounds = nodes = 0
    started = time.perf_counter()
    for ids, want in zip(prompts, references):
        result = decoder.generate(ids)
        assert result.output_ids == want, "output differs from the target's"
        c = result.counters
        tokens, calls, rounds, nodes = tokens + len(result.output_ids), calls + c.target_calls, rounds + c.rounds, nodes + c.nodes_verified
    return {"tokens": tokens, "tokens_per_target_call": round(tokens / calls, 4), "rounds": rounds,
            "nodes_per_round": round(nodes / rounds, 2) if nodes else None, "seconds": round(time.perf_counter() - started, 4)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=("tiny", "arith"), required=True)
    p.add_argument("--prompt_file", default=None, help="in the preset's folder (default: tiny eval_prompts.txt, arith eval_chains.txt)")
    p.add_argument("--prompts", type=int, default=40)
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--gammas", type=int, nargs="+", default=[2, 3, 4, 5, 6, 7, 8])
    p.add_argument("--budgets", type=int, nargs="+", default=[8, 16, 32])
    p.add_argument("--depths", type=int, nargs="+", default=[4, 5, 6, 7])
    p.add_argument("--topks", type=int, nargs="+", default=[2, 3, 4])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--trees", nargs="+", default=None, metavar="B,D,K", help="these tree shapes instead of the grid")
    p.add_argument("--compile", action="store_true", help="the fast path: static caches and compiled rounds")
    p.add_argument("--timed", type=int, default=0, help="time every row this many more times, rows taking turns")
    args = p.parse_args()
    compiled = CompiledSteps() if args.compile else None
    torch.set_num_threads(args.threads)
    preset, cpu = ROOT / "presets" / args.preset, torch.device("cpu")
    target = load_model(str(preset / "target"), "target", torch.float32, cpu)
    draft = load_model(str(preset / "draft"), "draft", torch.float32, cpu)
    tokenizer = load_tokenizer(str(preset / "target"))
    fuser = load_fuser(preset / "fuser", KVShape.of(draft.config), KVShape.of(target.config), device=cpu, dtype=torch.float32)
    eos = eos_token_ids(target, tokenizer)
    name = args.prompt_file or ("eval_prompts.txt" if args.preset == "tiny" else "eval_chains.txt")
    prompts = [encode_prompt(tokenizer, t) for t in read_prompts(preset / name)[: args.prompts]]
    with torch.inference_mode():
        references = [standard_generate(target, ids, args.max_new_tokens, SamplingConfig(), eos).output_ids for ids in prompts]
    rows, specs = [], []
    for gamma in args.gammas:
        specs.append(SpecConfig(gamma=gamma, max_new_tokens=args.max_new_tokens))
        rows.append({"kind": "chain", "gamma": gamma, **run(target, draft, fuser, prompts, references, eos, specs[-1], compiled)})
        print(json.dumps(rows[-1]), file=sys.stderr)
    shapes = ([tuple(int(x) for x in t.split(",")) for t in args.trees] if args.trees
              else itertools.product(args.budgets, args.depths, args.topks))
    for budget, depth, top_k in shapes:
        if budget < depth or budget > grown_nodes(depth, top_k):
            print(f"skipped {budget},{depth},{top_k}: a budget below the depth, or more nodes than a tree of that "
                  f"depth and top_k grows ({grown_nodes(depth, top_k)})", file=sys.stderr)
            continue
        specs.append(SpecConfig(gamma=4, max_new_tokens=args.max_new_tokens, tree=TreeShape(budget, depth, top_k)))
        rows.append({"kind": "tree", "budget": budget, "depth": depth, "top_k": top_k,
                     **run(target, draft, fuser, prompts, references, eos, specs[-1], compiled)})
        print(json.dumps(rows[-1]), file=sys.stderr)
    if not any(r["kind"] == "tree" for r in rows) or not any(r["kind"] == "chain" for r in rows):
        raise SystemExit("error: nothing to compare: give at least one gamma and one tree shape that fits")
    best_chain = max((r for r in rows if r["kind"] == "chain"), key=lambda r: r["tokens_per_target_call"])
    best_tree = max((r for r in rows if r["kind"] == "tree"), key=lambda r: r["tokens_per_target_call"])
    out = {"preset": args.preset, "prompt_file": name, "prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
           "torch": torch.__version__, "compile": args.compile, "command": " ".join(sys.argv), "best_chain": best_chain,
           "best_tree": best_tree, "tree_over_chain": round(best_tree["tokens_per_target_call"] / best_chain["tokens_per_target_call"], 3),
           "rows": rows}
    if args.timed:
        out["timed"] = timed(rows, specs, args.timed, lambda spec: run(target, draft, fuser, prompts, references, eos, spec, compiled))
    print(json.dumps(out))
    return 0


def timed(rows: list[dict], specs: list[SpecConfig], turns: int, once) -> dict:
    """Every row `turns` more times, the rows taking turns (a rotating start), seconds per turn; the
    median tokens/s per row, and the fastest tree (by median) against the fastest chain, paired by turn."""
    seconds = [[] for _ in rows]
    for turn in range(turns):
        for k in range(len(rows)):
            i = (turn + k) % len(rows)
            seconds[i].append(once(specs[i])["seconds"])
    for row, secs in zip(rows, seconds):
        row["seconds_median"] = statistics.median(secs)
        row["tokens_per_second"] = round(row["tokens"] / row["seconds_median"], 1)
        row["seconds_turns"] = secs
    chain = min((r for r in rows if r["kind"] == "chain"), key=lambda r: r["seconds_median"])
    tree = min((r for r in rows if r["kind"] == "tree"), key=lambda r: r["seconds_median"])
    won = sum(t < c for t, c in zip(tree["seconds_turns"], chain["seconds_turns"]))
    summary = {"turns": turns, "fastest_chain": chain, "fastest_tree": tree, "tree_over_chain_speed": chain["seconds_median"] / tree["seconds_median"],
               "tree_faster_turns": won, "chain_faster_turns": turns - won}
    print(f"fastest chain: gamma {chain['gamma']} {chain['seconds_median']:.3f} s; fastest tree: {tree['budget']}/{tree['depth']}/"
          f"{tree['top_k']} {tree['seconds_median']:.3f} s ({summary['tree_over_chain_speed']:.3f}x; tree faster in {won} of "
          f"{turns} turns)", file=sys.stderr)
    return summary


if __name__ == "__main__":
    sys.exit(main())
