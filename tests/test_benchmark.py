"""The benchmark harness on tiny saved models: every mode runs, outputs match, files and last line."""

import json

import pytest

import speculative_benchmark as bench
from c2c.app.benchmark import ALL_MODES

ROW_KEYS = {"mode", "gamma", "tree", "parallel", "tokens_per_second", "latency", "average_accepted_length", "acceptance_rate", "outputs_match_target"}


@pytest.fixture(scope="module")
def bench_run(saved_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    prompts = out / "prompts.txt"
    prompts.write_text("What is 1 + 1?\n请解释量子计算的基本原理。\n", encoding="utf-8")
    args = ["--base_model", str(saved_models / "draft"), "--teacher_model", str(saved_models / "target"),
            "--fuser_checkpoint", str(saved_models / "fuser"), "--prompts", str(prompts), "--device", "cpu",
            "--gammas", "2", "3", "--repeats", "2", "--warmup", "1", "--max_new_tokens", "12", "--output_dir", str(out)]
    return args, out


def test_every_mode_runs_and_matches_the_target(bench_run, capsys):
    args, out = bench_run
    assert bench.main(args) == 0
    stdout = capsys.readouterr().out.strip().splitlines()
    last = json.loads(stdout[-1])
    assert last["output_dir"] == str(out)
    rows = last["results"]
    assert {r["mode"] for r in rows} == set(ALL_MODES)
    assert all(set(r) == ROW_KEYS for r in rows)
    assert all(r["outputs_match_target"] is True for r in rows)
    assert {(r["mode"], r["gamma"]) for r in rows if r["mode"] == "speculative"} == {("speculative", 2), ("speculative", 3)}
    for r in rows:
        if r["mode"].startswith("speculative"):
            assert 0 <= r["acceptance_rate"] <= 1 and r["average_accepted_length"] >= 1

    [path] = out.glob("benchmark_*.json")
    data = json.loads(path.read_text(encoding="utf-8"))
    assert {"config", "environment", "rows", "table", "plots"} <= set(data)
    assert data["config"]["command"] and data["environment"]["torch"]
    spec = next(r for r in data["rows"] if r["mode"] == "speculative_fused" and r["gamma"] == 3)
    assert len(spec["accepted_per_position"]) == 3
    assert set(spec["round_time_split"]) == {"draft", "target", "fusion", "overhead"} and spec["fused_tokens"] > 0
    assert spec["predicted_speedup"] is not None and len(spec["latencies"]) == 2
    for r in data["rows"]:  # the per-token estimate never undercounts: it leaves out the drafts after a rejection
        if r["mode"].startswith("speculative"):
            assert r["acceptance_probability"] >= r["acceptance_rate"]
    assert path.with_suffix(".md").read_text().startswith("| mode |")
    pngs = [p for p in data["plots"]]
    assert len(pngs) == 3
    for p in pngs:
        assert open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_fused_modes_are_skipped_without_a_fuser(bench_run, tmp_path, capsys):
    args, _ = bench_run
    args = list(args)
    args[args.index("--fuser_checkpoint") + 1] = "none"
    args[args.index("--output_dir") + 1] = str(tmp_path)
    args += ["--modes", "target", "speculative", "speculative_fused", "--no_plots", "--repeats", "1"]
    assert bench.main(args) == 0
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["results"]
    assert [r["mode"] for r in rows] == ["target", "speculative", "speculative"]
    data = json.loads(next(tmp_path.glob("benchmark_*.json")).read_text())
    assert "speculative_fused" in data["config"]["skipped_modes"]


@pytest.mark.parametrize("extra, message", [
    (["--repeats", "0"], "--repeats"),
    (["--num_prompts", "0"], "--num_prompts must be >= 1"),
    (["--num_prompts", "-1"], "--num_prompts must be >= 1"),
    (["--output_dir", "FILE"], "cannot write to --output_dir"),
])
def test_bad_arguments_exit_2_before_any_run(bench_run, tmp_path, capsys, extra, message):
    args, _ = bench_run
    if "FILE" in extra:
        (tmp_path / "file").write_text("x")
        extra = ["--output_dir", str(tmp_path / "file")]
    assert bench.main(args + extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_ctrl_c_prints_one_line_and_exits_130(bench_run, monkeypatch, tmp_path, capsys):
    from c2c.app import runner

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "prepare", interrupted)
    args, _ = bench_run
    args = list(args)
    args[args.index("--output_dir") + 1] = str(tmp_path)
    assert bench.main(args) == 130
    assert capsys.readouterr().err.strip().splitlines() == ["interrupted (Ctrl-C): nothing was saved"]
    assert not list(tmp_path.iterdir())


def test_tree_rows_run_beside_the_chains(tmp_path, capsys):
    import speculative_benchmark

    assert speculative_benchmark.main(["--preset", "tiny", "--gammas", "2", "--trees", "8,3,2", "--modes", "target",
                                       "speculative", "speculative_fused", "--repeats", "1", "--warmup", "0", "--no_plots",
                                       "--threads", "1", "--num_prompts", "2", "--max_new_tokens", "16",
                                       "--output_dir", str(tmp_path)]) == 0
    data = json.loads(next(tmp_path.glob("benchmark_*.json")).read_text())
    trees = [r for r in data["rows"] if r["tree"]]
    assert [r["mode"] for r in trees] == ["speculative", "speculative_fused"]
    assert all(r["tree"] == {"budget": 8, "depth": 3, "top_k": 2} and r["gamma"] is None and r["outputs_match_target"]
               for r in trees)
    assert "| speculative | tree 8/3/2 |" in capsys.readouterr().out
    for flags, expected in ((["--trees", "8,3"], "BUDGET,DEPTH,TOPK"),
                            (["--trees", "2,3,2"], "--trees 2,3,2: BUDGET 2 is smaller than DEPTH 3")):
        assert speculative_benchmark.main(["--preset", "tiny", "--output_dir", str(tmp_path), *flags]) == 2
        assert expected in capsys.readouterr().err


def test_plots_tell_parallel_and_tree_rows_from_chains(tmp_path):
    """The category and round-split plots label a parallel row 'parallel 4' and a tree row 'tree
    8/3/2', as the tables do (benchmark.tree_label), not 'gamma 4' like the chain beside them."""
    from c2c.app import plots

    real = plots._pyplot()
    figures = []

    class Keep:  # pyplot, but the figures are kept open for reading
        def __getattr__(self, name):
            return getattr(real, name)

        def close(self, fig):
            figures.append(fig)

    split = {"draft": 0.001, "target": 0.002, "fusion": 0.0, "overhead": 0.0001}
    rows = [{"mode": "speculative", "gamma": 4, "tree": None, "parallel": parallel, "round_time_split": split,
             "by_category": {"math": {"speedup_vs_target": 1.2}}} for parallel in (False, True)]
    rows.append({"mode": "speculative", "gamma": 4, "tree": {"budget": 8, "depth": 3, "top_k": 2}, "parallel": False,
                 "round_time_split": split, "by_category": {"math": {"speedup_vs_target": 1.1}}})
    plots._categories(Keep(), rows, tmp_path)
    plots._round_split(Keep(), rows, tmp_path)
    legend = figures[0].axes[0].get_legend_handles_labels()[1]
    ticks = [t.get_text() for t in figures[1].axes[0].get_xticklabels()]
    assert legend == ["speculative gamma 4", "speculative parallel 4", "speculative tree 8/3/2"]
    assert ticks == ["spec g=4", "spec parallel 4", "spec tree 8/3/2"]
    for fig in figures:
        real.close(fig)
