"""The rough edges a new user hit (issue: a package a user can install, read and trust): paths relative to
where the wrapper runs, prompts longer than the context, a full disk, out-of-range seeds, the API's argument
checks and thread rule, benchmark de-duplication and warnings, a UTF-8 BOM, messages cut mid-word, shipped
configs without build paths, and an offline Hub that fails fast."""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qwen3_14b_speculative_demo as demo
import speculative_benchmark as bench
from c2c.app import loading
from c2c.app.api import SpeculativePipeline
from c2c.errors import UserInputError, clip
from c2c.app.prompts import read_prompts

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)  # the API sets the process's thread count, as the demo does


def demo_args(saved_models, prompts, out, *extra):
    return ["--base_model", str(saved_models / "draft"), "--teacher_model", str(saved_models / "target"),
            "--prompts", str(prompts), "--max_new_tokens", "8", "--device", "cpu", "--no_warmup",
            "--fuser_checkpoint", "none", "--threads", "1", *extra]


def one_error_line(err: str) -> str:
    lines = [x for x in err.splitlines() if x.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_wrapper_paths_are_relative_to_where_it_runs(saved_models, tmp_path):
    work = tmp_path / "elsewhere"
    work.mkdir()
    (work / "my.txt").write_text("Hello there\n", encoding="utf-8")
    run = subprocess.run(["bash", str(ROOT / "run_qwen3_14b_speculative.sh"), *demo_args(saved_models, "my.txt", "x")[:-4],
                          "--fuser_checkpoint", "none", "--save_results", "--output_dir", "myresults", "--skip_standard",
                          "--lang", "en"], cwd=work, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS="1", PYTHON=sys.executable))
    assert run.returncode == 0, run.stderr[-2000:]
    assert len(list((work / "myresults").glob("results_*.json"))) == 1
    # an absolute prompt path and no --output_dir: results go under the folder it runs from, not the repository
    run = subprocess.run(["bash", str(ROOT / "run_qwen3_14b_speculative.sh"), *demo_args(saved_models, work / "my.txt", "x")[:-4],
                          "--fuser_checkpoint", "none", "--save_results", "--skip_standard"], cwd=work,
                         capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHON=sys.executable))
    assert run.returncode == 0, run.stderr[-2000:]
    assert list((work / "output" / "qwen3_speculative").glob("results_*.json"))


def test_a_prompt_longer_than_the_context_is_an_error_before_any_run(saved_models, tmp_path, capsys):
    long = tmp_path / "long.txt"
    long.write_text("short one\n" + "word " * 3000 + "\n", encoding="utf-8")  # the tiny models hold 2,048 positions
    out = tmp_path / "out"
    rc = demo.main(demo_args(saved_models, long, out, "--save_results", "--output_dir", str(out)))
    err = capsys.readouterr().err
    line = one_error_line(err)
    assert rc == 2 and "prompt 2 is" in line and "2,048" in line and "shorten the prompt" in line
    assert not list(out.glob("*.json"))


def test_an_output_that_could_run_past_the_context_is_a_warning(capsys):
    rc = demo.main(["--preset", "arith", "--max_new_tokens", "200", "--no_warmup", "--threads", "1", "--lang", "en"])
    captured = capsys.readouterr()
    assert rc == 0 and "WARNING: prompt 1 is" in captured.err and "lower --max_new_tokens to" in captured.err
    pipe = SpeculativePipeline.from_preset("arith", threads=1)
    with pytest.warns(UserWarning, match="past the models' 128 positions"):
        out = pipe.generate("123+456=", max_new_tokens=200)
    assert out.text.strip() == "579"  # ended at its end token, long before the context


def test_a_full_disk_is_one_error_line_and_leaves_no_files(saved_models, tmp_path, capsys, monkeypatch):
    prompts = tmp_path / "p.txt"
    prompts.write_text("Hello\n", encoding="utf-8")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    out = tmp_path / "out"
    rc = demo.main(demo_args(saved_models, prompts, out, "--save_results", "--output_dir", str(out), "--skip_standard"))
    line = one_error_line(capsys.readouterr().err)
    assert rc == 2 and "No space left on device" in line and "nothing was saved" in line
    assert list(out.iterdir()) == []
    bench_out = tmp_path / "bench"
    rc = bench.main(["--base_model", str(saved_models / "draft"), "--teacher_model", str(saved_models / "target"),
                     "--prompts", str(prompts), "--max_new_tokens", "8", "--device", "cpu", "--gammas", "2",
                     "--modes", "target", "speculative", "--repeats", "1", "--warmup", "0", "--threads", "1",
                     "--fuser_checkpoint", "none", "--output_dir", str(bench_out)])
    line = one_error_line(capsys.readouterr().err)
    assert rc == 2 and "nothing was saved" in line
    assert list(bench_out.iterdir()) == []  # no JSON, no table, no empty plots folder


@pytest.mark.parametrize("seed", ["18446744073709551616", "-1"])
def test_seeds_outside_the_generators_range_exit_2(saved_models, tmp_path, capsys, seed):
    prompts = tmp_path / "p.txt"
    prompts.write_text("Hello\n", encoding="utf-8")
    rc = demo.main(demo_args(saved_models, prompts, tmp_path / "o", "--seed", seed))
    line = one_error_line(capsys.readouterr().err)
    assert rc == 2 and "--seed" in line and "2**64" in line


def test_benchmark_warns_for_skipped_modes_and_runs_repeats_once(saved_models, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("Hello\n", encoding="utf-8")
    rc = bench.main(["--base_model", str(saved_models / "draft"), "--teacher_model", str(saved_models / "target"),
                     "--prompts", str(prompts), "--max_new_tokens", "8", "--device", "cpu", "--gammas", "2", "2", "3",
                     "--modes", "target", "speculative", "speculative", "speculative_fused", "--repeats", "1",
                     "--warmup", "0", "--threads", "1", "--fuser_checkpoint", "none", "--output_dir", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert rc == 0
    assert "mode speculative_fused skipped" in err and "repeated --gammas or --modes" in err
    [path] = (tmp_path / "b").glob("benchmark_*.json")
    data = json.loads(path.read_text())
    assert data["config"]["gammas"] == [2, 3] and "gamma" not in data["config"]
    assert [(r["mode"], r["gamma"]) for r in data["rows"]] == [("target", None), ("speculative", 2), ("speculative", 3)]
    stamp = path.stem.removeprefix("benchmark_")
    assert all(f"plots_{stamp}" in p for p in data["plots"])  # one time stamp for the run's files


def test_a_byte_order_mark_is_not_part_of_the_first_prompt(tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes("\ufeffFirst prompt\nSecond\n".encode("utf-8"))
    assert read_prompts(path) == ["First prompt", "Second"]


def test_messages_are_cut_at_a_word_boundary():
    text = "invalid load key, 'x'. This file was probably written by something that is not torch.save at all " * 3
    cut = clip(text, 60)
    assert len(cut) <= 60 and cut.endswith("...") and text.startswith(cut[:-3])
    assert text[len(cut) - 3] == " " or text[len(cut) - 3 : len(cut) - 2] in (",", ".")
    assert clip("short") == "short"


def test_shipped_fuser_configs_name_the_shipped_models():
    for config in ROOT.glob("presets/*/fuser*/config.json"):
        data = json.loads(config.read_text())
        for value in (data["model"]["base_model"], data["model"]["teacher_model"], data["training"]["output_dir"]):
            assert value.startswith("presets/"), (config, value)


def test_offline_hub_fails_fast_with_a_clear_message(monkeypatch):
    monkeypatch.setattr(loading, "_HUB_STATE", {"offline": True})
    with pytest.raises(UserInputError, match="can't be reached .* not in the local cache"):
        loading.load_config("Qwen/Qwen3-14B-not-cached-here", "target")


@pytest.mark.parametrize("call, words", [
    (lambda p: p.generate(["a", "b"]), "call generate once per prompt"),
    (lambda p: p.generate(None), "must be a string"),
    (lambda p: p.generate("   "), "empty"),
    (lambda p: p.generate("a", gamma="4"), "gamma must be an integer"),
    (lambda p: p.generate("a", top_k=2.5), "top_k must be an integer"),
    (lambda p: p.generate("a", max_new_tokens=0), "max_new_tokens must be >= 1"),
    (lambda p: p.generate("a", temperature=float("nan")), "temperature must be a finite number"),
    (lambda p: p.generate("a", seed=2**64), "seed must be between"),
    (lambda p: p.generate("a", compare="yes"), "compare must be True or False"),
    (lambda p: p.generate("a", stream=42), "stream must be a text file"),
])
def test_api_arguments_are_checked_with_the_fix_named(call, words):
    pipe = SpeculativePipeline.from_preset("arith", threads=1)
    with pytest.raises(UserInputError, match=words):
        call(pipe)


def test_api_sets_the_demos_thread_rule_and_loads_presets_from_anywhere(tmp_path):
    code = ("import torch\nfrom c2c.app.api import SpeculativePipeline\n"
            "pipe = SpeculativePipeline.from_preset('arith')\n"
            "out = pipe.generate('123+456=', max_new_tokens=8)\n"
            "print(torch.get_num_threads(), out.text.strip())\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="", HF_HUB_OFFLINE="1"))
    assert run.returncode == 0, run.stderr[-2000:]
    threads, text = run.stdout.split(maxsplit=1)
    assert int(threads) == max(1, (os.cpu_count() or 2) // 2) and text.strip() == "579"
    with pytest.raises(UserInputError, match="threads must be"):
        SpeculativePipeline.from_preset("arith", threads=-1)


def test_demo_help_describes_it_in_whole_sentences(capsys):
    with pytest.raises(SystemExit):
        demo.main(["--help"])
    out = capsys.readouterr().out
    description = out.split("\n\n")[1]
    assert description.rstrip().endswith("draft.") and "feeds the target's KV cache" in " ".join(description.split())


def test_stream_labels_follow_the_report_language(saved_models, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("Hello\n", encoding="utf-8")
    rc = demo.main(demo_args(saved_models, prompts, tmp_path / "o", "--stream", "--lang", "zh", "--no_color"))
    out = capsys.readouterr().out
    assert rc == 0 and "图例" in out and "标准 (仅目标模型):" in out and "推测解码 (gamma 4):" in out
    assert "legend" not in out and "standard (target only)" not in out


def test_compile_is_the_default_on_cuda_only():
    from c2c.app.runner import choose_compile

    assert choose_compile(None, "cpu") is False
    assert choose_compile(True, "cpu") is True and choose_compile(False, "cuda") is False
    assert choose_compile(None, "auto") is torch.cuda.is_available()
    parser = demo.build_parser()
    assert parser.parse_args([]).compile is None
    assert parser.parse_args(["--no_compile"]).compile is False and parser.parse_args(["--no-compile"]).compile is False
    assert parser.parse_args(["--compile"]).compile is True


def test_hub_check_respects_offline_flag_and_proxies(monkeypatch):
    monkeypatch.setattr(loading, "_HUB_STATE", {})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert loading.hub_offline() is True
    monkeypatch.setattr(loading, "_HUB_STATE", {})
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    assert loading.hub_offline() is False  # no direct probe behind a proxy: the Hub client decides
    monkeypatch.setattr(loading, "_HUB_STATE", {})
    monkeypatch.delenv("HTTPS_PROXY")
    for name in ("https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port here
    assert loading.hub_offline() is True
    monkeypatch.setattr(loading, "_HUB_STATE", {"offline": True})  # the suite runs offline


def test_trainer_says_nothing_about_token_indices_on_long_texts(saved_models, tmp_path):
    import shutil

    target = tmp_path / "target"
    shutil.copytree(saved_models / "target", target)
    config = json.loads((target / "tokenizer_config.json").read_text())
    (target / "tokenizer_config.json").write_text(json.dumps(config | {"model_max_length": 64}))
    data = tmp_path / "long.txt"
    data.write_text("The quick brown fox jumps over the lazy dog. " * 400, encoding="utf-8")
    run = subprocess.run([sys.executable, "-m", "c2c.tools.train_fuser", "--base_model", str(saved_models / "draft"),
                          "--teacher_model", str(target), "--data", str(data), "--output_dir", str(tmp_path / "f"),
                          "--steps", "1", "--batch_size", "2", "--seq_len", "32", "--hidden_dim", "8",
                          "--intermediate_dim", "8", "--eval_every", "1", "--eval_tokens", "8", "--device", "cpu",
                          "--threads", "1", "--no_progress"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert run.returncode == 0, run.stderr[-1500:]
    assert "Token indices" not in run.stderr + run.stdout
