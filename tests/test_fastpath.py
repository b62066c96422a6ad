"""The fast path: static caches and compiled steps give the same ids; the synthetic timing mode runs."""

import json
import sys
from pathlib import Path

import pytest
import torch

import speculative_benchmark as bench
from c2c.core import cache as kv
from c2c.tools import synthetic
from c2c.core.engine import CompiledSteps, SpecConfig, SpeculativeDecoder, standard_generate
from c2c.core.sampling import SamplingConfig

PROMPT = [5, 9, 33, 100, 7, 61, 2, 44, 3]


@pytest.fixture(scope="module")
def reference(target):
    with torch.inference_mode():
        return standard_generate(target, PROMPT, 40, SamplingConfig(), set()).output_ids


@pytest.fixture(scope="module")
def traced():
    """Dynamo tracing with the eager backend: the compiled plumbing without C++ code generation."""
    return CompiledSteps(backend="eager")


def test_static_cache_rolls_back_by_moving_the_write_position(target):
    cache = kv.new_cache(target, 32)
    with torch.inference_mode():
        full = kv.forward(target, torch.tensor([PROMPT]), cache, 0)
        kv.crop(cache, 4)
        assert kv.length(cache) == 4
        again = kv.forward(target, torch.tensor([PROMPT[4:]]), cache, 4)
    assert torch.allclose(full[:, 4:], again, atol=1e-5)


@pytest.mark.parametrize("gamma", [1, 3, 5])
@pytest.mark.parametrize("fused", [False, True])
def test_compiled_path_gives_the_eager_ids(target, draft, fuser, reference, traced, gamma, fused):
    rounds = []
    with torch.inference_mode():
        standard = standard_generate(target, PROMPT, 40, SamplingConfig(), set(), compiled=traced).output_ids
        result = SpeculativeDecoder(target, draft, SpecConfig(gamma, 40), SamplingConfig(), set(),
                                    fuser=fuser if fused else None, compiled=traced, on_round=rounds.append).generate(PROMPT)
    assert standard == reference and result.output_ids == reference
    assert all(r.target_cache == r.committed - 1 for r in rounds)  # the write position follows the committed length


def test_compiled_runs_reuse_one_emptied_cache_and_stay_lossless(target, draft, fuser):
    """CUDA graphs replay only on fixed addresses, so compiled runs share one static cache per model and
    size; a long prompt's leftovers must not leak into the next, shorter prompt's output."""
    compiled = CompiledSteps(backend="eager")
    long_prompt, short_prompt = PROMPT * 5, PROMPT[:3]
    outputs, caches = [], []
    with torch.inference_mode():
        for prompt in (long_prompt, short_prompt, long_prompt):
            engine = SpeculativeDecoder(target, draft, SpecConfig(3, 40), SamplingConfig(), set(), fuser=fuser,
                                        compiled=compiled)
            outputs.append(engine.generate(prompt).output_ids)
            caches.append((engine.target_cache, engine.draft_cache))
        expected = [standard_generate(target, p, 40, SamplingConfig(), set()).output_ids
                    for p in (long_prompt, short_prompt, long_prompt)]
        again = standard_generate(target, short_prompt, 40, SamplingConfig(), set(), compiled=compiled).output_ids
    assert outputs == expected and again == expected[1]
    assert caches[0][0] is caches[1][0] is caches[2][0] and caches[0][1] is caches[1][1]
    assert caches[0][0] is not caches[0][1]


def test_compiled_sampling_repeats_the_eager_run(target, draft, fuser, traced):
    sampling = SamplingConfig(temperature=0.8, top_k=40)

    def run(compiled):
        gen = torch.Generator().manual_seed(5)
        with torch.inference_mode():
            return SpeculativeDecoder(target, draft, SpecConfig(3, 30), sampling, set(), fuser=fuser, generator=gen,
                                      compiled=compiled).generate(PROMPT).output_ids

    assert run(traced) == run(None)


def test_inductor_compiled_path_gives_the_eager_ids(target, draft, fuser, reference):
    """The real default backend (C++ code generation on CPU, CUDA graphs on GPU), from a clean dynamo state."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled = CompiledSteps()
    with torch.inference_mode():
        result = SpeculativeDecoder(target, draft, SpecConfig(4, 40), SamplingConfig(), set(), fuser=fuser,
                                    compiled=compiled).generate(PROMPT)
    assert result.output_ids == reference
    assert counters["stats"]["unique_graphs"] >= 3  # draft step, verify step and fusion window really were compiled


def test_forced_acceptance_is_timing_only_and_accepts_everything(target, draft):
    with torch.inference_mode():
        result = SpeculativeDecoder(target, draft, SpecConfig(4, 21), SamplingConfig(), set(), force_accept=True).generate(PROMPT)
    c = result.counters
    assert c.total_accepted == c.total_drafted == 16 and c.tokens_per_round == {5: 4}  # 1 + 4 rounds x (4 + 1)


def test_synthetic_mode_times_every_part_at_tiny_sizes():
    out = synthetic.run("tiny", torch.device("cpu"), torch.float32, [2, 3], iters=2, warmup=1, compile_steps=False,
                        new_tokens=12, log=lambda *_: None)
    for key in ("target_step_eager", "draft_step_eager", "target_verify_3_eager", "target_verify_4_eager", "fusion_4_tokens"):
        assert out["steps"][key]["seconds"] > 0
    assert out["steps"]["target_step_eager"]["floor_ms"] is None  # no bandwidth figure for a CPU
    assert set(out["rounds_forced_accept"][3]) >= {"draft", "target", "fusion", "overhead"}
    pred = out["prediction"]["0.7"]
    assert set(pred["per_gamma"]) == {2, 3} and pred["best_vs_hf_generate"] > 0
    assert out["weight_bytes"]["target"] > out["weight_bytes"]["draft"]


def test_synthetic_command_line_writes_json_and_a_last_line(tmp_path, capsys):
    args = ["--synthetic", "tiny", "--device", "cpu", "--gammas", "2", "--iters", "2", "--max_new_tokens", "8",
            "--output_dir", str(tmp_path), "--compile"]
    assert bench.main(args) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "draft_step_compiled" in last["steps_ms"] and set(last["best_gamma"]) == {"0.6", "0.7", "0.8"}
    data = json.loads(next(tmp_path.glob("synthetic_*.json")).read_text())
    assert data["timings"]["compile_seconds"] > 0 and data["config"]["compile"] is True


def test_synthetic_qwen3_without_a_gpu_is_a_clear_error(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert bench.main(["--synthetic", "qwen3"]) == 2
    assert "needs a GPU" in capsys.readouterr().err


def test_fixed_window_fusion_equals_slice_fusion(target, draft, fuser):
    """The compiled path's decode fusion (fixed window, masked write-back) writes what the slices do."""
    from c2c.core.engine import fuse_positions, fuse_window

    ids = torch.tensor([PROMPT])
    caches = []
    with torch.inference_mode():
        for _ in range(2):
            t_cache, d_cache = kv.new_cache(target, 32), kv.new_cache(draft, 32)
            kv.forward(target, ids, t_cache, 0)
            kv.forward(draft, ids, d_cache, 0)
            caches.append((t_cache, d_cache))
        fuse_positions(fuser, *caches[0], 6, 9)
        positions = torch.arange(9 - 5, 9)  # window of gamma+1 = 5 ending at 9; only 6..8 are new
        fuse_window(fuser, *caches[1], positions, positions >= 6)
        for layer in range(2):
            a, b = kv.read_kv(caches[0][1], layer, 0, 9), kv.read_kv(caches[1][1], layer, 0, 9)
            assert torch.allclose(a[0], b[0], atol=1e-6) and torch.allclose(a[1], b[1], atol=1e-6)
            unfused = kv.read_kv(caches[0][1], layer, 0, 6)[0]
            assert torch.equal(unfused, kv.read_kv(caches[1][1], layer, 0, 6)[0])


@pytest.mark.parametrize("draft_ms, best", [(10.0, 1), (0.1, 4)])
def test_prediction_picks_the_gamma_the_arithmetic_favours(draft_ms, best):
    """Target step 10 ms, verify 11 ms, no fusion or overhead, alpha 0.6: a draft as slow as the target
    makes gamma 1 best (21 ms / 1.6 tokens vs 51 ms / 2.31); a 0.1 ms draft makes gamma 4 best."""
    steps = {"target_step_eager": {"seconds": 0.010}, "draft_step_eager": {"seconds": draft_ms / 1e3}}
    for g in (1, 4):
        steps[f"target_verify_{g + 1}_eager"] = {"seconds": 0.011}
        steps[f"fusion_{g + 1}_tokens"] = {"seconds": 0.0}
    pred = synthetic.predict(steps, {1: {"overhead": 0.0}, 4: {"overhead": 0.0}}, compiled=False, hf_ms=20.0)
    assert pred["0.6"]["best_gamma"] == best
    per_round = (1 - 0.6**5) / 0.4
    assert pred["0.6"]["per_gamma"][4]["vs_target_only"] == pytest.approx(0.010 / ((4 * draft_ms / 1e3 + 0.011) / per_round))


def test_after_the_warm_up_timed_compiled_runs_compile_nothing(target, draft):
    """Every shape a timed run can meet is built in the warm-up: the first prompt of each cache size,
    and the 2-token draft catch-up that follows an all-accepted round (at gamma 6 the random draft's
    own runs never get there, so only the forced-accept warm-up builds it; draft = target always does)."""
    from torch._dynamo.utils import counters

    from c2c.app import benchmark, runner

    prompts = [PROMPT, PROMPT * 30, PROMPT[:4]]  # cache sizes 256, 512, 256
    for drafter in (draft, target):
        session = runner.Session(runner.RunConfig(compile=True), torch.device("cpu"), torch.float32, None, target,
                                 drafter, None, {}, set(), CompiledSteps(backend="eager"))
        assert runner.warm_prompts(session, prompts, 20, 6) == [PROMPT, PROMPT * 30]
        with torch.inference_mode():
            for mode in ("target", "speculative"):
                benchmark.warm_up(session, mode, prompts, 6, 20, 6)
        graphs = counters["stats"]["unique_graphs"]
        runs = [benchmark.run_once(session, mode, ids, 6, 20) for mode in ("target", "speculative") for ids in prompts]
        with torch.inference_mode():
            forced = runner.decoder(session, benchmark.mode_spec(session, "speculative", 6, 20), force_accept=True)
            runs.append(forced.generate(PROMPT[:4]))
        assert counters["stats"]["unique_graphs"] == graphs
        assert runs[-1].counters.total_accepted == runs[-1].counters.total_drafted


def test_greedy_rounds_draft_in_one_compiled_call_and_sampling_per_step(target, draft, fuser, reference, traced):
    """The fast path drafts a full greedy round in one compiled function and verifies and accepts it in
    another (one graph replay each on CUDA); sampling keeps the per-step path (its generator can't
    live in a captured graph) and the eager acceptance."""
    calls, verifies = [], []
    with torch.inference_mode():
        dec = SpeculativeDecoder(target, draft, SpecConfig(3, 40), SamplingConfig(), set(), fuser=fuser, compiled=traced)
        inner, inner_verify = dec.rounds.draft_graph, dec.rounds.verify_graph
        dec.rounds.draft_graph = lambda *args: calls.append(args[4]) or inner(*args)
        dec.rounds.verify_graph = lambda *args: verifies.append(args[3].shape[0]) or inner_verify(*args)
        result = dec.generate(PROMPT)
        sampled = SpeculativeDecoder(target, draft, SpecConfig(3, 40), SamplingConfig(temperature=0.8), set(),
                                     compiled=traced)
    assert result.output_ids == reference
    assert calls and set(calls) == {3} and len(calls) == result.counters.drafted_at[2]  # every full round, once
    assert verifies == calls  # and its verify with the acceptance: one call
    assert sampled.rounds.draft_graph is None and sampled.rounds.verify_graph is None


def test_the_round_decision_holds_the_next_feed():
    """accept_round's decision is [n, d_1..d_g, token]: the engine slices the next round's feed out of
    it ([d_g, token] after an all-accepted round), so the order is pinned here."""
    from c2c.core.rounds import accept_round

    drafted = torch.tensor([5, 6, 7])
    logits = torch.full((4, 10), -1.0)
    for row, best in enumerate([5, 6, 2, 9]):  # the target agrees on two drafts, then picks 2
        logits[row, best] = 1.0
    assert accept_round(drafted, None, logits).tolist() == [2, 5, 6, 7, 2]
    logits[2, 7] = 2.0  # now it agrees on all three; the bonus is 9
    assert accept_round(drafted, None, logits).tolist() == [3, 5, 6, 7, 9]
    assert accept_round(drafted, None, torch.zeros(4, 10), force=torch.tensor(True)).tolist()[0] == 3
    # the compiled verify's device flag: off changes nothing, on accepts all with the bonus
    from c2c.core.sampling import accept_greedy

    logits[2, 7] = -2.0  # back to two agreeing drafts
    off, on = (accept_greedy(drafted, logits, torch.tensor(flag)) for flag in (False, True))
    assert [t.item() for t in off] == [2, 2] and [t.item() for t in on] == [3, 9]


def test_prediction_from_the_measured_round_with_and_without_fusion():
    """Target step 10 ms; the engine's forced-accept round at gamma 4 measured 16 ms, 2 of them fusion:
    1.6 target steps; at alpha 0.7, E = 2.773 tokens per round."""
    steps = {"target_step_compiled": {"seconds": 0.010}, "draft_step_compiled": {"seconds": 0.001},
             "target_verify_5_compiled": {"seconds": 0.011}, "fusion_5_tokens": {"seconds": 0.002}}
    rounds = {4: {"draft": 0.004, "target": 0.0095, "fusion": 0.002, "overhead": 0.0005}}
    row = synthetic.predict(steps, rounds, compiled=True, hf_ms=20.0)["0.7"]["per_gamma"][4]
    e = (1 - 0.7**5) / 0.3
    assert row["round_ms_measured"] == pytest.approx(16.0) and row["round_in_target_steps"] == pytest.approx(1.6)
    assert row["vs_target_only_measured_round"] == pytest.approx(0.010 / (0.016 / e))
    assert row["vs_target_only_measured_round_no_fusion"] == pytest.approx(0.010 / (0.014 / e))


def test_a_compiled_round_is_three_calls_and_a_few_launches_between_them(target, draft, fuser, traced):
    """bench/round_ops.py's count with the traced backend: a full forced-accept round at gamma 4 is
    three compiled calls (draft block, verify with acceptance, fusion window) and, between them, only
    the position ranges, the two rollbacks, the two output copies and the fusion's keep-mask (before
    the verify graph took the acceptance in, the host issued 17 launches here)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    from round_ops import VIEWS, count_round_ops

    with torch.inference_mode():
        calls, ops = count_round_ops(target, draft, fuser, traced, 4, PROMPT)
    launches = {k: v for k, v in ops.items() if k not in VIEWS}
    assert calls == 3
    assert launches == {"aten::arange": 3, "aten::fill_": 2, "aten::clone": 2, "aten::clamp_min": 1, "aten::ge": 1}
