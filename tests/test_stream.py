"""Streamed output, per-round records and the Python API: streaming changes nothing, records add up."""

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qwen3_14b_speculative_demo as demo
import speculative_benchmark as bench
from c2c.core import engine
from c2c.app.api import SpeculativePipeline
from c2c.core.engine import SpecConfig, SpeculativeDecoder, standard_generate
from c2c.app.presets import PRESET_ROOT
from c2c.core.sampling import SamplingConfig
from c2c.app.stream import StreamPrinter, TextStream, legend, use_colour

ROOT = Path(__file__).resolve().parent.parent
TINY = PRESET_ROOT / "tiny"
MARKS = re.compile(r"[\[\]<>{}]")
ANSI = re.compile(r"\033\[[0-9;]*m")


@pytest.fixture(scope="module")
def pipe():
    return SpeculativePipeline.load(str(TINY / "draft"), str(TINY / "target"), fuser=str(TINY / "fuser"), device="cpu",
                                    dtype="float32")


def check_rounds(rounds: list[dict], ids: list[int]) -> None:
    """The records replay the output: tokens add up, accepted drafts are the draft's own guesses."""
    assert [r["round"] for r in rounds] == list(range(len(rounds)))
    assert rounds[0]["drafted"] == 0 and len(rounds[0]["tokens"]) == 1
    assert [t for r in rounds for t in r["tokens"]] == ids
    for r in rounds[1:]:
        assert len(r["drafted_ids"]) == r["drafted"] and 0 <= r["accepted"] <= r["drafted"]
        n = min(r["accepted"], len(r["tokens"]))
        assert r["tokens"][:n] == r["drafted_ids"][:n]
        if r["accepted"] < r["drafted"] and len(r["tokens"]) > r["accepted"]:  # the correction differs from the guess
            assert r["tokens"][r["accepted"]] != r["drafted_ids"][r["accepted"]]


@pytest.mark.parametrize("settings", [
    dict(),  # greedy, fusion on
    dict(prefill_fusion=False, decode_fusion=False),
    dict(temperature=0.9, top_k=50, seed=3),
    dict(temperature=0.7, prefill_fusion=False, decode_fusion=False, seed=1),
])
def test_streamed_text_equals_the_final_text_and_rounds_add_up(pipe, settings):
    for colour in (False, True):
        sink = io.StringIO()
        out = pipe.generate("To be, or not to be", max_new_tokens=40, gamma=3, compare=True, rounds=True, stream=sink,
                            color=colour, **settings)
        written = sink.getvalue()
        assert written.startswith("standard (target only):\n")
        body = written.split("speculative (gamma 3):\n", 1)[1].removesuffix("\n")
        if colour:
            assert "\033[" in written
            assert ANSI.sub("", body) == out.text
        else:
            assert "\033[" not in written and MARKS.sub("", body) == MARKS.sub("", out.text)
        assert out.ids == out.standard["output_ids"] or settings.get("temperature")  # greedy: the target's own
        check_rounds(out.rounds, out.ids)
        assert len(out.rounds) == out.metrics["rounds"] + 1
        assert sum(r["accepted"] for r in out.rounds) == out.metrics["total_accepted"]
        assert sum(r["drafted"] for r in out.rounds) == out.metrics["total_drafted"]


def test_printer_pieces_follow_the_round_records(pipe):
    printer = StreamPrinter(pipe.session.tokenizer, io.StringIO(), colour=False)
    records = []

    def hook(info):
        records.append(info)
        printer.round(info)

    ids = pipe.session.tokenizer("Now is the winter")["input_ids"]
    with torch.inference_mode():
        result = SpeculativeDecoder(pipe.session.target, pipe.session.draft, SpecConfig(4, 30), SamplingConfig(),
                                    pipe.session.eos_ids, fuser=pipe.session.fuser, on_round=hook).generate(ids)
    printer.end()
    text = pipe.session.tokenizer.decode(result.output_ids, skip_special_tokens=True)
    assert printer.streamed_text() == text
    kinds = [k for k, _ in printer.pieces]
    assert set(kinds) <= {"draft", "correction", "bonus", "plain"} and "correction" in kinds and "draft" in kinds
    rejected = sum(1 for info in records[1:] if info.accepted < info.drafted and len(info.tokens) > info.accepted)
    assert kinds.count("correction") <= rejected and kinds[0] == "bonus"  # the prefill's token comes first


def test_standard_run_streams_plain_tokens(pipe):
    printer = StreamPrinter(pipe.session.tokenizer, io.StringIO(), colour=False)
    ids = pipe.session.tokenizer("Now is the winter")["input_ids"]
    seen = []
    with torch.inference_mode():
        result = standard_generate(pipe.session.target, ids, 30, SamplingConfig(), pipe.session.eos_ids,
                                   on_token=lambda t: (seen.append(t), printer.token(t)))
    printer.end()
    assert seen == result.output_ids
    assert printer.streamed_text() == pipe.session.tokenizer.decode(result.output_ids, skip_special_tokens=True)
    assert {k for k, _ in printer.pieces} == {"plain"}


class ByteTokenizer:
    """Each id is one byte: a multi-byte character arrives split over several tokens."""

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode("utf-8", errors="replace")


def test_a_character_split_over_tokens_waits_until_it_is_whole():
    data = list("é世 ok".encode("utf-8"))
    stream = TextStream(ByteTokenizer())
    pieces = [stream.push([b]) for b in data] + [stream.flush()]
    assert "".join(pieces) == "é世 ok" and all("\ufffd" not in p for p in pieces)


def test_colour_only_on_a_terminal_and_never_with_no_color():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    assert use_colour(Tty()) and not use_colour(Tty(), no_color=True) and not use_colour(io.StringIO())
    assert "\033[" in legend(True) and "\033[" not in legend(False) and "[" in legend(False)


def test_hook_time_is_left_out_of_the_latency(target, draft, monkeypatch):
    """A fake clock: each hook call costs 1,000 'seconds', the rest 1 per reading; the latency stays small."""
    now = [0.0]

    def clock():
        now[0] += 1.0
        return now[0]

    def slow_hook(*_):
        now[0] += 1000.0

    monkeypatch.setattr(engine.time, "perf_counter", clock)
    prompt = [5, 9, 33, 100, 7]
    with torch.inference_mode():
        spec = SpeculativeDecoder(target, draft, SpecConfig(3, 20), SamplingConfig(), set(), on_round=slow_hook).generate(prompt)
        std = standard_generate(target, prompt, 20, SamplingConfig(), set(), on_token=slow_hook)
    assert spec.latency < 1000 and std.latency < 1000
    assert spec.counters.times["callback"] >= 1000 * (spec.counters.rounds + 1)
    assert spec.counters.times["draft"] < 1000 and std.counters.times["callback"] >= 1000 * len(std.output_ids)


def test_demo_streams_and_saves_rounds(tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--preset", "tiny", "--max_new_tokens", "24", "--stream", "--save_results", "--save_rounds",
            "--output_dir", str(out), "--lang", "en"]
    assert demo.main(args) == 0
    printed = capsys.readouterr().out
    data = json.loads(next(out.glob("results_*.json")).read_text(encoding="utf-8"))
    assert printed.count("legend:") == 1 and "\033[" not in printed  # captured stdout is no terminal
    for p in data["prompts"]:
        spec = p["speculative"]
        check_rounds(spec["round_records"], spec["output_ids"])
        streamed = printed.split("speculative (gamma 4):\n", 1)[1]
        printed = streamed
        assert MARKS.sub("", streamed).startswith(MARKS.sub("", spec["text"]))
        assert p["comparison"]["outputs_match"]


def test_save_rounds_without_save_results_is_a_clear_error(capsys):
    assert demo.main(["--preset", "tiny", "--save_rounds"]) == 2
    assert "--save_results" in capsys.readouterr().err


def test_benchmark_saves_rounds_that_add_up(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("To be, or not to be\nNow is the winter\n", encoding="utf-8")
    args = ["--preset", "tiny", "--prompts", str(prompts), "--gammas", "3", "--modes", "target", "speculative_fused",
            "--repeats", "2", "--warmup", "0", "--max_new_tokens", "16", "--no_plots", "--save_rounds",
            "--output_dir", str(tmp_path)]
    assert bench.main(args) == 0
    data = json.loads(next(tmp_path.glob("benchmark_*.json")).read_text(encoding="utf-8"))
    rows = {r["mode"]: r for r in data["rows"]}
    assert "round_records" not in rows["target"]
    fused = rows["speculative_fused"]
    assert len(fused["round_records"]) == 2 and isinstance(fused["rounds"], int)
    for rounds, ids in zip(fused["round_records"], fused["output_ids"]):
        check_rounds(rounds, ids)


def test_the_readme_python_example_runs_offline():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Use from Python"):]
    code = section[section.index("```python") + len("```python"): section.index("```", section.index("```python") + 9)]
    run = subprocess.run([sys.executable, "-"], input=code, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"))
    assert run.returncode == 0, run.stderr[-2000:]
    assert "same as the target alone: True" in run.stdout and "draft guessed" in run.stdout
    assert "speculative (gamma 4):" in run.stdout and "accepted length" in run.stdout
