"""Side-by-side benchmark of generation modes on the same prompts, max_new_tokens and gamma.

Modes:
  target               our target-only loop (the reference for outputs and speedups)
  hf_generate          transformers `generate`, greedy
  hf_assisted          `generate(assistant_model=draft)`, num_assistant_tokens=gamma, constant schedule,
                       no confidence cut-off (the same gamma as ours)
  hf_assisted_default  `generate(assistant_model=draft)` with transformers' own assistant defaults
  speculative          ours, no fusion
  speculative_fused    ours, prefill and decode fusion (needs a fuser)
  speculative_prefill, speculative_decode   one fusion kind only (needs a fuser)
With `--trees`, each speculative mode also runs tree rounds of each shape (rows with `tree`, gamma null).

Every run starts with fresh caches. Greedy only: outputs are compared with the target's ids.
This module measures; `speculative_benchmark.py` parses flags and writes files.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from statistics import median

import torch

from ..core import metrics
from . import runner
from ..core.engine import HOOK_PHASE, Counters, GenerationResult, SpecConfig, sync_device
from .runner import Session
from ..core.tree import TreeShape

GAMMA_FREE = ("target", "hf_generate", "hf_assisted_default")
FUSED = {"speculative_fused": (True, True), "speculative_prefill": (True, False), "speculative_decode": (False, True)}
ALL_MODES = ("target", "hf_generate", "hf_assisted", "hf_assisted_default", "speculative", *FUSED)


@dataclass
class Run:
    output_ids: list[int]
    latency: float
    ttft: float | None
    counters: object | None = None


def _hf(session: Session, ids: list[int], max_new_tokens: int, assistant: dict | None) -> Run:
    """transformers generate, greedy; `assistant` holds the draft's assistant settings or None."""
    target, draft = session.target, session.draft
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
                  eos_token_id=sorted(session.eos_ids), pad_token_id=sorted(session.eos_ids)[0])
    if assistant is not None:
        for key, value in assistant.items():  # HF reads these from the assistant's generation_config, persistently
            setattr(draft.generation_config, key, value)
        kwargs["assistant_model"] = draft
    x = torch.tensor([ids], device=session.device)
    sync_device(session.device)
    t0 = time.perf_counter()
    out = target.generate(x, attention_mask=torch.ones_like(x), **kwargs)
    sync_device(session.device)
    return Run(out[0, len(ids):].tolist(), time.perf_counter() - t0, None)


def hf_assistant_settings(mode: str, gamma: int) -> dict | None:
    if mode == "hf_assisted":
        return {"num_assistant_tokens": gamma, "num_assistant_tokens_schedule": "constant", "assistant_confidence_threshold": 0.0}
    if mode == "hf_assisted_default":
        from transformers import GenerationConfig

        defaults = GenerationConfig()._get_default_generation_params()
        return {k: defaults[k] for k in ("num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold")}
    return None


def mode_spec(session: Session, mode: str, gamma: int, max_new_tokens: int, tree: TreeShape | None = None,
              parallel: bool = False) -> SpecConfig:
    """A speculative mode's settings; `speculative` is the fused modes' decoder with both fusion kinds off;
    `tree`: tree rounds of that shape instead of a chain of gamma; `parallel`: the gamma drafts from one
    draft forward (parallel drafting)."""
    prefill, decode = FUSED.get(mode, (False, False))
    return SpecConfig(gamma, max_new_tokens, prefill, decode, session.config.fuse_last_prompt, tree, parallel)


def run_once(session: Session, mode: str, ids: list[int], gamma: int, max_new_tokens: int, on_round=None,
             tree: TreeShape | None = None, parallel: bool = False) -> Run:
    """One fresh run of `mode`."""
    with torch.inference_mode():
        if mode == "target":
            r: GenerationResult = runner.standard(session, ids, max_new_tokens)
        elif mode in ("hf_generate", "hf_assisted", "hf_assisted_default"):
            return _hf(session, ids, max_new_tokens, hf_assistant_settings(mode, gamma))
        else:
            spec = mode_spec(session, mode, gamma, max_new_tokens, tree, parallel)
            r = runner.decoder(session, spec, on_round=on_round).generate(ids)
        return Run(r.output_ids, r.latency, r.time_to_first_token, r.counters)


def available_modes(requested: list[str], has_fuser: bool) -> tuple[list[str], dict[str, str]]:
    """The modes that can run, and why the others are skipped."""
    skipped = {m: "no fuser (pass --fuser_checkpoint)" for m in requested if m in FUSED and not has_fuser}
    return [m for m in requested if m not in skipped], skipped


def warm_up(session: Session, mode: str, prompts: list[list[int]], gamma: int, max_new_tokens: int, room_gamma: int,
            tree: TreeShape | None = None, parallel: bool = False) -> None:
    """Untimed: a short run of the first prompt (a full-size round at least). Compiling: full-length
    runs of the first prompt of each static cache size, plus a forced-accept run that meets every
    compiled shape, so that the timed runs compile and record nothing. Lengths stop at the context
    as the timed runs' do (runner.context_room at `room_gamma`)."""
    lookahead = mode_spec(session, mode, gamma, max_new_tokens, tree, parallel).lookahead
    for ids, length in runner.warm_runs(session, prompts, max_new_tokens, gamma, 16, room_gamma, lookahead):
        run_once(session, mode, ids, gamma, length, tree=tree, parallel=parallel)
        if mode.startswith("speculative"):
            with torch.inference_mode():
                runner.warm_compiled(session, ids, mode_spec(session, mode, gamma, length, tree, parallel))


def turn_prompts(session: Session, questions: list, max_new_tokens: int, room_gamma: int, log=None) -> list[list[int]]:
    """Every turn of every question as prompt ids, the same for every mode: a later turn follows the
    earlier turns and the target's own greedy answers to them (untimed runs of the target alone; every
    greedy mode's answer is the target's, which the rows' outputs_match_target checks)."""
    from .prompts import conversation

    ids = []
    for question in questions:
        answers: list[str] = []
        for turn in range(1, len(question.turns) + 1):
            ids.append(runner.encode(session, conversation(list(question.turns[:turn]), answers)))
            if turn < len(question.turns):
                with torch.inference_mode():
                    out = runner.standard(session, ids[-1], runner.context_room(session, len(ids[-1]), max_new_tokens, room_gamma))
                answers.append(session.tokenizer.decode(out.output_ids, skip_special_tokens=True))
    return ids


def measure(session: Session, mode: str, prompts: list[list[int]], gamma: int, max_new_tokens: int,
            repeats: int, warmup: int, tick=lambda: None, target_step: float | None = None,
            save_rounds: bool = False, room_gamma: int | None = None, tree: TreeShape | None = None,
            parallel: bool = False, categories: list[str | None] | None = None) -> dict:
    """Median over repeats of each repeat's totals over all prompts; statistics from the last repeat
    (the first may still include lazy initialisation or compilation the warm-up did not reach).
    `target_step`: the target mode's seconds per token, for the speculative modes' prediction.
    `save_rounds`: the speculative modes' rows get `round_records`, per prompt of the last repeat, each
    round's record (RoundInfo.record: drafted, accepted, committed and drafted token ids).
    A prompt whose output would reach the models' context stops there (runner.context_room at
    `room_gamma`, default gamma: pass the run's largest gamma so every row stops at the same length);
    the row counts those prompts (`context_capped_prompts`). `categories` (one per prompt, Spec-Bench's
    task families): the row gets `by_category`, the same figures over each category's prompts."""
    room_gamma = gamma if room_gamma is None else room_gamma
    lengths = [runner.context_room(session, len(ids), max_new_tokens, room_gamma) for ids in prompts]
    for _ in range(warmup):
        warm_up(session, mode, prompts, gamma, max_new_tokens, room_gamma, tree, parallel)
    repeat_totals, ttfts, rounds, per_prompt = [], [], [], []
    recording = save_rounds and mode.startswith("speculative")
    for repeat in range(repeats):
        latency, tokens, runs_last = 0.0, 0, []
        for ids, length in zip(prompts, lengths):
            hook = None
            if recording and repeat == repeats - 1:
                rounds.append([])
                hook = lambda info, into=rounds[-1]: into.append(info.record())  # noqa: E731
            run = run_once(session, mode, ids, gamma, length, on_round=hook, tree=tree, parallel=parallel)
            latency += run.latency
            tokens += len(run.output_ids)
            if run.ttft is not None:
                ttfts.append(run.ttft)
            runs_last.append(run)
            tick()
        repeat_totals.append((latency, tokens))
        per_prompt.append([r.latency for r in runs_last])
    latencies = [lat for lat, _ in repeat_totals]
    tps = [tok / lat for lat, tok in repeat_totals]
    row = {
        "mode": mode,
        "gamma": None if mode in GAMMA_FREE or tree is not None else gamma,
        "tree": {"budget": tree.budget, "depth": tree.depth, "top_k": tree.top_k} if tree is not None else None,
        "parallel": parallel,
        "context_capped_prompts": sum(n < max_new_tokens for n in lengths),
        "latency": median(latencies),
        "tokens_per_second": median(tps),
        "latencies": latencies,
        "num_tokens": repeat_totals[0][1],
        "time_to_first_token": median(ttfts) if ttfts else None,
        "output_ids": [r.output_ids for r in runs_last],
    }
    if mode == "target":
        decode_tokens = sum(len(r.output_ids) - 1 for r in runs_last)
        row["target_step_time"] = sum(r.latency - r.ttft for r in runs_last) / decode_tokens if decode_tokens else None
    if mode.startswith("speculative"):
        row |= speculative_statistics([r.counters for r in runs_last], [len(r.output_ids) for r in runs_last], gamma, target_step)
    if recording:
        row["round_records"] = rounds
    if categories and any(c is not None for c in categories):
        row["by_category"] = category_figures(mode, categories, runs_last, per_prompt, gamma)
    return row


def category_figures(mode: str, categories: list[str | None], runs: list[Run], per_prompt: list[list[float]], gamma: int) -> dict:
    """A row's figures per category: tokens/s as the row's (median over repeats of the category's totals),
    accepted length and acceptance from the last repeat's counters (speculative modes)."""
    out = {}
    for category in dict.fromkeys(c for c in categories if c is not None):
        picked = [i for i, c in enumerate(categories) if c == category]
        tokens = sum(len(runs[i].output_ids) for i in picked)
        figures = {"prompts": len(picked), "num_tokens": tokens,
                   "tokens_per_second": median(tokens / sum(lat[i] for i in picked) for lat in per_prompt)}
        if mode.startswith("speculative"):
            c = Counters.merged([runs[i].counters for i in picked])
            stats = metrics.round_statistics(c, gamma)
            figures |= {"average_accepted_length": tokens / c.target_calls, "acceptance_rate": stats["acceptance_rate"]}
        out[category] = figures
    return out


def speculative_statistics(counters: list, tokens: list[int], gamma: int, target_step: float | None = None) -> dict:
    """Acceptance, per-position acceptance, per-round time split and the predictions over all prompts."""
    c = Counters.merged(counters)
    stats = metrics.round_statistics(c, gamma, target_step)
    phase = lambda name: c.times.get(name, 0.0)  # noqa: E731
    all_time = sum(v for k, v in c.times.items() if k != HOOK_PHASE)
    return {
        "acceptance_rate": stats["acceptance_rate"],
        "acceptance_probability": stats["acceptance_probability"],
        "gamma_rounds": stats["gamma"],  # the most drafts a round held (gamma capped by max_new_tokens)
        "average_accepted_length": sum(tokens) / c.target_calls,
        "rounds": c.rounds,
        "runs": c.runs,
        "accepted_per_position": stats["accepted_per_position"],
        "round_time_split": {name: phase(name) / c.rounds if c.rounds else None for name in ("draft", "target", "fusion", "overhead")},
        "overhead_fraction": phase("overhead") / all_time if all_time else None,
        "prefill_time": (phase("target_prefill") + phase("draft_prefill") + phase("fusion_prefill")) / c.runs,
        "cost_ratio_c": stats["cost_ratio_c"],
        "predicted_speedup": stats["predicted_speedup"],
        "theoretical_speedup": stats["theoretical_speedup"],
        "fused_tokens": c.fused_tokens,
    }


def compare_to_target(rows: list[dict]) -> None:
    """Add outputs_match_target, first_divergence and measured speedup over `target` to every row."""
    reference = next((r for r in rows if r["mode"] == "target"), None)
    for row in rows:
        if reference is None:
            row["outputs_match_target"], row["first_divergence"], row["speedup_vs_target"] = None, None, None
            continue
        divergences = [metrics.first_divergence(a, b) for a, b in zip(reference["output_ids"], row["output_ids"])]
        first = next((d for d in divergences if d is not None), None)
        row["outputs_match_target"] = all(d is None for d in divergences)
        row["first_divergence"] = first
        row["speedup_vs_target"] = row["tokens_per_second"] / reference["tokens_per_second"]
        for category, figures in row.get("by_category", {}).items():
            base = reference.get("by_category", {}).get(category)
            figures["speedup_vs_target"] = figures["tokens_per_second"] / base["tokens_per_second"] if base else None


def tree_label(row: dict) -> str:
    """'tree 32/4/4' (budget/depth/top_k) for a tree row, 'parallel 8' for a parallel-drafting row of
    gamma 8, '' otherwise."""
    t = row.get("tree")
    if t:
        return f"tree {t['budget']}/{t['depth']}/{t['top_k']}"
    return f"parallel {row['gamma']}" if row.get("parallel") else ""


def markdown_table(rows: list[dict]) -> str:
    head = ("| mode | gamma | tokens/s | latency (s) | speedup vs target | accepted length | acceptance rate | "
            "acceptance prob. | predicted | overhead | outputs match |")
    lines = [head, "|" + "---|" * 11]
    fmt = lambda v, spec: "" if v is None else format(v, spec)  # noqa: E731
    for r in rows:
        lines.append(
            f"| {r['mode']} | {tree_label(r) or fmt(r['gamma'], 'd')} | {r['tokens_per_second']:.1f} | {r['latency']:.3f} | "
            f"{fmt(r.get('speedup_vs_target'), '.2f')} | {fmt(r.get('average_accepted_length'), '.2f')} | "
            f"{fmt(r.get('acceptance_rate'), '.3f')} | {fmt(r.get('acceptance_probability'), '.3f')} | "
            f"{fmt(r.get('predicted_speedup'), '.2f')} | "
            f"{fmt(r.get('overhead_fraction'), '.1%')} | {r.get('outputs_match_target')} |"
        )
    return "\n".join(lines)


def category_table(rows: list[dict]) -> str:
    """Spec-Bench's table: a row per mode (and gamma or tree), a column per category, each cell the
    speedup over the target alone and, for speculative modes, the accepted length in brackets; then
    the row's overall figures. '' when no row has categories."""
    with_cats = [r for r in rows if r.get("by_category")]
    if not with_cats:
        return ""
    categories = list(dict.fromkeys(c for r in with_cats for c in r["by_category"]))
    lines = ["| mode | gamma | " + " | ".join(categories) + " | overall |", "|" + "---|" * (len(categories) + 3)]

    def cell(f: dict | None) -> str:
        if not f:
            return ""
        speed = "" if f.get("speedup_vs_target") is None else f"{f['speedup_vs_target']:.2f}x"
        length = f.get("average_accepted_length")
        return speed + ("" if length is None else f" ({length:.2f})")

    for r in with_cats:
        cells = [cell(r["by_category"].get(c)) for c in categories]
        overall = {"speedup_vs_target": r.get("speedup_vs_target"), "average_accepted_length": r.get("average_accepted_length")}
        lines.append(f"| {r['mode']} | {tree_label(r) or ('' if r['gamma'] is None else r['gamma'])} | " + " | ".join(cells)
                     + f" | {cell(overall)} |")
    return "\n".join(lines)
