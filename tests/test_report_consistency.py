"""The printed report agrees with itself (issue 23): the closed form, the prediction and the gap
explanation use the gamma the rounds really had and the printed alpha and c, a test recomputes each
from the JSON, and every speedup below 1 comes with its one-line reason."""

import json
import re

import pytest

import qwen3_14b_speculative_demo as demo
from c2c.core import metrics


def run(tmp_path, capsys, *flags):
    out = tmp_path / "out"
    assert demo.main([*flags, "--save_results", "--output_dir", str(out), "--lang", "en", "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    return json.loads(next(out.glob("results_*.json")).read_text()), printed


def check_entry(sp: dict, st: dict, explanation: dict, gamma: int):
    alpha, c = sp["acceptance_probability"], sp["cost_ratio_c"]
    expected = (1 - alpha ** (gamma + 1)) / (1 - alpha) if alpha < 1 else gamma + 1
    assert sp["gamma"] == gamma
    assert sp["expected_tokens_per_round"] == pytest.approx(expected)
    assert sp["theoretical_speedup"] == pytest.approx(expected / (gamma * c + 1))
    assert sp["predicted_speedup"] == pytest.approx(expected * st["target_step_time"] / sp["round_time"])
    assert explanation["measured_speedup"] == pytest.approx(st["latency"] / sp["latency"])
    assert explanation["tokens_per_round"] == pytest.approx((sp["num_tokens"] - 1) / sp["rounds"])
    assert explanation["c_needed"] == pytest.approx((expected - 1) / gamma)
    if explanation["alpha_needed"] is not None:  # the closed form is exactly 1x there
        a = explanation["alpha_needed"]
        assert (1 - a ** (gamma + 1)) / (1 - a) == pytest.approx(gamma * c + 1, rel=1e-6)


@pytest.mark.parametrize("flags, gamma", [(("--preset", "tiny", "--gamma", "100", "--max_new_tokens", "8"), 6),
                                          (("--preset", "arith",), 4)])
def test_predictions_and_explanations_recompute_from_the_json(tmp_path, capsys, flags, gamma):
    data, printed = run(tmp_path, capsys, *flags)
    for entry in data["prompts"]:
        check_entry(entry["speculative"], entry["standard"], entry["comparison"]["explanation"], gamma)
        assert entry["speculative"]["gamma_requested"] == data["config"]["gamma"]
    # the printed prediction line names the gamma the closed form used
    for line in printed.splitlines():
        if line.startswith("Predicted speedup:") and "gamma=" in line:
            assert f"gamma={gamma})" in line
    # every speedup printed below 1 is followed by its reason
    lines = printed.splitlines()
    for i, line in enumerate(lines):
        found = re.match(r"Latency speedup: ([0-9.]+)x", line)
        if found and float(found.group(1)) < 1:
            reason = lines[i + 1]
            assert (reason.startswith("Why measured") and ("for speculation to pay" in reason or "closed form pays" in reason
                                                           or "no alpha can pay" in reason)
                    or reason.startswith("Measured") and "no round drafted" in reason), reason
    summary = data["summary"]["comparison"]["explanation"]
    assert summary["measured_speedup"] == pytest.approx(data["summary"]["comparison"]["latency_speedup"])


def test_alpha_needed_solves_the_closed_form_and_is_none_when_no_alpha_can():
    a = metrics.alpha_needed(4, 0.3)
    assert metrics.theoretical_speedup(a, 4, 0.3) == pytest.approx(1.0, rel=1e-9)
    assert metrics.theoretical_speedup(a - 0.01, 4, 0.3) < 1 < metrics.theoretical_speedup(a + 0.01, 4, 0.3)
    assert metrics.alpha_needed(4, 1.0) is None and metrics.alpha_needed(4, 1.5) is None
