#!/usr/bin/env python3
"""Speculative decoding demo: Qwen3-0.6B drafts, Qwen3-14B verifies, a C2C Fuser feeds the
target's KV cache into the draft.

For each prompt it runs the target alone (standard), then speculative decoding, prints both and
their comparison, and ends with a summary; `--save_results` writes everything to a JSON file.
Run `python qwen3_14b_speculative_demo.py --help` for the flags; see docs/report.md for the metrics.
"""

from __future__ import annotations

import argparse
import locale
import os
import sys
from pathlib import Path

from c2c.app.cli import OneLineParser, apply_threads, default_lang, parse_with_preset, run_main
from c2c.errors import UserInputError
from c2c.app.loading import DEFAULT_FUSER
from c2c.app.presets import PRESETS

HERE = Path(__file__).resolve().parent
DEFAULT_PROMPTS = HERE / "example_prompts.txt"


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(description=" ".join(__doc__.split("\n\n")[0].split()), formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--prompts", default=str(DEFAULT_PROMPTS), help="UTF-8 file, one prompt per line (# lines skipped)")
    p.add_argument("--max_new_tokens", type=int, default=256, help="tokens to generate per prompt (at most)")
    p.add_argument("--gamma", type=int, default=4, help="draft tokens per speculation round (a chain)")
    defaults = runner_defaults()
    p.add_argument("--tree_budget", type=tree_budget, default=defaults.tree_budget,
                   help="tree rounds: the draft proposes a tree of this many nodes (its top --tree_topk children of the "
                   "best nodes, depth by depth) and the target checks them all in one forward; 0: a chain of --gamma "
                   "drafts; auto: the warm-up weighs budgets 4-64 and depths up to --tree_depth on this machine and "
                   "keeps the fastest")
    p.add_argument("--parallel_drafting", action="store_true",
                   help="draft all --gamma tokens of a round in one draft forward (PARD); the draft's config.json names "
                   "its mask id (pard_token, mask_token_id, ...), e.g. amd/PARD-Qwen3-0.6B")
    p.add_argument("--tree_depth", type=int, default=defaults.tree_depth, help="tree rounds: the longest path (draft forwards per round)")
    p.add_argument("--tree_topk", type=int, default=defaults.tree_topk, help="tree rounds: children per expanded node (1: a chain)")
    p.add_argument("--base_model", default="Qwen/Qwen3-0.6B", help="draft model (C2C's base/receiver): Hub id or path")
    p.add_argument("--teacher_model", default="Qwen/Qwen3-14B", help="target model (C2C's teacher/sharer): Hub id or path")
    p.add_argument(
        "--fuser_checkpoint", default=None,
        help=f"fuser folder, name under output/fusers/, or pair on the Hub (nics-efc/C2C_Fuser); 'none' disables "
        f"fusion (default: {DEFAULT_FUSER}, run without fusion with a warning when not found)",
    )
    p.add_argument("--skip_standard", action="store_true", help="skip the target-only run (no comparison)")
    p.add_argument("--no_prefill_fusion", action="store_true", help="do not fuse the prompt's K/V")
    p.add_argument("--no_decode_fusion", action="store_true", help="do not fuse accepted tokens' K/V")
    p.add_argument("--no_fuse_last_prompt", action="store_true",
                   help="decode fusion starts after the prompt, leaving the last prompt position unfused as C2C does")
    p.add_argument("--save_results", action="store_true", help="write <output_dir>/results_YYYYmmdd_HHMMSS.json")
    p.add_argument("--output_dir", default="output/qwen3_speculative", help="where --save_results writes")
    p.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu (a large target on CPU needs explicit cpu)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="auto: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--device_map", default=None, help="accelerate device_map for the target (e.g. auto to split across GPUs)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples (output distribution = target's)")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling threshold (1 = off)")
    p.add_argument("--top_k", type=int, default=0, help="top-k sampling (0 = off)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling generator")
    p.add_argument("--enable_thinking", action="store_true", help="Qwen3 chat template thinking mode (off by default)")
    p.add_argument("--lang", default=None, choices=["zh", "en"],
                   help="report labels; default: your locale's (zh for a Chinese locale, e.g. LANG=zh_CN.UTF-8, else en)")
    p.add_argument("--no_warmup", action="store_true", help="skip the untimed warm-up run")
    p.add_argument("--stream", action="store_true",
                   help="print each run as it goes, speculative tokens marked: accepted drafts, the target's correction or bonus "
                        "(colour on a terminal, [ ] < > { } otherwise); printing is left out of the timings")
    p.add_argument("--no_color", action="store_true", help="--stream: bracket marks even on a terminal")
    p.add_argument("--save_rounds", action="store_true",
                   help="with --save_results: each speculative round (drafted, accepted, token ids) in the JSON")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: one per physical core; on busy shared cores use 1)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="static KV caches + torch.compile'd draft round, verify and fusion (CUDA graphs on GPU); "
                   "compile time is reported apart. Default: on with a CUDA device (eager PyTorch on a GPU is "
                   "launch-bound and can't win), off on CPU; --no-compile (or --no_compile) turns it off")
    p.add_argument("--no_compile", dest="compile", action="store_false", help=argparse.SUPPRESS)
    p.add_argument("--preset", default=None, choices=list(PRESETS),
                   help="tiny (Shakespeare) or arith (addition, the fusion control): shipped offline Qwen3-architecture "
                   "pairs and fusers (CPU, float32); other flags still override")
    return p


def tree_budget(text: str) -> int:
    """--tree_budget: a number of nodes, 0 (chains) or auto."""
    from c2c.app.runner import AUTO

    if text == "auto":
        return AUTO
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"--tree_budget must be >= 0 (0: a chain of --gamma drafts) or auto, got {text!r}")
    return value


def runner_defaults():
    from c2c.app.runner import RunConfig

    return RunConfig()


def run(args: argparse.Namespace, argv: list[str] | None) -> int:
    from tqdm import tqdm

    from c2c.core import metrics

    from c2c.app import runner
    from c2c.app.prompts import read_prompts
    from c2c.app.report import Report
    from c2c.app.results import check_output_dir, command_line, save_json_atomic
    from c2c.app.stream import StreamPrinter, legend, use_colour

    if args.save_rounds and not args.save_results:
        raise UserInputError("--save_rounds adds the rounds to the results JSON: pass --save_results too")

    cfg = runner.RunConfig(
        draft_model=args.base_model,
        target_model=args.teacher_model,
        fuser_checkpoint=args.fuser_checkpoint or DEFAULT_FUSER,
        fuser_explicit=args.fuser_checkpoint is not None,
        gamma=args.gamma,
        max_new_tokens=args.max_new_tokens,
        prefill_fusion=not args.no_prefill_fusion,
        decode_fusion=not args.no_decode_fusion,
        fuse_last_prompt=not args.no_fuse_last_prompt,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        device=args.device,
        dtype=args.dtype,
        device_map=args.device_map,
        enable_thinking=args.enable_thinking,
        compile=runner.choose_compile(args.compile, args.device),
        threads=apply_threads(args.threads),
        tree_budget=args.tree_budget,
        tree_depth=args.tree_depth,
        tree_topk=args.tree_topk,
        parallel_drafting=args.parallel_drafting,
    )
    runner.validate(cfg)
    args.lang = args.lang or default_lang(os.environ, locale.getlocale()[0])
    prompts = read_prompts(args.prompts)
    if args.save_results:  # find out now, not after the run, that results can't be written
        check_output_dir(args.output_dir)
    report = Report(args.lang, write=tqdm.write)
    report.write(report.L["loading"])
    session = runner.prepare(cfg, log=lambda m: print(m, file=sys.stderr))
    for warning in runner.check_context(session, [runner.encode(session, p) for p in prompts], cfg.max_new_tokens, cfg.gamma):
        print(warning, file=sys.stderr)
    if cfg.tree_budget == runner.AUTO and args.no_warmup:
        print("note: --tree_budget auto runs the warm-up anyway (it is where the tree is chosen)", file=sys.stderr)
        args.no_warmup = False
    config = runner.config_record(session, str(args.prompts), command_line(argv))
    report.header(config, len(prompts))
    run_standard = not args.skip_standard
    warmup_seconds = None
    if cfg.compile:
        print("compiling the fast path (static caches, CUDA graphs): the first run on a machine takes minutes for "
              "real-size models, later runs reuse torch's compile cache; the timings below exclude it", file=sys.stderr)
    elif session.device.type == "cuda":
        print("WARNING: eager PyTorch on a GPU (--no-compile): kernel launches bound both models, so the 0.6B draft "
              "step costs about as much as the 14B step and speculation can't be faster than the target alone here; "
              "the numbers below are not the fast path's (drop --no-compile)", file=sys.stderr)
    if not args.no_warmup or cfg.compile:
        report.write(report.L["warmup"])
        warmup_seconds = runner.warmup(session, prompts, run_standard)
        report.write(f"  {warmup_seconds:.1f} s" + (" (compilation included)" if cfg.compile else ""))
        if session.tree_auto is not None:
            config = runner.config_record(session, str(args.prompts), command_line(argv))  # the chosen tree
            t = config["tree"]
            report.write(f"  tree (auto): budget {t['budget']}, depth {t['depth']}, top_k {t['top_k']}")
    printer = None
    if args.stream:
        printer = StreamPrinter(session.tokenizer, sys.stdout, colour=use_colour(sys.stdout, args.no_color), lang=args.lang)
        report.write(legend(printer.colour, args.lang))
    entries = []
    try:
        for i, prompt in enumerate(tqdm(prompts, desc="prompts", unit="prompt", file=sys.stderr, disable=args.stream), 1):
            report.prompt(i, len(prompts), prompt)
            entry = runner.run_prompt(session, prompt, run_standard, printer=printer, save_rounds=args.save_rounds)
            entries.append(entry)
            if entry["standard"]:
                report.standard(entry["standard"])
            report.speculative(entry["speculative"])
            if entry["stopped_at_context"]:
                report.write(report.L["context_stop"].format(tokens=entry["max_new_tokens"]))
            if entry["comparison"]:
                report.comparison(entry["comparison"], sampling=cfg.temperature > 0)
    except KeyboardInterrupt:
        if printer is not None:
            printer.end()
        where = "nothing was saved (--save_results keeps the finished prompts)"
        if args.save_results and entries:
            path = save_json_atomic(results_record(config, session, entries, warmup_seconds, interrupted=True), args.output_dir)
            where = f"the {len(entries)} finished prompt(s) were saved to {path} (marked interrupted)"
        elif args.save_results:
            where = "no prompt had finished: nothing was saved"
        print(f"\ninterrupted (Ctrl-C) after {len(entries)} of {len(prompts)} prompts: {where}", file=sys.stderr)
        return 130
    summary = metrics.summary(entries)
    report.summary(summary, sampling=cfg.temperature > 0)
    if args.save_results:
        path = save_json_atomic(results_record(config, session, entries, warmup_seconds), args.output_dir)
        report.write(f"{report.L['saved']}: {path}")
    return 0


def results_record(config: dict, session, entries: list[dict], warmup_seconds, interrupted: bool = False) -> dict:
    """The results JSON: what ran, where, every finished prompt and their summary."""
    from c2c.core import metrics
    from c2c.app.results import environment

    return {"config": config, "environment": environment(session.device), "prompts": entries,
            "summary": metrics.summary(entries), "warmup_seconds": warmup_seconds, "interrupted": interrupted}


def main(argv: list[str] | None = None) -> int:
    return run_main(lambda: run(parse_with_preset(build_parser(), argv), argv))


if __name__ == "__main__":
    sys.exit(main())
