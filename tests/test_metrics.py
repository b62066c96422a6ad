"""Metric values on hand-built counters, and the engine's counting at end-of-sequence tokens."""

import pytest
import torch

from c2c.core import metrics
from c2c.core.engine import Counters, GenerationResult, SpecConfig, SpeculativeDecoder, standard_generate
from c2c.core.sampling import SamplingConfig


def counters(**kw) -> Counters:
    c = Counters(draft_calls=13, target_calls=4, rounds=3, total_drafted=12, total_accepted=6, rejections=3,
                 drafted_at=[3, 3, 3, 3], accepted_at=[3, 2, 1, 0])
    c.times = {"draft": 0.012, "target": 0.009, "fusion": 0.0, "overhead": 0.003, "draft_prefill": 1.0, "target_prefill": 1.0}
    for k, v in kw.items():
        setattr(c, k, v)
    return c


def test_acceptance_rate_and_per_token_probability_differ_as_defined():
    stats = metrics.round_statistics(counters(), gamma=4)
    assert stats["acceptance_rate"] == pytest.approx(6 / 12)  # counts the drafts after each rejection
    assert stats["acceptance_probability"] == pytest.approx(6 / 9)  # 6 accepted, 3 rejected
    assert stats["accepted_per_position"] == pytest.approx([1.0, 2 / 3, 1 / 3, 0.0])
    assert stats["predicted_speedup"] is None and stats["theoretical_speedup"] is None  # no target step time given


def test_predicted_speedup_uses_the_target_step_and_the_measured_round():
    stats = metrics.round_statistics(counters(), gamma=4, target_step=0.004)
    alpha = 6 / 9
    per_round = (1 - alpha**5) / (1 - alpha)
    assert stats["expected_tokens_per_round"] == pytest.approx(per_round)
    assert stats["draft_step_time"] == pytest.approx(0.001)  # 12 decode draft steps (13 calls - 1 prefill)
    assert stats["round_time"] == pytest.approx(0.024 / 3)
    assert stats["predicted_speedup"] == pytest.approx(per_round * 0.004 / 0.008)
    assert stats["cost_ratio_c"] == pytest.approx(0.25)
    assert stats["theoretical_speedup"] == pytest.approx(per_round / (4 * 0.25 + 1))


def test_a_perfect_draft_estimates_alpha_one_whatever_gamma():
    for gamma in (2, 8):
        c = counters(total_drafted=5 * gamma, total_accepted=5 * gamma, rejections=0)
        assert metrics.round_statistics(c, gamma)["acceptance_probability"] == 1.0


def test_target_step_time_excludes_the_first_token():
    result = GenerationResult([1, 2, 3, 4, 5], latency=1.4, time_to_first_token=1.0, counters=Counters())
    assert metrics.target_step_time(result) == pytest.approx(0.1)


def test_summary_pools_counts_not_ratios():
    spec = lambda acc, drafted, rej, n: {  # noqa: E731
        "num_tokens": n, "latency": 1.0, "time_to_first_token": 0.1, "total_drafted": drafted, "total_accepted": acc,
        "rejections": rej, "target_calls": 2, "rounds": 1, "draft_calls": 1, "draft_time": 0, "target_time": 0,
        "fusion_time": 0, "fused_tokens": 0, "predicted_speedup": None, "theoretical_speedup": None, "prefill_time": 0,
        "gamma": 4, "cost_ratio_c": None, "target_verify_time": None, "round_time": None}
    out = metrics.summary([{"speculative": spec(4, 4, 0, 5)}, {"speculative": spec(0, 4, 1, 1)}])["speculative"]
    assert out["acceptance_rate"] == pytest.approx(4 / 8) and out["acceptance_probability"] == pytest.approx(4 / 5)


def test_drafts_after_an_end_of_sequence_token_are_not_counted(target):
    """The draft is the target itself (every draft accepted): a block holding the end-of-sequence
    token must count drafts only up to it, so acceptance stays 1 and rounds add up to the output."""
    prompt = [5, 9, 33]
    with torch.inference_mode():
        free = standard_generate(target, prompt, 30, SamplingConfig(), set()).output_ids
        eos = {free[6]}  # a token the target emits mid-output
        want = standard_generate(target, prompt, 30, SamplingConfig(), eos).output_ids
        result = SpeculativeDecoder(target, target, SpecConfig(4, 30), SamplingConfig(), eos).generate(prompt)
    c = result.counters
    assert result.output_ids == want
    assert c.rejections == 0 and c.total_accepted == c.total_drafted
    assert sum(k * v for k, v in c.tokens_per_round.items()) == len(want) - 1  # the first token comes from the prefill
    assert c.total_drafted <= len(want) - 1


def test_report_explains_sampling_differences_and_prints_the_greedy_margin():
    from c2c.app.report import Report

    lines = []
    report = Report("en", write=lines.append)
    differ = {"latency_speedup": 1.0, "throughput_speedup": 1.0, "outputs_match": False, "first_divergence": 3}
    report.comparison(differ, sampling=True)
    assert "differ by design" in lines[-1] and "first divergence" not in lines[-1]
    report.comparison(differ | {"divergence_top2_margin": 0.0625})
    assert "first divergence at 3" in lines[-1] and "margin 0.0625" in lines[-1]


def test_report_title_names_the_models_run():
    from c2c.app.report import Report

    lines = []
    config = {"fusion": {"enabled": False, "reason": "none"}, "temperature": 0, "draft_model": "/x/presets/arith/draft",
              "target_model": "Qwen/Qwen3-4B", "fuser_checkpoint": "none", "gamma": 4, "max_new_tokens": 8,
              "device": "cpu", "dtype": "float32", "threads": 1}
    Report("en", write=lines.append).header(config, 1)
    assert "Qwen/Qwen3-4B speculative decoding demo (draft arith/draft" in lines[0] and "Qwen3-14B" not in lines[0]
