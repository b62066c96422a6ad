"""The first minutes of a new user (issue 23): a run with no GPU and no Hub says what to do now, the
report speaks the user's locale, generation stops at the models' context and says so, Ctrl-C keeps
the finished prompts, and the Python API warns where the demo warns, in its own terms."""

import json
import warnings

import pytest

import qwen3_14b_speculative_demo as demo
from c2c.app import api, runner
from c2c.app.cli import default_lang
from c2c.errors import UserInputError


@pytest.mark.parametrize("environ, lang", [({"LANG": "zh_CN.UTF-8"}, "zh"), ({"LANG": "en_US.UTF-8"}, "en"),
                                           ({}, "en"), ({"LANG": "C.UTF-8"}, "en"),
                                           ({"LANGUAGE": "zh_TW:en", "LANG": "en_US.UTF-8"}, "zh"),
                                           ({"LC_ALL": "de_DE.UTF-8", "LANG": "zh_CN.UTF-8"}, "en"),
                                           ({"LANGUAGE": "zh_CN", "LC_ALL": "C"}, "en")])
def test_the_report_language_follows_the_locale(environ, lang):
    assert default_lang(environ) == lang


def test_without_locale_variables_the_system_locale_decides():
    assert default_lang({}, "Chinese (Simplified)_China") == "zh" and default_lang({}, "zh_CN") == "zh"
    assert default_lang({}, "English_United States") == "en" and default_lang({"LANG": "en_US"}, "zh_CN") == "en"


def test_no_gpu_and_no_hub_names_the_tiny_preset(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(runner, "resolve_device", lambda name: __import__("torch").device("cpu"))
    monkeypatch.setattr(runner.torch.cuda, "is_available", lambda: False)
    rc = demo.main(["--base_model", "nobody/draft-not-cached", "--teacher_model", "nobody/target-not-cached",
                    "--output_dir", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ")
    assert "--preset tiny" in err[0] and "local folder" in err[0] and "CPU build of torch" in err[0]


def test_the_api_names_its_own_way_out(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(runner, "resolve_device", lambda name: __import__("torch").device("cpu"))
    monkeypatch.setattr(runner.torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserInputError, match=r"from_preset\('tiny'\)"):
        api.SpeculativePipeline.load("nobody/draft-not-cached", "nobody/target-not-cached")


def test_the_api_warns_where_the_demo_warns_in_argument_names():
    pipe = api.SpeculativePipeline.from_preset("tiny", threads=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe.generate("To be, or not to be", max_new_tokens=8, gamma=100)
    messages = [str(w.message) for w in caught]
    assert any(m.startswith("gamma 100 exceeds what max_new_tokens 8 allows") for m in messages), messages
    assert not any("--" in m for m in messages)


def test_generation_stops_at_the_context_and_says_so(tmp_path, capsys, monkeypatch):
    prompts = tmp_path / "p.txt"
    prompts.write_text("To be, or not to be\nO Romeo, Romeo\n", encoding="utf-8")
    monkeypatch.setattr(runner, "context_length", lambda session: 40)  # a short context: the output reaches it
    rc = demo.main(["--preset", "tiny", "--prompts", str(prompts), "--max_new_tokens", "500", "--save_results",
                    "--output_dir", str(tmp_path / "o"), "--lang", "en", "--threads", "1"])
    captured = capsys.readouterr()
    assert rc == 0
    data = json.loads(next((tmp_path / "o").glob("results_*.json")).read_text())
    for entry in data["prompts"]:
        room = 40 - entry["prompt_tokens"] - data["config"]["gamma"] - 1
        assert entry["max_new_tokens"] == room and len(entry["speculative"]["output_ids"]) <= room
        assert entry["stopped_at_context"] == (len(entry["speculative"]["output_ids"]) == room)
        assert entry["comparison"]["outputs_match"]
    assert any(e["stopped_at_context"] for e in data["prompts"])
    assert "Stopped at the models' context" in captured.out and "generation stops there" in captured.err


def test_ctrl_c_keeps_the_finished_prompts_marked_interrupted(tmp_path, capsys, monkeypatch):
    real, calls = runner.run_prompt, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "run_prompt", interrupted)
    rc = demo.main(["--preset", "tiny", "--max_new_tokens", "8", "--save_results", "--output_dir", str(tmp_path / "o"),
                    "--lang", "en", "--threads", "1"])
    err = capsys.readouterr().err
    assert rc == 130
    [path] = list((tmp_path / "o").glob("results_*.json"))
    data = json.loads(path.read_text())
    assert data["interrupted"] is True and len(data["prompts"]) == 1 and data["summary"]["num_prompts"] == 1
    assert "after 1 of 7 prompts" in err and str(path) in err
    monkeypatch.setattr(runner, "run_prompt", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    assert demo.main(["--preset", "tiny", "--save_results", "--output_dir", str(tmp_path / "p"), "--threads", "1"]) == 130
    assert "no prompt had finished: nothing was saved" in capsys.readouterr().err
    assert not (tmp_path / "p").exists() or not list((tmp_path / "p").glob("results_*.json"))


def test_no_room_for_drafts_is_gamma_zero_and_says_so(tmp_path, capsys):
    rc = demo.main(["--preset", "tiny", "--max_new_tokens", "2", "--gamma", "4", "--save_results", "--output_dir",
                    str(tmp_path / "o"), "--lang", "en", "--threads", "1"])
    out = capsys.readouterr().out
    data = json.loads(next((tmp_path / "o").glob("results_*.json")).read_text())
    assert rc == 0
    for entry in data["prompts"]:
        sp = entry["speculative"]
        assert sp["gamma"] == 0 and sp["gamma_requested"] == 4 and list(sp["tokens_per_round_histogram"]) == ["1"]
    lines = out.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("Latency speedup:") and float(line.split()[2].rstrip("x")) < 1:
            assert lines[i + 1].startswith("Measured") and "no round drafted a token" in lines[i + 1]


def test_the_benchmark_stops_at_the_context_too(tmp_path, monkeypatch):
    import speculative_benchmark

    monkeypatch.setattr(runner, "context_length", lambda session: 30)
    prompts = tmp_path / "p.txt"
    prompts.write_text("To be, or not to be\n", encoding="utf-8")
    assert speculative_benchmark.main(["--preset", "tiny", "--prompts", str(prompts), "--max_new_tokens", "200",
                                       "--gammas", "2", "4", "--modes", "target", "speculative", "--repeats", "1",
                                       "--warmup", "1", "--no_plots", "--threads", "1", "--output_dir", str(tmp_path / "b")]) == 0
    data = json.loads(next((tmp_path / "b").glob("benchmark_*.json")).read_text())
    for row in data["rows"]:
        assert row["context_capped_prompts"] == 1 and row["outputs_match_target"]
        assert all(len(ids) < 30 for ids in row["output_ids"])  # stopped inside the 30 positions


def test_a_compiled_warm_up_stops_at_the_context_as_the_runs_do(monkeypatch):
    from types import SimpleNamespace

    from c2c.core.engine import cache_sizes

    session = SimpleNamespace(compiled=object())
    monkeypatch.setattr(runner, "context_length", lambda s: 2048)
    prompts = [[1] * 2009, [1] * 2000, [1] * 10]
    chosen = runner.warm_prompts(session, prompts, 1_000_000, 4)
    sizes = {cache_sizes(len(p), runner.context_room(session, len(p), 1_000_000, 4), 4) for p in prompts}
    assert len(chosen) == len(sizes) and max(max(s) for s in sizes) <= 2304  # not a million-position cache


def test_the_api_says_when_the_context_stopped_it(monkeypatch):
    pipe = api.SpeculativePipeline.from_preset("tiny", threads=1)
    monkeypatch.setattr(runner, "context_length", lambda session: 24)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = pipe.generate("To be, or not to be", max_new_tokens=200)
    assert out.max_new_tokens < 200 and out.stopped_at_context == (len(out.ids) == out.max_new_tokens)


def test_only_a_measured_loss_gets_what_would_have_to_change():
    from c2c.app.report import Report

    lines = []
    e = {"measured_speedup": 1.2, "predicted_speedup": 0.9, "prefill_share": 0.1, "tokens_per_round": 2.0,
         "expected_tokens_per_round": 2.2, "gamma": 4, "alpha": 0.6, "cost_ratio_c": 0.3, "c_needed": 0.3,
         "alpha_needed": 0.7, "theoretical_speedup": 0.9, "verify_steps": 1.1}
    assert "to pay" not in Report("en", write=lines.append).explanation(e)
    assert "c unknown" in Report("en").explanation(e | {"measured_speedup": 0.8, "cost_ratio_c": None})


@pytest.mark.parametrize("lang, label", [("en_US.UTF-8", "Speculative decoding"), ("zh_CN.UTF-8", "推测解码")])
def test_the_demo_speaks_the_locale_without_lang(tmp_path, capsys, monkeypatch, lang, label):
    for name in ("LANGUAGE", "LC_ALL", "LC_MESSAGES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LANG", lang)
    assert demo.main(["--preset", "tiny", "--max_new_tokens", "4", "--threads", "1", "--output_dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert label in out and ("推测解码" not in out if lang.startswith("en") else "Speculative decoding" not in out)


def test_the_benchmark_says_where_its_table_and_plots_went(tmp_path, capsys):
    import speculative_benchmark

    assert speculative_benchmark.main(["--preset", "tiny", "--gammas", "2", "--modes", "target", "speculative",
                                       "--repeats", "1", "--warmup", "0", "--num_prompts", "1", "--max_new_tokens", "8",
                                       "--threads", "1", "--output_dir", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    table, plots = next(tmp_path.glob("benchmark_*.md")), next(tmp_path.glob("plots_*"))
    assert f"table: {table}" in err and f"plots: {plots} (" in err
