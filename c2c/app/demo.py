"""The demos' command line and run, shared by `qwen3_14b_speculative_demo.py` (the seed's entry point,
Qwen3 defaults) and `demo_speculative_decoding.py` (any pair: the models are required, fusion only
with a named fuser). Entry-script code like `cli`: the library itself never parses arguments.

For each question of the prompt file (one prompt a line, or Spec-Bench / MT-Bench JSONL with
`turns`), each turn runs the target alone (standard), then speculative decoding, the report prints
both and their comparison, and a summary ends it: over everything and per category."""

from __future__ import annotations

import argparse
import locale
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserInputError
from .cli import OneLineParser, apply_threads, default_lang, parse_with_preset, run_main
from .loading import DEFAULT_FUSER
from .presets import PRESETS

EXAMPLE_PROMPTS = Path(__file__).resolve().parents[2] / "example_prompts.txt"


@dataclass(frozen=True)
class DemoDefaults:
    """What differs between the two demos: their description and defaults."""

    description: str
    draft_model: str | None  # None: --base_model is required
    target_model: str | None  # None: --teacher_model is required
    fuser: str | None  # the fuser looked up when --fuser_checkpoint is not given (None: fusion off)
    output_dir: str
    prompts: str = str(EXAMPLE_PROMPTS)


QWEN3 = DemoDefaults("", "Qwen/Qwen3-0.6B", "Qwen/Qwen3-14B", DEFAULT_FUSER, "output/qwen3_speculative")
GENERIC = DemoDefaults("", None, None, None, "output/speculative")


def build_parser(defaults: DemoDefaults = QWEN3) -> argparse.ArgumentParser:
    p = OneLineParser(description=defaults.description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--prompts", default=defaults.prompts,
                   help="UTF-8 file: one prompt per line (# lines skipped), or JSONL (.jsonl) with turns, category, question_id "
                   "as Spec-Bench and MT-Bench question files")
    p.add_argument("--max_new_tokens", type=int, default=256, help="tokens to generate per prompt (at most)")
    p.add_argument("--gamma", type=int, default=4, help="draft tokens per speculation round (a chain)")
    run_defaults = runner_defaults()
    p.add_argument("--tree_budget", type=tree_budget, default=run_defaults.tree_budget,
                   help="tree rounds: the draft proposes a tree of this many nodes (its top --tree_topk children of the "
                   "best nodes, depth by depth) and the target checks them all in one forward; 0: a chain of --gamma "
                   "drafts; auto: the warm-up weighs budgets 4-64 and depths up to --tree_depth on this machine and "
                   "keeps the fastest")
    p.add_argument("--parallel_drafting", action="store_true",
                   help="draft all --gamma tokens of a round in one draft forward (PARD); the draft's config.json names "
                   "its mask id (pard_token, mask_token_id, ...), e.g. amd/PARD-Qwen3-0.6B, or the fuser's adapter was "
                   "trained with --parallel_drafts")
    p.add_argument("--tree_depth", type=int, default=run_defaults.tree_depth, help="tree rounds: the longest path (draft forwards per round)")
    p.add_argument("--tree_topk", type=int, default=run_defaults.tree_topk, help="tree rounds: children per expanded node (1: a chain)")
    required = " (required)" if defaults.draft_model is None else ""
    p.add_argument("--base_model", default=defaults.draft_model, help=f"draft model (C2C's base/receiver): Hub id or path{required}")
    p.add_argument("--teacher_model", default=defaults.target_model,
                   help=f"target model (C2C's teacher/sharer): Hub id or path{required}")
    fallback = (f"default: {defaults.fuser}, run without fusion with a warning when not found" if defaults.fuser
                else "default: none, fusion off")
    p.add_argument(
        "--fuser_checkpoint", default=None,
        help=f"fuser folder, name under output/fusers/, or pair on the Hub (nics-efc/C2C_Fuser); 'none' disables "
        f"fusion ({fallback})",
    )
    p.add_argument("--skip_standard", action="store_true", help="skip the target-only run (no comparison)")
    p.add_argument("--no_prefill_fusion", action="store_true", help="do not fuse the prompt's K/V")
    p.add_argument("--no_decode_fusion", action="store_true", help="do not fuse accepted tokens' K/V")
    p.add_argument("--no_fuse_last_prompt", action="store_true",
                   help="decode fusion starts after the prompt, leaving the last prompt position unfused as C2C does")
    p.add_argument("--save_results", action="store_true", help="write <output_dir>/results_YYYYmmdd_HHMMSS.json")
    p.add_argument("--output_dir", default=defaults.output_dir, help="where --save_results writes")
    p.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu (a large target on CPU needs explicit cpu)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="auto: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--device_map", default=None, help="accelerate device_map for the target (e.g. auto to split across GPUs)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples (output distribution = target's)")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling threshold (1 = off)")
    p.add_argument("--top_k", type=int, default=0, help="top-k sampling (0 = off)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling generator")
    p.add_argument("--enable_thinking", action="store_true", help="the chat template's thinking switch (Qwen3's; off by default)")
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
    p.set_defaults(demo_defaults=defaults)
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
    from c2c.app.prompts import read_questions
    from c2c.app.report import Report
    from c2c.app.results import check_output_dir, command_line, save_json_atomic
    from c2c.app.stream import StreamPrinter, legend, use_colour

    if args.save_rounds and not args.save_results:
        raise UserInputError("--save_rounds adds the rounds to the results JSON: pass --save_results too")

    defaults = args.demo_defaults
    missing = [f"--{name}" for name in ("base_model", "teacher_model") if not getattr(args, name)]
    if missing:
        raise UserInputError(f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} required: the draft and the "
                             "target, Hub ids or local folders sharing one tokenizer (e.g. --base_model "
                             "Qwen/Qwen2.5-0.5B-Instruct --teacher_model Qwen/Qwen2.5-7B-Instruct), or --preset tiny")
    cfg = runner.RunConfig(
        draft_model=args.base_model,
        target_model=args.teacher_model,
        fuser_checkpoint=args.fuser_checkpoint or defaults.fuser or "none",
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
    questions = read_questions(args.prompts)
    prompts = [q.turns[0] for q in questions]  # what is known before the run: each question's first turn
    turns = sum(len(q.turns) for q in questions)
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
    report.header(config, turns)
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
        bar = tqdm(total=turns, desc="prompts", unit="prompt", file=sys.stderr, disable=args.stream)
        for question, turn, messages in runner.conversation_turns(questions, entries):
            prompt = messages[-1]["content"] + (f"  [turn {turn}/{len(question.turns)}]" if len(question.turns) > 1 else "")
            report.prompt(len(entries) + 1, turns, prompt)
            entry = runner.run_prompt(session, messages, run_standard, printer=printer, save_rounds=args.save_rounds)
            entries.append(runner.label_entry(entry, question, turn))
            bar.update()
            if entry["standard"]:
                report.standard(entry["standard"])
            report.speculative(entry["speculative"])
            if entry["stopped_at_context"]:
                report.write(report.L["context_stop"].format(tokens=entry["max_new_tokens"]))
            if entry["comparison"]:
                report.comparison(entry["comparison"], sampling=cfg.temperature > 0)
        bar.close()
    except KeyboardInterrupt:
        if printer is not None:
            printer.end()
        where = "nothing was saved (--save_results keeps the finished prompts)"
        if args.save_results and entries:
            path = save_json_atomic(results_record(config, session, entries, warmup_seconds, interrupted=True), args.output_dir)
            where = f"the {len(entries)} finished prompt(s) were saved to {path} (marked interrupted)"
        elif args.save_results:
            where = "no prompt had finished: nothing was saved"
        print(f"\ninterrupted (Ctrl-C) after {len(entries)} of {turns} prompts: {where}", file=sys.stderr)
        return 130
    summary = metrics.summary(entries)
    report.summary(summary, sampling=cfg.temperature > 0)
    by_category = metrics.by_category(entries)
    if by_category:
        report.write(f"{report.L['by_category']}\n{metrics.category_table(by_category)}")
    if args.save_results:
        path = save_json_atomic(results_record(config, session, entries, warmup_seconds), args.output_dir)
        report.write(f"{report.L['saved']}: {path}")
    return 0


def results_record(config: dict, session, entries: list[dict], warmup_seconds, interrupted: bool = False) -> dict:
    """The results JSON: what ran, where, every finished prompt and their summary."""
    from c2c.core import metrics
    from c2c.app.results import environment

    return {"config": config, "environment": environment(session.device), "prompts": entries,
            "summary": metrics.summary(entries), "summary_by_category": metrics.by_category(entries),
            "warmup_seconds": warmup_seconds, "interrupted": interrupted}


def main(defaults: DemoDefaults, argv: list[str] | None = None) -> int:
    return run_main(lambda: run(parse_with_preset(build_parser(defaults), argv), argv))
