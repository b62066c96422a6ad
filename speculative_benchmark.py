#!/usr/bin/env python3
"""Benchmark: our speculative decoding (with and without C2C fusion) beside the target alone and
Hugging Face `generate` / assisted generation, over a gamma sweep, in one process.

Writes `<output_dir>/benchmark_YYYYmmdd_HHMMSS.json`, a markdown table and PNG plots; the last
stdout line is one compact JSON object. Greedy decoding only (outputs are checked against the target).

    python speculative_benchmark.py --preset tiny
    python speculative_benchmark.py --gammas 2 4 6 --modes target hf_assisted speculative --repeats 3
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from c2c.app.benchmark import ALL_MODES, GAMMA_FREE
from c2c.app.cli import OneLineParser, apply_threads, parse_with_preset, run_main
from c2c.errors import UserInputError
from c2c.app.loading import DEFAULT_FUSER
from c2c.app.presets import PRESETS

HERE = Path(__file__).resolve().parent


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default=None, choices=list(PRESETS), help="a shipped offline pair and fuser (tiny, arith)")
    p.add_argument("--prompts", default=str(HERE / "example_prompts.txt"),
                   help="one prompt a line, or Spec-Bench / MT-Bench JSONL (turns, category, question_id): every turn "
                   "is a timed prompt (later turns after the target's own answers) and the table adds a per-category view")
    p.add_argument("--base_model", default="Qwen/Qwen3-0.6B", help="draft")
    p.add_argument("--teacher_model", default="Qwen/Qwen3-14B", help="target")
    p.add_argument("--fuser_checkpoint", default=None, help=f"as in the demo (default {DEFAULT_FUSER}); fused modes need one")
    p.add_argument("--gammas", type=int, nargs="+", default=[2, 4, 6, 8])
    p.add_argument("--parallel_drafting", action="store_true",
                   help="each speculative mode also runs parallel-drafting rows (all gamma drafts from one draft forward; "
                   "the draft's config.json names its mask id, as PARD drafts' do)")
    p.add_argument("--trees", nargs="*", default=[], metavar="BUDGET,DEPTH,TOPK",
                   help="tree shapes each speculative mode also runs (e.g. 32,4,4 16,5,3)")
    p.add_argument("--modes", nargs="+", default=list(ALL_MODES), choices=list(ALL_MODES))
    p.add_argument("--repeats", type=int, default=3, help="timed repeats; medians are reported")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per mode and gamma")
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--num_prompts", type=int, default=None, help="use only the first N prompts (questions, with all their turns)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    p.add_argument("--output_dir", default="output/benchmark")
    p.add_argument("--no_plots", action="store_true")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: one per physical core; on busy shared cores use 1)")
    p.add_argument("--no_fuse_last_prompt", action="store_true", help="fused modes leave the last prompt position unfused (as C2C)")
    p.add_argument("--save_rounds", action="store_true",
                   help="the speculative rows of the JSON get each round (drafted, accepted, token ids) per prompt of the last repeat")
    p.add_argument("--compile", action="store_true", help="our modes use static caches and compiled steps (CUDA graphs on GPU)")
    p.add_argument("--synthetic", default=None, choices=["qwen3", "tiny"],
                   help="time the parts on random-init real-shape models (no download); see c2c/tools/synthetic.py")
    p.add_argument("--context", type=int, default=128, help="--synthetic: cached positions before the timed steps")
    p.add_argument("--iters", type=int, default=20, help="--synthetic: timed iterations per step (median)")
    return p


def run_synthetic(args, argv) -> int:
    from c2c.tools import synthetic
    from c2c.app.loading import resolve_device, resolve_dtype
    from c2c.app.results import check_output_dir, command_line, environment, save_json_atomic

    check_output_dir(args.output_dir)  # before the timing, not after it
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if args.synthetic == "qwen3" and device.type != "cuda" and args.device != "cpu":
        raise UserInputError("--synthetic qwen3 builds a 14B model: it needs a GPU (or an explicit --device cpu)")
    timings = synthetic.run(args.synthetic, device, dtype, args.gammas, context=args.context, iters=args.iters,
                            compile_steps=args.compile, new_tokens=args.max_new_tokens, log=lambda m: print(m, file=sys.stderr))
    results = {"config": {"command": command_line(argv), "synthetic": args.synthetic, "gammas": args.gammas,
                          "compile": args.compile}, "environment": environment(device), "timings": timings}
    path = save_json_atomic(results, args.output_dir, prefix="synthetic")
    print(f"results: {path}", file=sys.stderr)
    pred = timings["prediction"]
    summary = {"steps_ms": {k: round(v["ms"], 4) for k, v in timings["steps"].items()},
               "predicted_vs_hf_generate": {a: round(pred[a]["best_vs_hf_generate"], 3) for a in ("0.6", "0.7", "0.8")},
               "best_gamma": {a: pred[a]["best_gamma"] for a in ("0.6", "0.7", "0.8")}, "output_dir": args.output_dir}
    for gamma in args.gammas:  # from the engine's measured round: what the goals are stated in
        row = {a: pred[a]["per_gamma"][gamma] for a in ("0.6", "0.7", "0.8")}
        if "round_ms_measured" in row["0.7"]:
            print(f"gamma {gamma}: round {row['0.7']['round_ms_measured']:.2f} ms = {row['0.7']['round_in_target_steps']:.2f} "
                  "target steps; predicted vs target-only at alpha 0.6/0.7/0.8: with fusion "
                  + "/".join(f"{row[a]['vs_target_only_measured_round']:.2f}x" for a in row) + ", without "
                  + "/".join(f"{row[a]['vs_target_only_measured_round_no_fusion']:.2f}x" for a in row), file=sys.stderr)
    print(json.dumps(summary, separators=(",", ":")))
    return 0


def run(args, argv) -> int:
    from tqdm import tqdm

    if args.synthetic:
        return run_synthetic(args, argv)

    from c2c.app import benchmark, runner
    from c2c.app.prompts import read_questions
    from c2c.app.results import check_output_dir, command_line, environment, timestamp

    if min(args.gammas) < 1 or args.repeats < 1 or args.max_new_tokens < 1 or args.warmup < 0:
        raise UserInputError("--gammas and --max_new_tokens must be >= 1, --repeats >= 1, --warmup >= 0")
    if args.num_prompts is not None and args.num_prompts < 1:
        raise UserInputError(f"--num_prompts must be >= 1 (or left out for all prompts), got {args.num_prompts}")
    trees = [parse_tree(text) for text in args.trees]
    check_output_dir(args.output_dir)  # before the sweep, not after it
    if args.compile and args.warmup == 0:
        print("warning: --compile with --warmup 0: the timed runs include compilation and CUDA graph recording, "
              "so their tokens/s are not the fast path's; use --warmup 1 or more", file=sys.stderr)
    questions = read_questions(args.prompts)[: args.num_prompts]
    gammas, requested = list(dict.fromkeys(args.gammas)), list(dict.fromkeys(args.modes))
    if len(gammas) < len(args.gammas) or len(requested) < len(args.modes):
        print(f"warning: repeated --gammas or --modes run once each: gammas {' '.join(map(str, gammas))}, "
              f"modes {' '.join(requested)}", file=sys.stderr)
    cfg = runner.RunConfig(
        draft_model=args.base_model, target_model=args.teacher_model,
        fuser_checkpoint=args.fuser_checkpoint or DEFAULT_FUSER, fuser_explicit=args.fuser_checkpoint is not None,
        gamma=gammas[0], max_new_tokens=args.max_new_tokens, device=args.device, dtype=args.dtype,
        compile=args.compile, fuse_last_prompt=not args.no_fuse_last_prompt, threads=apply_threads(args.threads),
        parallel_drafting=args.parallel_drafting,
    )
    session = runner.prepare(cfg, log=lambda m: print(m, file=sys.stderr))
    if session.device.type == "cuda" and not args.compile:
        print("warning: eager PyTorch on a GPU is launch-bound (the 0.6B draft step costs about as much as the 14B "
              "step), so our eager rows are not the fast path's speed: add --compile", file=sys.stderr)
    room_gamma = max(gammas + [t.depth for t in trees])
    ids = benchmark.turn_prompts(session, questions, args.max_new_tokens, room_gamma)  # later turns: after the target's answers
    categories = [q.category for q in questions for _ in q.turns]
    for warning in runner.check_context(session, ids, args.max_new_tokens, room_gamma):
        print(warning, file=sys.stderr)
    modes, skipped = benchmark.available_modes(requested, session.fuser is not None)
    for mode, why in skipped.items():
        print(f"warning: mode {mode} skipped: {why}", file=sys.stderr)
    if not modes:
        raise UserInputError("no mode left to run (" + "; ".join(f"{m}: {w}" for m, w in skipped.items()) + ")")
    plan = [(m, g, None, False) for m in modes for g in ([gammas[0]] if m in GAMMA_FREE else gammas)]
    plan += [(m, g, None, True) for m in modes if args.parallel_drafting and m.startswith("speculative") for g in gammas]
    plan += [(m, gammas[0], t, False) for m in modes if m.startswith("speculative") for t in trees]
    if trees and not any(m.startswith("speculative") for m in modes):
        print("warning: --trees runs with the speculative modes only, and none of them runs here", file=sys.stderr)
    plan.sort(key=lambda item: item[0] != "target")  # the target first: its step time feeds the predictions
    bar = tqdm(total=len(plan) * len(ids) * args.repeats, desc="benchmark", unit="run", file=sys.stderr)
    rows, target_step = [], None
    for mode, gamma, tree, parallel in plan:
        bar.set_postfix(mode=mode, gamma=f"tree {tree.budget}/{tree.depth}/{tree.top_k}" if tree else
                        f"parallel {gamma}" if parallel else gamma)
        rows.append(benchmark.measure(session, mode, ids, gamma, args.max_new_tokens, args.repeats, args.warmup, bar.update,
                                      target_step=target_step, save_rounds=args.save_rounds,
                                      room_gamma=room_gamma, tree=tree, parallel=parallel, categories=categories))
        target_step = rows[-1].get("target_step_time", target_step)
    bar.close()
    benchmark.compare_to_target(rows)
    table = benchmark.markdown_table(rows)
    by_category = benchmark.category_table(rows)
    if by_category:  # Spec-Bench's view: speedup (accepted length) per category
        table += "\n\nPer category: speedup over the target alone (accepted length)\n\n" + by_category
    print(table)
    stamp = timestamp()
    out = Path(args.output_dir)
    config = runner.config_record(session, args.prompts, command_line(argv))
    config.pop("gamma", None)  # a sweep: `gammas` says which
    results = {
        "config": config | {
            "gammas": gammas, "modes": modes, "skipped_modes": skipped, "repeats": args.repeats,
            "warmup": args.warmup, "num_prompts": len(ids), "num_questions": len(questions),
            "hf_assisted_settings": {m: benchmark.hf_assistant_settings(m, "gamma") for m in ("hf_assisted", "hf_assisted_default")},
        },
        "environment": environment(session.device),
        "rows": rows,
        "table": table,
    }
    path = write_outputs(results, rows, table, out, stamp, plots=not args.no_plots)
    plots = f"; plots: {Path(results['plots'][0]).parent} ({len(results['plots'])} PNG)" if results["plots"] else ""
    print(f"results: {path}; table: {path.with_suffix('.md')}{plots}", file=sys.stderr)
    keys = ("mode", "gamma", "tree", "parallel", "tokens_per_second", "latency", "average_accepted_length", "acceptance_rate", "outputs_match_target")
    print(json.dumps({"results": [{k: r.get(k) for k in keys} for r in rows], "output_dir": str(out)}, separators=(",", ":")))
    return 0


def parse_tree(text: str):
    """'32,4,4' -> TreeShape(budget 32, depth 4, top_k 4), or one error line naming the fix."""
    from c2c.core.tree import TreeShape

    try:
        budget, depth, top_k = (int(x) for x in text.split(","))
    except ValueError:
        raise UserInputError(f"--trees takes BUDGET,DEPTH,TOPK shapes such as 32,4,4, got {text!r}") from None
    try:
        return TreeShape(budget, depth, top_k)
    except UserInputError as e:  # its message names the demo's flags: say it in --trees' terms
        raise UserInputError(f"--trees {text}: {str(e).replace('--tree_budget', 'BUDGET').replace('--tree_depth', 'DEPTH').replace('--tree_topk', 'TOPK')}") from None


def write_outputs(results: dict, rows: list[dict], table: str, out: Path, stamp: str, plots: bool) -> Path:
    """The plots, the JSON and the markdown table of one run, all named with `stamp`. If any write
    fails (a full disk), everything this run wrote is removed and the error says nothing was saved."""
    from c2c.app.plots import plot_all
    from c2c.app.results import save_json_atomic, write_failed

    plot_dir, written = out / f"plots_{stamp}", []
    try:
        results["plots"] = [str(p) for p in (plot_all(rows, plot_dir) if plots else [])]
        path = save_json_atomic(results, out, prefix="benchmark", stamp=stamp)
        written.append(path)
        written.append(path.with_suffix(".md"))
        path.with_suffix(".md").write_text(table + "\n", encoding="utf-8")
        return path
    except (OSError, UserInputError) as e:
        for item in written:
            item.unlink(missing_ok=True)
        if plot_dir.is_dir():
            for leftover in plot_dir.iterdir():
                leftover.unlink(missing_ok=True)
            plot_dir.rmdir()
        if isinstance(e, UserInputError):
            raise
        raise write_failed(out, e) from None


def main(argv: list[str] | None = None) -> int:
    return run_main(lambda: run(parse_with_preset(build_parser(), argv, exclude=("max_new_tokens",)), argv))


if __name__ == "__main__":
    sys.exit(main())
