"""The demo CLI end to end on tiny saved models, and every bad input -> one line, exit 2, no results file."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import qwen3_14b_speculative_demo as demo

ROOT = Path(__file__).resolve().parent.parent
PROMPT_KEYS = {"text", "output_ids", "latency", "num_tokens", "tokens_per_second"}
STANDARD_KEYS = PROMPT_KEYS | {"time_to_first_token"}
SPECULATIVE_KEYS = PROMPT_KEYS | {
    "acceptance_rate", "average_accepted_length", "draft_calls", "target_calls", "total_drafted", "total_accepted",
    "draft_time", "target_time", "fusion_time", "fused_tokens", "theoretical_speedup", "accepted_per_position",
    "tokens_per_round_histogram",
}
CONFIG_KEYS = {
    "draft_model", "target_model", "fuser_checkpoint", "fusion", "gamma", "max_new_tokens", "temperature", "top_p",
    "top_k", "seed", "dtype", "device", "enable_thinking", "prompts_file", "command",
}


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# a comment\n请解释量子计算的基本原理。\n\nWhat is 1 + 1?\n", encoding="utf-8")
    return path


def args_for(saved_models, prompts_file, out, *extra):
    return [
        "--base_model", str(saved_models / "draft"), "--teacher_model", str(saved_models / "target"),
        "--prompts", str(prompts_file), "--max_new_tokens", "24", "--device", "cpu", "--no_warmup",
        "--save_results", "--output_dir", str(out), *extra,
    ]


def results_in(out: Path) -> list[Path]:
    return sorted(out.glob("*.json")) if out.exists() else []


def test_cli_writes_every_result_key_and_outputs_match(saved_models, prompts_file, tmp_path, capsys):
    out = tmp_path / "out"
    code = demo.main(args_for(saved_models, prompts_file, out, "--fuser_checkpoint", str(saved_models / "fuser"), "--gamma", "3", "--lang", "en"))
    assert code == 0
    [path] = results_in(out)
    data = json.loads(path.read_text(encoding="utf-8"))
    assert set(data) >= {"config", "environment", "prompts", "summary"}
    assert set(data["config"]) >= CONFIG_KEYS
    fusion = data["config"]["fusion"]
    effects = fusion.pop("projector_effects")  # each projector's relative K/V change (c2c.core.effect)
    assert len(effects) == 2 and min(effects) > 1e-3
    assert fusion == {"enabled": True, "prefill": True, "decode": True, "fuse_last_prompt": True,
                      "open_gates": [4, 4], "inert_projectors": [], "draft_adapter": None, "reason": None,
                      "path": str(saved_models / "fuser")}
    assert set(data["environment"]) >= {"python", "torch", "transformers", "device_name"}
    assert len(data["prompts"]) == 2
    for entry in data["prompts"]:
        assert set(entry["standard"]) >= STANDARD_KEYS
        assert set(entry["speculative"]) >= SPECULATIVE_KEYS
        assert set(entry["comparison"]) >= {"latency_speedup", "throughput_speedup", "outputs_match", "first_divergence"}
        assert entry["comparison"]["outputs_match"] is True and entry["comparison"]["first_divergence"] is None
        assert entry["speculative"]["fused_tokens"] > 0
        assert len(entry["speculative"]["accepted_per_position"]) == 3
    assert data["summary"]["comparison"]["outputs_match"] is True
    printed = capsys.readouterr().out
    assert "Speculative decoding" in printed and "Summary" in printed and str(path) in printed
    assert "open gates 4/4" in printed


def test_default_fuser_missing_runs_without_fusion_and_records_why(saved_models, prompts_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert demo.main(args_for(saved_models, prompts_file, out, "--skip_standard")) == 0
    data = json.loads(results_in(out)[0].read_text(encoding="utf-8"))
    fusion = data["config"]["fusion"]
    assert fusion["enabled"] is False and "no public C2C fuser exists for Qwen3-14B" in fusion["reason"]
    assert all(p["standard"] is None and p["comparison"] is None for p in data["prompts"])
    assert "WARNING" in capsys.readouterr().err


def test_sampling_run_and_no_fusion_flags(saved_models, prompts_file, tmp_path):
    out = tmp_path / "out"
    extra = ["--fuser_checkpoint", str(saved_models / "fuser"), "--no_prefill_fusion", "--temperature", "0.8", "--top_p", "0.9", "--seed", "7"]
    assert demo.main(args_for(saved_models, prompts_file, out, *extra)) == 0
    data = json.loads(results_in(out)[0].read_text(encoding="utf-8"))
    assert data["config"]["fusion"]["prefill"] is False and data["config"]["fusion"]["decode"] is True
    assert data["config"]["temperature"] == 0.8


def test_two_runs_never_overwrite_each_other(saved_models, prompts_file, tmp_path):
    out = tmp_path / "out"
    for _ in range(2):
        assert demo.main(args_for(saved_models, prompts_file, out, "--fuser_checkpoint", "none", "--max_new_tokens", "3")) == 0
    assert len(results_in(out)) == 2
    assert not list(out.glob(".*tmp"))


def damaged_fuser(saved_models, tmp_path, name: str, content: bytes):
    import shutil

    folder = tmp_path / f"damaged_{name}"
    shutil.copytree(saved_models / "fuser", folder)
    (folder / "final" / name).write_bytes(content)
    return str(folder)


def bad_input_cases(saved_models, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n", encoding="utf-8")
    return {
        "corrupted projector weights": (["--fuser_checkpoint", damaged_fuser(saved_models, tmp_path, "projector_0.pt", b"PK\x03\x04garbage")],
                                        "projector_0.pt cannot be read"),
        "malformed projector json": (["--fuser_checkpoint", damaged_fuser(saved_models, tmp_path, "projector_0.json", b'{"class": ')],
                                     "projector_0.json is not valid JSON"),
        "unknown projector argument": (["--fuser_checkpoint", damaged_fuser(
            saved_models, tmp_path, "projector_1.json", b'{"class": "C2CProjector", "init_args": {"source_dim": 4, "bogus": 1}}')],
            "init_args do not fit C2CProjector"),
        "temperature nan": (["--temperature", "nan"], "temperature must be a finite number"),
        "temperature inf": (["--temperature", "inf"], "temperature must be a finite number"),
        "missing prompt file": (["--prompts", str(tmp_path / "nope.txt")], "prompt file not found"),
        "empty prompt file": (["--prompts", str(empty)], "holds no prompts"),
        "gamma 0": (["--gamma", "0"], "gamma must be >= 1"),
        "negative max_new_tokens": (["--max_new_tokens", "-5"], "max_new_tokens must be >= 1"),
        "missing model path": (["--base_model", str(tmp_path / "no_model")], "cannot load the draft model"),
        "wrong fuser": (["--fuser_checkpoint", str(saved_models / "draft")], "holds no projector files"),
        "unknown fuser": (["--fuser_checkpoint", "no_such_pair_Fuser"], "not found"),
        "bad dtype": (["--dtype", "int8"], "invalid choice"),
        "bad top_p": (["--temperature", "1", "--top_p", "0"], "top_p must be in"),
        "unwritable output dir": (["--output_dir", str(empty / "sub")], "cannot write to --output_dir"),
    }


@pytest.mark.parametrize("case", [
    "missing prompt file", "empty prompt file", "gamma 0", "negative max_new_tokens", "missing model path",
    "wrong fuser", "unknown fuser", "bad dtype", "bad top_p", "unwritable output dir", "corrupted projector weights",
    "malformed projector json", "unknown projector argument", "temperature nan", "temperature inf",
])
def test_bad_input_exits_2_with_one_line_and_no_results(saved_models, prompts_file, tmp_path, capsys, case):
    extra, message = bad_input_cases(saved_models, tmp_path)[case]
    out = tmp_path / "out"
    try:
        code = demo.main(args_for(saved_models, prompts_file, out) + extra)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and message in err[0], err
    assert results_in(out) == []


def test_mismatched_fuser_names_both_shapes(saved_models, prompts_file, tmp_path, capsys):
    """A fuser saved for another pair (target and draft swapped) is refused with both shapes in one line."""
    import torch

    from c2c.core.fuser import C2CFuser, KVShape, save_fuser
    from tests.tiny import tiny_config

    other = C2CFuser.create(KVShape.of(tiny_config(4, 4, 2, 16)), KVShape.of(tiny_config(2, 2, 1, 32)), hidden_dim=8, intermediate_dim=8, dtype=torch.float32)
    save_fuser(other, tmp_path / "other")
    code = demo.main(args_for(saved_models, prompts_file, tmp_path / "out", "--fuser_checkpoint", str(tmp_path / "other")))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "fuser does not fit the models (draft: 2 layers x 1 KV heads x head_dim 32; target: 4 layers x 2 KV heads x head_dim 16)" in err[0]


def test_a_14b_target_on_cpu_needs_explicit_device_cpu(saved_models, prompts_file, tmp_path, capsys):
    """Checked from the config alone, before any weights would be downloaded."""
    from transformers import Qwen3Config

    big = tmp_path / "qwen3-14b-config-only"
    Qwen3Config(vocab_size=151936, hidden_size=5120, intermediate_size=17408, num_hidden_layers=40,
                num_attention_heads=40, num_key_value_heads=8, head_dim=128).save_pretrained(big)
    args = args_for(saved_models, prompts_file, tmp_path / "out", "--teacher_model", str(big))
    args[args.index("--device") + 1] = "auto"
    if __import__("torch").cuda.is_available():
        pytest.skip("this machine has a GPU; the check is for CPU-only machines")
    code = demo.main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no CUDA GPU found" in err[0] and "--device cpu" in err[0]


def test_shell_wrapper_runs_the_demo_with_passed_arguments(saved_models, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("LANGUAGE", "LC_ALL", "LC_MESSAGES")}
    env |= {"PYTHON": sys.executable, "HF_HUB_OFFLINE": "1", "LANG": "zh_CN.UTF-8"}
    out = tmp_path / "out"
    cmd = [str(ROOT / "run_qwen3_14b_speculative.sh"), "--base_model", str(saved_models / "draft"), "--teacher_model",
           str(saved_models / "target"), "--max_new_tokens", "4", "--device", "cpu", "--fuser_checkpoint", "none",
           "--save_results", "--output_dir", str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(results_in(out)[0].read_text(encoding="utf-8"))
    assert len(data["prompts"]) == 7 and data["prompts"][0]["prompt"] == "请解释量子计算的基本原理。"
    assert "推测解码" in proc.stdout  # Chinese labels in a Chinese locale


def test_a_divergence_is_reported_not_hidden(saved_models, prompts_file, tmp_path, monkeypatch):
    """If the speculative output ever differs (bf16 near-ties on GPUs), the JSON says where and how close."""
    from c2c.core.engine import SpeculativeDecoder

    real_generate = SpeculativeDecoder.generate

    def flipped(self, prompt_ids):
        result = real_generate(self, prompt_ids)
        result.output_ids[2] = (result.output_ids[2] + 1) % 300
        return result

    monkeypatch.setattr(SpeculativeDecoder, "generate", flipped)
    out = tmp_path / "out"
    assert demo.main(args_for(saved_models, prompts_file, out, "--fuser_checkpoint", "none")) == 0
    data = json.loads(results_in(out)[0].read_text(encoding="utf-8"))
    for entry in data["prompts"]:
        comp = entry["comparison"]
        assert comp["outputs_match"] is False and comp["first_divergence"] == 2
        assert comp["divergence_top2_margin"] >= 0
    assert data["summary"]["comparison"]["outputs_match"] is False
    assert data["summary"]["comparison"]["prompts_matching"] == 0


def test_shell_wrapper_leaves_the_prompts_to_a_preset(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("LANGUAGE", "LC_ALL", "LC_MESSAGES")}
    env |= {"PYTHON": sys.executable, "HF_HUB_OFFLINE": "1", "LANG": "zh_CN.UTF-8"}
    out = tmp_path / "out"
    cmd = [str(ROOT / "run_qwen3_14b_speculative.sh"), "--preset", "tiny", "--max_new_tokens", "4",
           "--save_results", "--output_dir", str(out), "--skip_standard"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(results_in(out)[0].read_text(encoding="utf-8"))
    assert data["config"]["prompts_file"].endswith("presets/tiny/prompts.txt")


def test_gamma_above_max_new_tokens_warns_and_stays_small(saved_models, prompts_file, tmp_path, capsys):
    out = tmp_path / "out"
    args = args_for(saved_models, prompts_file, out, "--fuser_checkpoint", "none", "--gamma", "1000") + ["--max_new_tokens", "8"]
    args.remove("--no_warmup")  # the warm-up must be sized by max_new_tokens too
    assert demo.main(args) == 0
    assert "WARNING: --gamma 1000 exceeds" in capsys.readouterr().err
    data = json.loads(results_in(out)[0].read_text(encoding="utf-8"))
    for entry in data["prompts"]:
        assert len(entry["speculative"]["accepted_per_position"]) <= 6 and entry["comparison"]["outputs_match"]
