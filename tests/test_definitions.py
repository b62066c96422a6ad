"""Every figure the report and the JSON print, computed by hand from a known sequence of rounds (a
chain run and a tree run), so a planted change to any one formula fails here (issue 22, item 8)."""

import pytest

from c2c.core import metrics
from c2c.core.engine import Counters, GenerationResult


def chain_run() -> GenerationResult:
    """gamma 3, 10 tokens: the prefill's token, then rounds emitting 4, 2, 3 tokens (accepted 3, 1, 2;
    the last two ended at a rejection), drafted 3 per round."""
    c = Counters(draft_calls=1 + 9, target_calls=4, rounds=3, total_drafted=9, total_accepted=6, rejections=2,
                 fused_tokens=12, drafted_at=[3, 3, 3], accepted_at=[3, 2, 1], tokens_per_round={4: 1, 2: 1, 3: 1},
                 times={"target_prefill": 0.010, "draft_prefill": 0.002, "fusion_prefill": 0.001, "draft": 0.018,
                        "target": 0.030, "fusion": 0.003, "overhead": 0.006},
                 gamma_rounds=3)
    return GenerationResult(list(range(10)), latency=0.080, time_to_first_token=0.011, counters=c)


def test_every_chain_figure_by_hand():
    r = chain_run()
    step = 0.012  # the target-only loop's seconds per token
    m = metrics.speculative_metrics(r, "text", 3, step)
    alpha = 6 / (6 + 2)
    expected = (1 - alpha ** 4) / (1 - alpha)
    draft_step, verify, round_time = 0.018 / (10 - 1), 0.030 / 3, (0.018 + 0.030 + 0.003 + 0.006) / 3
    want = {
        "num_tokens": 10, "latency": 0.080, "tokens_per_second": 10 / 0.080, "time_to_first_token": 0.011,
        "acceptance_rate": 6 / 9, "acceptance_probability": alpha, "average_accepted_length": 10 / 4,
        "draft_calls": 10, "target_calls": 4, "rounds": 3, "total_drafted": 9, "total_accepted": 6, "rejections": 2,
        "draft_time": 0.020, "target_time": 0.040, "fusion_time": 0.004, "overhead_time": 0.080 - 0.020 - 0.040 - 0.004,
        "fused_tokens": 12, "nodes_verified": 0, "nodes_per_round": None, "prefill_time": 0.013, "gamma": 3,
        "gamma_requested": 3, "draft_step_time": draft_step, "target_verify_time": verify, "target_step_time": step,
        "round_time": round_time, "expected_tokens_per_round": expected, "branching": False,
        "cost_ratio_c": draft_step / step, "predicted_speedup": expected * step / round_time,
        "theoretical_speedup": expected / (3 * draft_step / step + 1), "accepted_per_position": [1.0, 2 / 3, 1 / 3],
        "tokens_per_round_histogram": {"1": 0, "2": 1, "3": 1, "4": 1},
    }
    for key, value in want.items():
        assert m[key] == pytest.approx(value), key


def test_the_explanation_by_hand():
    r = chain_run()
    step = 0.012
    sp = metrics.speculative_metrics(r, "text", 3, step)
    st = {"latency": 0.110, "target_step_time": step}
    e = metrics.explain(st, sp)
    alpha = 6 / 8
    expected = (1 - alpha ** 4) / (1 - alpha)
    assert e["measured_speedup"] == pytest.approx(0.110 / 0.080)
    assert e["prefill_share"] == pytest.approx(0.013 / 0.080)
    assert e["tokens_per_round"] == pytest.approx((10 - 1) / 3)
    assert e["c_needed"] == pytest.approx((expected - 1) / 3)
    assert e["verify_steps"] == pytest.approx((0.030 / 3) / step)
    assert e["tokens_needed"] == pytest.approx(sp["round_time"] / step)


def test_a_tree_runs_figures_by_hand():
    """A tree run (top_k > 1): the prediction uses the tokens its rounds gave; no closed form."""
    r = chain_run()
    r.counters.branching, r.counters.nodes_verified = True, 48
    step = 0.012
    m = metrics.speculative_metrics(r, "text", 3, step)
    per_round = (4 + 2 + 3) / 3
    assert m["expected_tokens_per_round"] == pytest.approx(per_round)
    assert m["predicted_speedup"] == pytest.approx(per_round * step / m["round_time"])
    assert m["theoretical_speedup"] is None and m["nodes_per_round"] == 16
    e = metrics.explain({"latency": 0.110, "target_step_time": step}, m)
    assert e["c_needed"] is None and e["alpha_needed"] is None and e["branching"]


def test_the_summary_and_the_comparison_by_hand():
    a, b = chain_run(), chain_run()
    b.counters.total_accepted, b.counters.rejections = 3, 3
    step = 0.012
    entries = []
    for r in (a, b):
        sp = metrics.speculative_metrics(r, "x", 3, step)
        st = {"text": "x", "output_ids": list(range(10)), "latency": 0.110, "num_tokens": 10, "tokens_per_second": 10 / 0.110,
              "time_to_first_token": 0.012, "target_calls": 10, "target_step_time": step}
        entries.append({"standard": st, "speculative": sp, "comparison": metrics.comparison(st, sp)})
    c = entries[0]["comparison"]
    assert c["latency_speedup"] == pytest.approx(0.110 / 0.080) and c["throughput_speedup"] == pytest.approx(0.110 / 0.080)
    assert c["outputs_match"] and c["first_divergence"] is None
    s = metrics.summary(entries)
    sp = s["speculative"]
    assert sp["acceptance_rate"] == pytest.approx((6 + 3) / 18)
    assert sp["acceptance_probability"] == pytest.approx(9 / (9 + 5))
    assert sp["average_accepted_length"] == pytest.approx(20 / 8) and sp["rounds"] == 6
    assert sp["tokens_per_second"] == pytest.approx(20 / 0.160) and sp["prefill_time"] == pytest.approx(0.026)
    assert s["comparison"]["latency_speedup"] == pytest.approx(0.220 / 0.160)
    assert s["comparison"]["explanation"]["measured_speedup"] == pytest.approx(0.220 / 0.160)
    assert s["comparison"]["prompts_matching"] == 2 and s["standard"]["num_tokens"] == 20
