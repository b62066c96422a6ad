#!/usr/bin/env python3
"""Tokens per target call of tree rounds against chains on a shipped pair (CPU, eager, greedy): every
chain gamma and every tree shape in the grid decode the same held-out prompts with the pair's fuser,
each output checked equal to the target's. Tokens per target call = tokens emitted / target forward
passes, prefill included (the demo's average accepted length); nodes per round and the seconds are
reported beside it (CPU seconds say nothing about a GPU's verify cost).

    OMP_NUM_THREADS=1 python bench/tree_sweep.py --preset tiny --prompts 40
    OMP_NUM_THREADS=1 python bench/tree_sweep.py --preset arith --prompts 100 --prompt_file eval_chains.txt

The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from c2c.engine import SpecConfig, SpeculativeDecoder, standard_generate  # noqa: E402
from c2c.fuser import KVShape, load_fuser  # noqa: E402
from c2c.loading import eos_token_ids, load_model, load_tokenizer  # noqa: E402
from c2c.prompts import encode_prompt, read_prompts  # noqa: E402
from c2c.sampling import SamplingConfig  # noqa: E402
from c2c.tree import TreeShape  # noqa: E402


@torch.inference_mode()
def run(target, draft, fuser, prompts, references, eos, spec: SpecConfig) -> dict:
    decoder = SpeculativeDecoder(target, draft, spec, SamplingConfig(), eos, fuser=fuser)
    tokens = calls = rounds = nodes = 0
    started = time.perf_counter()
    for ids, want in zip(prompts, references):
        result = decoder.generate(ids)
        assert result.output_ids == want, "output differs from the target's"
        c = result.counters
        tokens, calls, rounds, nodes = tokens + len(result.output_ids), calls + c.target_calls, rounds + c.rounds, nodes + c.nodes_verified
    return {"tokens_per_target_call": round(tokens / calls, 4), "rounds": rounds,
            "nodes_per_round": round(nodes / rounds, 2) if nodes else None, "seconds": round(time.perf_counter() - started, 2)}


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
    args = p.parse_args()
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
    rows = []
    for gamma in args.gammas:
        rows.append({"kind": "chain", "gamma": gamma, **run(target, draft, fuser, prompts, references, eos,
                                                             SpecConfig(gamma=gamma, max_new_tokens=args.max_new_tokens))})
        print(json.dumps(rows[-1]), file=sys.stderr)
    for budget, depth, top_k in itertools.product(args.budgets, args.depths, args.topks):
        if budget < depth:
            continue
        spec = SpecConfig(gamma=4, max_new_tokens=args.max_new_tokens, tree=TreeShape(budget, depth, top_k))
        rows.append({"kind": "tree", "budget": budget, "depth": depth, "top_k": top_k,
                     **run(target, draft, fuser, prompts, references, eos, spec)})
        print(json.dumps(rows[-1]), file=sys.stderr)
    best_chain = max((r for r in rows if r["kind"] == "chain"), key=lambda r: r["tokens_per_target_call"])
    best_tree = max((r for r in rows if r["kind"] == "tree"), key=lambda r: r["tokens_per_target_call"])
    print(json.dumps({"preset": args.preset, "prompt_file": name, "prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
                      "torch": torch.__version__, "command": " ".join(sys.argv), "best_chain": best_chain, "best_tree": best_tree,
                      "tree_over_chain": round(best_tree["tokens_per_target_call"] / best_chain["tokens_per_target_call"], 3),
                      "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
