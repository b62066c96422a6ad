"""Figures reported per run, per comparison and over all prompts.

Definitions (see docs/report.md, "Metrics"):
- acceptance_rate = accepted draft tokens / drafted tokens, as vLLM reports it. It also counts the
  drafts after a round's first rejection (never even looked at), so it falls as gamma grows.
- acceptance_probability (alpha) = accepted / (accepted + rejections): the per-token probability
  that the target accepts a draft token (the maximum-likelihood estimate under Leviathan's model,
  where each round accepts a geometric run of tokens, cut at gamma). Drafts after an
  end-of-sequence token are counted nowhere.
- average_accepted_length = tokens emitted / target forward passes (prefill included), so plain
  decoding scores exactly 1.0.
- predicted_speedup = E[tokens per round](alpha, gamma) * target one-token step / measured round
  cost (gamma draft steps + verify + fusion + overhead), all measured in this run.
- theoretical_speedup = (1 - alpha^(gamma+1)) / ((1 - alpha)(f*c + 1)) (Leviathan et al.),
  with c = draft step time / target one-token step time and f the draft forwards a round
  (`draft_forwards_per_round`: gamma for a chain, 1 for parallel drafting, whose draft step is its
  one forward of gamma tokens): the closed form, which ignores the verify's extra cost over one
  step, fusion and overhead.
Both predictions need the target-only run's step time (absent with --skip_standard). Both use the
gamma the rounds really had (`gamma`: at most max_new_tokens - 2 drafts fit a round, whatever was
asked; `gamma_requested` keeps the flag).
- explanation (`explain`): why a measured speedup differs from the predicted one (the prediction
  covers the rounds only: it leaves out the prefills and assumes E[tokens per round]), and, when
  speculation loses, what would have to change by the closed form: c below (E - 1) / gamma, or alpha
  above the value at which E(alpha, gamma) = gamma c + 1.
"""

from __future__ import annotations

from statistics import median

from .engine import Counters, GenerationResult


def _safe_div(a: float, b: float) -> float | None:
    return a / b if b else None


def expected_tokens_per_round(alpha: float, gamma: int) -> float:
    if alpha >= 1.0:
        return gamma + 1.0
    return (1 - alpha ** (gamma + 1)) / (1 - alpha)


def theoretical_speedup(alpha: float, gamma: int, c: float, forwards: int | None = None) -> float:
    """Leviathan et al. 2023, eq. for expected wall-clock improvement over target-only decoding.
    `forwards`: draft forwards a round (default gamma; 1 with parallel drafting, whose one forward of
    gamma tokens is what c measures then)."""
    return expected_tokens_per_round(alpha, gamma) / ((gamma if forwards is None else forwards) * c + 1)


def draft_forwards(gamma: int, parallel: bool) -> int:
    """Draft forwards in a round of gamma drafts: gamma for a chain, 1 for parallel drafting."""
    return min(gamma, 1) if parallel else gamma


def standard_metrics(result: GenerationResult, text: str) -> dict:
    n = len(result.output_ids)
    return {
        "text": text,
        "output_ids": result.output_ids,
        "latency": result.latency,
        "num_tokens": n,
        "tokens_per_second": _safe_div(n, result.latency),
        "time_to_first_token": result.time_to_first_token,
        "target_calls": result.counters.target_calls,
        "target_step_time": target_step_time(result),
    }


def acceptance_probability(accepted: int, rejections: int) -> float | None:
    """Per-token acceptance estimate: each round is a run of accepted tokens ended by one rejection
    (or by the block's end, which tells nothing about the next token)."""
    return _safe_div(accepted, accepted + rejections)


def rounds_gamma(c: Counters, gamma: int) -> int:
    """The most drafts a round of this run could hold: `gamma`, capped by max_new_tokens (0 when no
    draft fits: max_new_tokens <= 2), as the engine recorded it."""
    return c.gamma_rounds if c.gamma_rounds is not None else gamma


def round_statistics(c: Counters, gamma: int, target_step: float | None = None) -> dict:
    """Acceptance figures, per-step costs (decode steps only, prefills excluded), c, both predictions
    and per-position acceptance, from one run's counters or several merged. `target_step`: the
    target-only loop's seconds per generated token (None: no prediction). `gamma` as asked; the
    predictions use the gamma the rounds had."""
    gamma = rounds_gamma(c, gamma)
    forwards = draft_forwards(gamma, c.parallel)
    t = c.times
    draft_step = _safe_div(t.get("draft", 0.0), c.draft_calls - c.runs)
    verify_step = _safe_div(t.get("target", 0.0), c.rounds)
    round_cost = _safe_div(sum(t.get(k, 0.0) for k in ("draft", "target", "fusion", "overhead")), c.rounds)
    alpha = acceptance_probability(c.total_accepted, c.rejections)
    cost_ratio = _safe_div(draft_step, target_step) if draft_step and target_step else None
    per_round = expected_tokens_per_round(alpha, gamma) if alpha is not None else None
    branching = c.branching  # tree rounds with top_k > 1
    if branching:  # the chain's closed form does not describe a tree: the prediction uses what the rounds gave
        per_round = _safe_div(sum(k * v for k, v in c.tokens_per_round.items()), c.rounds)
    return {
        "gamma": gamma,
        "acceptance_rate": _safe_div(c.total_accepted, c.total_drafted),
        "acceptance_probability": alpha,
        "draft_step_time": draft_step,
        "target_verify_time": verify_step,
        "target_step_time": target_step,
        "round_time": round_cost,
        "expected_tokens_per_round": per_round,
        "cost_ratio_c": cost_ratio,
        "predicted_speedup": per_round * target_step / round_cost if per_round and target_step and round_cost else None,
        "theoretical_speedup": theoretical_speedup(alpha, gamma, cost_ratio, forwards) if alpha is not None and cost_ratio and not branching else None,
        "draft_mode": "tree" if c.branching or c.nodes_verified else "parallel" if c.parallel else "chain",
        "draft_forwards_per_round": forwards,
        "branching": branching,
        "accepted_per_position": [_safe_div(a, d) for a, d in zip(c.accepted_at, c.drafted_at)],
    }


def target_step_time(result: GenerationResult) -> float | None:
    """Seconds per token of the target-only loop after its first token (the step speculation replaces)."""
    n = len(result.output_ids)
    return _safe_div(result.latency - result.time_to_first_token, n - 1)


def speculative_metrics(result: GenerationResult, text: str, gamma: int, target_step: float | None = None) -> dict:
    c = result.counters
    n = len(result.output_ids)
    t = c.times
    draft_time = t.get("draft", 0.0) + t.get("draft_prefill", 0.0)
    target_time = t.get("target", 0.0) + t.get("target_prefill", 0.0)
    fusion_time = t.get("fusion", 0.0) + t.get("fusion_prefill", 0.0)
    stats = round_statistics(c, gamma, target_step)
    prefill = t.get("target_prefill", 0.0) + t.get("draft_prefill", 0.0) + t.get("fusion_prefill", 0.0)
    return {
        "text": text,
        "output_ids": result.output_ids,
        "latency": result.latency,
        "num_tokens": n,
        "tokens_per_second": _safe_div(n, result.latency),
        "time_to_first_token": result.time_to_first_token,
        "acceptance_rate": stats["acceptance_rate"],
        "acceptance_probability": stats["acceptance_probability"],
        "average_accepted_length": _safe_div(n, c.target_calls),
        "draft_calls": c.draft_calls,
        "target_calls": c.target_calls,
        "rounds": c.rounds,
        "total_drafted": c.total_drafted,
        "total_accepted": c.total_accepted,
        "rejections": c.rejections,
        "draft_time": draft_time,
        "target_time": target_time,
        "fusion_time": fusion_time,
        "overhead_time": max(result.latency - draft_time - target_time - fusion_time, 0.0),
        "fused_tokens": c.fused_tokens,
        "nodes_verified": c.nodes_verified,
        "nodes_per_round": _safe_div(c.nodes_verified, c.rounds) if c.nodes_verified else None,
        "prefill_time": prefill,
        "gamma": stats["gamma"],
        "gamma_requested": gamma,
        "draft_step_time": stats["draft_step_time"],
        "target_verify_time": stats["target_verify_time"],
        "target_step_time": stats["target_step_time"],
        "round_time": stats["round_time"],
        "expected_tokens_per_round": stats["expected_tokens_per_round"],
        "branching": stats["branching"],
        "draft_mode": stats["draft_mode"],
        "draft_forwards_per_round": stats["draft_forwards_per_round"],
        "cost_ratio_c": stats["cost_ratio_c"],
        "predicted_speedup": stats["predicted_speedup"],
        "theoretical_speedup": stats["theoretical_speedup"],
        "accepted_per_position": stats["accepted_per_position"],
        "tokens_per_round_histogram": {str(k): c.tokens_per_round.get(k, 0) for k in range(1, stats["gamma"] + 2)},
    }


def alpha_needed(gamma: int, c: float, forwards: int | None = None) -> float | None:
    """The smallest alpha at which the closed form reaches 1x: E(alpha, gamma) = forwards c + 1
    (forwards: gamma for a chain, 1 for parallel drafting; None when no alpha can: a round's drafting
    as costly as gamma target steps)."""
    goal = (gamma if forwards is None else forwards) * c + 1
    if expected_tokens_per_round(1.0, gamma) <= goal:
        return None
    lo, hi = 0.0, 1.0
    for _ in range(60):  # E grows with alpha: bisection
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if expected_tokens_per_round(mid, gamma) < goal else (lo, mid)
    return hi


def explain(standard: dict, speculative: dict, prompts: int = 1) -> dict | None:
    """Why the measured speedup differs from the predicted one, from the measured parts; and when
    speculation loses, what would have to change. `standard`/`speculative`: one prompt's metrics, or
    the summary's totals over `prompts` prompts. None without the figures (no standard run)."""
    step, rounds = standard.get("target_step_time"), speculative.get("rounds")
    predicted, alpha = speculative.get("predicted_speedup"), speculative.get("acceptance_probability")
    measured = _safe_div(standard["latency"], speculative["latency"])
    if measured is not None and (not rounds or alpha is None):  # nothing was drafted: no prediction to compare
        return {"measured_speedup": measured, "predicted_speedup": None, "no_drafts": True, "gamma": speculative["gamma"],
                "prefill_share": _safe_div(speculative["prefill_time"], speculative["latency"])}
    if not step or not rounds or predicted is None or alpha is None:
        return None
    gamma, c = speculative["gamma"], speculative.get("cost_ratio_c")
    forwards = speculative.get("draft_forwards_per_round") or gamma
    branching = speculative.get("branching", False)
    expected = speculative["expected_tokens_per_round"] if branching else expected_tokens_per_round(alpha, gamma)
    out = {
        "measured_speedup": measured,
        "predicted_speedup": predicted,
        "prefill_share": _safe_div(speculative["prefill_time"], speculative["latency"]),
        "expected_tokens_per_round": expected,
        "tokens_per_round": (speculative["num_tokens"] - prompts) / rounds,  # the prefill gives each prompt's first
        "gamma": gamma, "alpha": alpha, "cost_ratio_c": c,
        "c_needed": (expected - 1) / forwards if forwards and not branching else None,
        "alpha_needed": alpha_needed(gamma, c, forwards) if c is not None and not branching else None,
        "branching": branching,
        "tokens_needed": _safe_div(speculative.get("round_time") or 0, step) or None,  # a round pays above this
        "theoretical_speedup": speculative.get("theoretical_speedup"),
        "verify_steps": _safe_div(speculative.get("target_verify_time") or 0, step) or None,
    }
    return out


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token (a length difference counts), or None when equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def comparison(standard: dict, speculative: dict) -> dict:
    return {
        "latency_speedup": _safe_div(standard["latency"], speculative["latency"]),
        "throughput_speedup": _safe_div(speculative["tokens_per_second"] or 0, standard["tokens_per_second"] or 0),
        "outputs_match": standard["output_ids"] == speculative["output_ids"],
        "first_divergence": first_divergence(standard["output_ids"], speculative["output_ids"]),
    }


def summary(prompts: list[dict]) -> dict:
    """The same figures over all prompts: totals, token-weighted rates and medians of ratios."""
    spec = [p["speculative"] for p in prompts if p.get("speculative")]
    std = [p["standard"] for p in prompts if p.get("standard")]
    comps = [p["comparison"] for p in prompts if p.get("comparison")]
    out: dict = {"num_prompts": len(prompts)}
    if std:
        tokens, latency = sum(s["num_tokens"] for s in std), sum(s["latency"] for s in std)
        out["standard"] = {
            "num_tokens": tokens,
            "latency": latency,
            "tokens_per_second": _safe_div(tokens, latency),
            "time_to_first_token": median(s["time_to_first_token"] for s in std),
        }
    if spec:
        tokens, latency = sum(s["num_tokens"] for s in spec), sum(s["latency"] for s in spec)
        drafted, accepted = sum(s["total_drafted"] for s in spec), sum(s["total_accepted"] for s in spec)
        rejections = sum(s["rejections"] for s in spec)
        target_calls = sum(s["target_calls"] for s in spec)
        out["speculative"] = {
            "num_tokens": tokens,
            "latency": latency,
            "tokens_per_second": _safe_div(tokens, latency),
            "time_to_first_token": median(s["time_to_first_token"] for s in spec),
            "acceptance_rate": _safe_div(accepted, drafted),
            "acceptance_probability": acceptance_probability(accepted, rejections),
            "average_accepted_length": _safe_div(tokens, target_calls),
            "rounds": sum(s["rounds"] for s in spec),
            "draft_calls": sum(s["draft_calls"] for s in spec),
            "target_calls": target_calls,
            "total_drafted": drafted,
            "total_accepted": accepted,
            "rejections": rejections,
            "draft_time": sum(s["draft_time"] for s in spec),
            "target_time": sum(s["target_time"] for s in spec),
            "fusion_time": sum(s["fusion_time"] for s in spec),
            "fused_tokens": sum(s["fused_tokens"] for s in spec),
            "prefill_time": sum(s["prefill_time"] for s in spec),
            "gamma": max(s["gamma"] for s in spec),
            "cost_ratio_c": _median_of(s["cost_ratio_c"] for s in spec),
            "target_verify_time": _median_of(s["target_verify_time"] for s in spec),
            "round_time": _median_of(s["round_time"] for s in spec),
            "branching": any(s.get("branching", False) for s in spec),
            "draft_mode": spec[0].get("draft_mode", "chain"),
            "draft_forwards_per_round": max(s.get("draft_forwards_per_round") or 0 for s in spec) or None,
            "expected_tokens_per_round": _median_of(s.get("expected_tokens_per_round") for s in spec),
            "predicted_speedup": _median_of(s["predicted_speedup"] for s in spec),
            "theoretical_speedup": _median_of(s["theoretical_speedup"] for s in spec),
        }
    if comps:
        out["comparison"] = {
            "latency_speedup": _safe_div(out["standard"]["latency"], out["speculative"]["latency"]),
            "throughput_speedup": _safe_div(
                out["speculative"]["tokens_per_second"] or 0, out["standard"]["tokens_per_second"] or 0
            ),
            "median_latency_speedup": _median_of(c["latency_speedup"] for c in comps),
            "outputs_match": all(c["outputs_match"] for c in comps),
            "prompts_matching": sum(c["outputs_match"] for c in comps),
        }
        if len(std) == len(spec):  # the gap over all prompts: the standard loop's step from its totals
            tokens = sum(s["num_tokens"] for s in std)
            step = _safe_div(out["standard"]["latency"] - sum(s["time_to_first_token"] for s in std), tokens - len(std))
            out["comparison"]["explanation"] = explain(out["standard"] | {"target_step_time": step}, out["speculative"], len(spec))
    return out


def _median_of(values) -> float | None:
    values = [v for v in values if v is not None]
    return median(values) if values else None


def by_category(prompts: list[dict]) -> dict[str, dict]:
    """Spec-Bench's view: the figures of each category's turns ({} when no entry has a category), in
    order of first appearance; per category its turns' totals (tokens/s of both runs, the speedup of
    their throughputs, accepted length, acceptance), as `summary` computes them."""
    groups: dict[str, list[dict]] = {}
    for p in prompts:
        if p.get("category") is not None:
            groups.setdefault(p["category"], []).append(p)
    out = {}
    for category, items in groups.items():
        s = summary(items)
        std, spec = s.get("standard", {}), s.get("speculative", {})
        out[category] = {
            "turns": len(items),
            "standard_tokens_per_second": std.get("tokens_per_second"),
            "speculative_tokens_per_second": spec.get("tokens_per_second"),
            "speedup": s.get("comparison", {}).get("throughput_speedup"),
            "average_accepted_length": spec.get("average_accepted_length"),
            "acceptance_rate": spec.get("acceptance_rate"),
            "outputs_match": s.get("comparison", {}).get("outputs_match"),
        }
    return out


def category_table(rows: dict[str, dict]) -> str:
    """`by_category` as a markdown table (one row a category)."""
    fmt = lambda v, spec: "" if v is None else format(v, spec)  # noqa: E731
    lines = ["| category | turns | target tok/s | speculative tok/s | speedup | accepted length | acceptance | outputs match |",
             "|" + "---|" * 8]
    for category, r in rows.items():
        lines.append(f"| {category} | {r['turns']} | {fmt(r['standard_tokens_per_second'], '.1f')} | "
                     f"{fmt(r['speculative_tokens_per_second'], '.1f')} | {fmt(r['speedup'], '.2f')} | "
                     f"{fmt(r['average_accepted_length'], '.2f')} | {fmt(r['acceptance_rate'], '.3f')} | "
                     f"{'' if r['outputs_match'] is None else r['outputs_match']} |")
    return "\n".join(lines)
