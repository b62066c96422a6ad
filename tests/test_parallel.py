"""Parallel drafting (c2c.core.parallel, ParallelRound): all K drafts of a round from one draft
forward over [unseen tokens, K-1 mask ids]. Every greedy output is the target's for K 1..8, fused
and not, eager and compiled, on the tiny pair and an odd-shaped one; K 1 is the gamma-1 chain,
outputs and counters; after every round both caches equal a fresh prefill of what they hold (the
mask K/V dropped); sampled rounds follow the target's distribution; one draft forward per round;
mask ids read from a draft's config as vLLM reads them."""

from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from c2c.core import cache as kv
from c2c.core import parallel
from c2c.core.engine import CompiledSteps, SpecConfig, SpeculativeDecoder, standard_generate
from c2c.core.sampling import SamplingConfig
from tests import tiny

PROMPTS = ([5, 9, 33, 7, 100, 2], [17, 4], [250, 251, 252, 3, 3, 3, 40, 41])
MASK = tiny.VOCAB - 1  # an id the tiny tokenizer never makes (PARD takes one from the unused range)

COUNTED = ("draft_calls", "target_calls", "rounds", "total_drafted", "total_accepted", "rejections", "fused_tokens",
           "drafted_at", "accepted_at", "tokens_per_round")


def decode(target, draft, k, max_new=30, fuser=None, compiled=None, sampling=SamplingConfig(), **kw):
    return SpeculativeDecoder(target, draft, SpecConfig(k, max_new, parallel=True), sampling, set(), fuser=fuser,
                              compiled=compiled, masks=[MASK], **kw)


@pytest.mark.parametrize("k", range(1, 9))
@pytest.mark.parametrize("fused", [False, True])
def test_greedy_parallel_output_is_the_targets(target, draft, fuser, k, fused):
    for prompt in PROMPTS:
        want = standard_generate(target, prompt, 30, SamplingConfig(), set()).output_ids
        got = decode(target, draft, k, fuser=fuser if fused else None).generate(prompt)
        assert got.output_ids == want, (k, prompt)
        c = got.counters
        assert c.draft_calls <= 1 + c.rounds  # the prefill, then at most one draft forward a round
        assert c.parallel and c.total_drafted <= k * c.rounds


def test_one_draft_forward_per_round_whatever_k(target, draft):
    for k in (2, 5, 8):
        c = decode(target, draft, k, 40).generate(PROMPTS[0]).counters
        # the prefill, then one forward per round that drafts (a last round with room for none drafts nothing)
        assert c.draft_calls == 1 + c.drafted_at[0] and c.drafted_at[0] >= c.rounds - 1, k
        assert c.drafted_at[k - 1] > c.rounds / 2 and c.total_drafted > (k - 1) * c.drafted_at[0]  # k drafts a forward


def test_k_one_is_the_gamma_one_chain(target, draft, fuser):
    """K = 1 drafts one token from the unseen tokens, as the chain's one draft step does: same ids and counters."""
    for prompt in PROMPTS:
        for f in (None, fuser):
            chain = SpeculativeDecoder(target, draft, SpecConfig(1, 30), SamplingConfig(), set(), fuser=f).generate(prompt)
            par = decode(target, draft, 1, fuser=f).generate(prompt)
            assert par.output_ids == chain.output_ids
            for name in COUNTED:
                assert getattr(par.counters, name) == getattr(chain.counters, name), name


@pytest.mark.parametrize("fused", [False, True])
def test_after_every_round_the_caches_hold_the_committed_sequence(target, draft, fuser, fused):
    """The target cache equals a fresh prefill of the committed tokens but the pending one; the draft's
    write position is what the round says it holds (its mask K/V dropped) and, without fusion, its K/V
    equal a fresh draft prefill of those tokens (1e-5)."""
    prompt, emitted, seen = PROMPTS[0], [], []
    dec = decode(target, draft, 5, 24, fuser=fuser if fused else None)

    def hook(info):
        emitted.extend(info.tokens)
        seq = prompt + emitted
        t_len, d_len = kv.length(dec.target_cache), kv.length(dec.draft_cache)
        assert (t_len, d_len) == (info.target_cache, info.draft_cache) == (info.committed - 1, d_len)
        assert d_len <= info.committed - 1 or info.round == 0
        checks = [(target, dec.target_cache, t_len)] + ([] if fused else [(draft, dec.draft_cache, d_len)])
        for model, cache, n in checks:
            fresh = kv.new_cache(model)
            kv.forward(model, torch.tensor([seq[:n]]), fresh, 0)
            for layer in range(kv.num_layers(fresh)):
                for a, b in zip(kv.read_kv(fresh, layer, 0, n), kv.read_kv(cache, layer, 0, n)):
                    assert torch.allclose(a, b, atol=1e-5), layer
        seen.append(info.round)

    dec.on_round = hook
    result = dec.generate(prompt)
    assert emitted == result.output_ids and len(seen) == result.counters.rounds + 1


def odd_pair():
    from tests.test_tree_engine import odd_pair as build

    return build()


def test_unusual_shapes_stay_lossless():
    target, draft, fuser = odd_pair()
    for k in (3, 7):
        for prompt in PROMPTS:
            want = standard_generate(target, prompt, 20, SamplingConfig(), set()).output_ids
            for f in (None, fuser):
                assert decode(target, draft, k, 20, fuser=f).generate(prompt).output_ids == want


def test_forced_rounds_accept_every_draft_and_keep_the_caches_right(target, draft):
    """Timing's forced acceptance: every round accepts all K, so the window always holds K+1 tokens."""
    c = decode(target, draft, 4, 31, force_accept=True).generate(PROMPTS[0]).counters
    assert c.total_accepted == c.total_drafted == 4 * c.rounds and c.rounds == 6


@pytest.mark.parametrize("k", [1, 4, 8])
@pytest.mark.parametrize("fused", [False, True])
def test_compiled_parallel_rounds_give_the_targets_ids_and_the_eager_counters(target, draft, fuser, k, fused):
    compiled = CompiledSteps(backend="eager")  # dynamo tracing without C++ code generation
    f = fuser if fused else None
    with torch.inference_mode():
        for prompt in PROMPTS[:2]:
            want = standard_generate(target, prompt, 30, SamplingConfig(), set()).output_ids
            eager = decode(target, draft, k, fuser=f).generate(prompt)
            fast = decode(target, draft, k, fuser=f, compiled=compiled).generate(prompt)
            assert fast.output_ids == want
            for name in COUNTED:
                assert getattr(fast.counters, name) == getattr(eager.counters, name), name


def test_a_compiled_parallel_round_is_at_most_three_calls(target, draft, fuser):
    """Greedy: the draft graph, the verify+accept graph, the fusion window; sampled: the draft graph,
    the compiled verify, the fusion window (the acceptance eager between them). Counted per round by
    bench/round_ops.py's forced-accept difference of a long and a short run."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    from round_ops import count_round_ops

    compiled = CompiledSteps(backend="eager")
    with torch.inference_mode():
        for temperature in (0.0, 0.8):
            calls, _ = count_round_ops(target, draft, fuser, compiled, 4, PROMPTS[0], parallel=[MASK],
                                       sampling=SamplingConfig(temperature))
            assert calls == 3, (temperature, calls)


def test_sampled_parallel_rounds_follow_the_targets_distribution():
    """The first three sampled tokens of a 6-token-vocabulary pair, over 4,000 seeded runs, against the
    target's exact three-step distribution: the first round after the prefill drafts K 3 in one forward
    (max_new_tokens 5), so a draw at every offset is checked, jointly and per position. Chi-square
    over cells expected 5 times or more (the rest pooled), at the 1e-4 critical value (Wilson-Hilferty):
    a correct sampler fails each test with odds 1e-4; seeded, so the outcome is fixed."""
    target, draft = tiny.toy_model(2, 1), tiny.toy_model(1, 2)
    sampling, prompt = SamplingConfig(temperature=1.0), [1, 2, 3]
    joint = tiny.three_step_joint(target, prompt, sampling)
    dec = SpeculativeDecoder(target, draft, SpecConfig(3, 5, parallel=True), sampling, set(),
                             generator=torch.Generator().manual_seed(0), masks=[5])
    n = 4000
    with torch.inference_mode():
        counts = Counter(tuple(dec.generate(prompt).output_ids[:3]) for _ in range(n))
    assert dec.counters.drafted_at[2] == 1  # the first round drafted all three in one forward

    chi2, critical, _ = tiny.pooled_chi2(joint, counts, n)
    assert chi2 < critical, ("joint", chi2, critical)
    for pos in range(3):
        marginal, observed = Counter(), Counter()
        for key, q in joint.items():
            marginal[key[pos]] += q
        for key, m in counts.items():
            observed[key[pos]] += m
        chi2, critical, _ = tiny.pooled_chi2(dict(marginal), observed, n)
        assert chi2 < critical, (pos, chi2, critical)


def test_mask_ids_are_read_as_vllm_reads_them():
    cfg = SimpleNamespace
    assert parallel.config_mask_ids(cfg(pard_token=7)) == [7]
    assert parallel.config_mask_ids(cfg(mask_token_id=3, pard_token=7)) == [3]  # vLLM's order
    assert parallel.config_mask_ids(cfg(dflash_config={"mask_token_id": 9}, mask_token_id=3)) == [9]
    assert parallel.config_mask_ids(cfg(ptd_token_id=[4, 5])) == [4, 5]
    assert parallel.config_mask_ids(cfg(dflash_config={}, other=1)) is None
    assert parallel.mask_row([4, 5], 5) == [4, 5, 5, 5] and parallel.mask_row([4], 1) == []


def test_the_block_puts_the_unseen_tokens_then_the_masks_then_padding():
    window = torch.tensor([11, 12, 13, 0, 0])  # K = 4: a window of 5, three unseen tokens
    masks = torch.tensor([90, 91, 92])
    assert parallel.block(window, torch.tensor(3), masks).tolist() == [11, 12, 13, 90, 91, 92, 92, 92]
    assert parallel.block(window, torch.tensor(1), masks).tolist() == [11, 90, 91, 92, 92, 92, 92, 92]
    assert parallel.block(torch.tensor([7, 8]), torch.tensor(2), masks[:0]).tolist() == [7, 8]
    decided = torch.tensor([2, 21, 22, 23, 24, 99])  # n 2 of 4, then the target's token
    window, count = parallel.next_window(decided, 4)
    assert window[: int(count)].tolist() == [21, 22, 99] and int(count) == 3


# ---------------------------------------------------------------- the application: PARD folders, flags, API


@pytest.fixture(scope="module")
def pard_folder(tmp_path_factory, draft):
    """The tiny draft saved in PARD's layout: its own weights, `pard_token` in config.json (no resize)."""
    import json

    folder = tmp_path_factory.mktemp("pard") / "draft"
    draft.save_pretrained(folder)
    tiny.build_tokenizer().save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["pard_token"] = MASK
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_a_pard_folder_runs_in_the_demo_lossless_with_one_forward_a_round(saved_models, pard_folder, tmp_path, capsys):
    import json

    import qwen3_14b_speculative_demo as demo

    prompts = tmp_path / "p.txt"
    prompts.write_text("What is 1 + 1?\nThe quick brown fox\n", encoding="utf-8")
    rc = demo.main(["--base_model", str(pard_folder), "--teacher_model", str(saved_models / "target"), "--fuser_checkpoint",
                    "none", "--prompts", str(prompts), "--max_new_tokens", "24", "--gamma", "6", "--parallel_drafting",
                    "--device", "cpu", "--threads", "1", "--lang", "en", "--save_results", "--output_dir", str(tmp_path / "out")])
    assert rc == 0
    data = json.loads(next((tmp_path / "out").glob("results_*.json")).read_text())
    assert data["config"]["draft_mode"] == "parallel" and data["config"]["parallel_drafting"] == {"mask_ids": [MASK]}
    for entry in data["prompts"]:
        sp = entry["speculative"]
        assert entry["comparison"]["outputs_match"]
        assert sp["draft_mode"] == "parallel" and sp["draft_forwards_per_round"] == 1
        assert sp["draft_calls"] <= 1 + sp["rounds"]
    assert "parallel drafting: one draft forward a round" in capsys.readouterr().out
    rc = demo.main(["--base_model", str(pard_folder), "--teacher_model", str(saved_models / "target"), "--fuser_checkpoint",
                    "none", "--prompts", str(prompts), "--max_new_tokens", "12", "--parallel_drafting", "--stream",
                    "--no_color", "--device", "cpu", "--threads", "1", "--lang", "en", "--skip_standard", "--no_warmup"])
    assert rc == 0 and "speculative (parallel drafting, gamma 4):" in capsys.readouterr().out  # the stream names the mode


def test_parallel_drafting_without_a_mask_id_is_one_error_line(saved_models, tmp_path, capsys):
    import qwen3_14b_speculative_demo as demo

    rc = demo.main(["--base_model", str(saved_models / "draft"), "--teacher_model", str(saved_models / "target"),
                    "--fuser_checkpoint", "none", "--parallel_drafting", "--device", "cpu", "--save_results",
                    "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: --parallel_drafting needs a draft"), err
    assert "pard_token" in err[0] and "amd/PARD-Qwen3-0.6B" in err[0] and not list((tmp_path / "out").glob("*.json"))


def test_parallel_drafting_and_trees_are_one_error_line(tmp_path, capsys):
    import qwen3_14b_speculative_demo as demo

    rc = demo.main(["--preset", "tiny", "--parallel_drafting", "--tree_budget", "8", "--output_dir", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--parallel_drafting drafts a chain" in err[0], err


def test_the_api_drafts_in_parallel_from_a_pard_folder(saved_models, pard_folder):
    from c2c import SpeculativePipeline
    from c2c.errors import UserInputError

    pipe = SpeculativePipeline.load(str(pard_folder), str(saved_models / "target"), fuser=None, device="cpu", threads=1)
    out = pipe.generate("What is 1 + 1?", max_new_tokens=20, gamma=5, parallel_drafting=True, compare=True)
    assert out.comparison["outputs_match"] and out.metrics["draft_mode"] == "parallel"
    plain = SpeculativePipeline.load(str(saved_models / "draft"), str(saved_models / "target"), fuser=None, device="cpu",
                                     threads=1)
    with pytest.raises(UserInputError, match="parallel_drafting needs a draft"):
        plain.generate("What is 1 + 1?", parallel_drafting=True)


def test_the_benchmark_runs_parallel_rows_beside_the_chains(saved_models, pard_folder, tmp_path, capsys):
    import json

    import speculative_benchmark

    prompts = tmp_path / "p.txt"
    prompts.write_text("What is 1 + 1?\nThe quick brown fox\n", encoding="utf-8")
    assert speculative_benchmark.main([
        "--base_model", str(pard_folder), "--teacher_model", str(saved_models / "target"), "--fuser_checkpoint",
        str(saved_models / "fuser"), "--prompts", str(prompts), "--device", "cpu", "--gammas", "2", "5", "--parallel_drafting",
        "--modes", "target", "speculative", "speculative_fused", "--repeats", "1", "--warmup", "0", "--no_plots",
        "--threads", "1", "--max_new_tokens", "16", "--output_dir", str(tmp_path / "out")]) == 0
    data = json.loads(next((tmp_path / "out").glob("benchmark_*.json")).read_text())
    rows = [(r["mode"], r["gamma"]) for r in data["rows"] if r["parallel"]]
    assert rows == [("speculative", 2), ("speculative", 5), ("speculative_fused", 2), ("speculative_fused", 5)]
    assert all(r["outputs_match_target"] for r in data["rows"])
    assert sum(not r["parallel"] and r["mode"] != "target" for r in data["rows"]) == 4  # the chains still run
    assert "| speculative_fused | parallel 5 |" in capsys.readouterr().out


def test_the_demo_runs_without_the_tools_package(tmp_path):
    """The application (c2c.core, c2c.app, the demo) never imports c2c.tools, --tree_budget auto's
    timing included: a copy of the repository without c2c/tools runs the demo."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    copy = tmp_path / "repo"
    shutil.copytree(root / "c2c", copy / "c2c", ignore=shutil.ignore_patterns("tools", "__pycache__"))
    shutil.copytree(root / "presets", copy / "presets", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("qwen3_14b_speculative_demo.py", "example_prompts.txt"):
        shutil.copy(root / name, copy / name)
    assert not (copy / "c2c" / "tools").exists()
    out = subprocess.run([sys.executable, "qwen3_14b_speculative_demo.py", "--preset", "tiny", "--tree_budget", "auto",
                          "--tree_depth", "2", "--max_new_tokens", "8", "--threads", "1", "--lang", "en"],
                         cwd=copy, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "tree (auto)" in out.stdout


def test_a_tree_budget_beyond_what_the_tree_can_grow_is_capped_and_recorded(tmp_path, capsys):
    import json
    import warnings

    import qwen3_14b_speculative_demo as demo
    from c2c import SpeculativePipeline

    assert demo.main(["--preset", "tiny", "--threads", "1", "--lang", "en", "--tree_budget", "64", "--tree_depth", "2",
                      "--tree_topk", "2", "--max_new_tokens", "12", "--no_warmup", "--save_results",
                      "--output_dir", str(tmp_path)]) == 0
    data = json.loads(next(tmp_path.glob("results_*.json")).read_text())
    assert data["config"]["tree"]["budget"] == 6  # 2 children of the root, 2 x 2 below
    assert all(e["speculative"]["nodes_per_round"] <= 6 for e in data["prompts"])
    assert "--tree_budget 64 is more than a tree of --tree_depth 2 and --tree_topk 2 can grow (6 nodes)" in capsys.readouterr().err
    pipe = SpeculativePipeline.from_preset("tiny")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = pipe.generate("To be", max_new_tokens=10, tree_budget=64, tree_depth=2, tree_topk=2, compare=True)
    assert out.comparison["outputs_match"] and any("tree_budget 64 is more than" in str(w.message) for w in caught)


@pytest.mark.parametrize("preset", ["tiny", "arith"])
def test_the_shipped_parallel_drafts_run_lossless_fused_and_plain(preset, tmp_path):
    """The presets' parallel drafts (presets/build_parallel.py): `--preset X --parallel_drafting` takes
    the preset's fuser_parallel/ (projectors, adapter and mask trained together); pard_draft/ (PARD alone,
    exported in PARD's layout) runs with no fuser. Both greedy outputs are the target's."""
    import json

    import qwen3_14b_speculative_demo as demo
    from c2c.app.presets import PRESET_ROOT

    root = PRESET_ROOT / preset
    runs = {"fused": [], "plain": ["--base_model", str(root / "pard_draft"), "--fuser_checkpoint", "none"]}
    for arm, extra in runs.items():
        out = tmp_path / arm
        assert demo.main(["--preset", preset, "--parallel_drafting", "--gamma", "4", "--max_new_tokens", "24", "--threads",
                          "1", "--no_warmup", "--lang", "en", "--save_results", "--output_dir", str(out), *extra]) == 0
        data = json.loads(next(out.glob("results_*.json")).read_text())
        assert data["config"]["draft_mode"] == "parallel" and data["summary"]["comparison"]["outputs_match"], arm
        assert data["config"]["fusion"]["enabled"] == (arm == "fused")
        assert data["summary"]["speculative"]["average_accepted_length"] > 1.0, arm


def test_parallel_rounds_near_the_context_on_learned_positions():
    """GPT-2's positions are an embedding of max_position_embeddings rows: the block's padding sits at the
    last mask's position, so a parallel round near the end of the context stays inside it."""
    from tests import archs

    target, draft = archs.build_pair(archs.BY_NAME["GPT-2"])
    limit = target.config.max_position_embeddings
    prompt = [(7 * i) % 300 + 3 for i in range(limit - 16)]
    with torch.inference_mode():
        want = standard_generate(target, prompt, 14, SamplingConfig(), set()).output_ids
        for k in (4, 8):
            got = SpeculativeDecoder(target, draft, SpecConfig(k, 14, parallel=True), SamplingConfig(), set(),
                                     masks=[tiny.VOCAB - 1]).generate(prompt)
            assert got.output_ids == want, k


def test_a_mask_id_past_the_rows_the_pair_shares_is_one_error_line(saved_models, tmp_path, capsys):
    """A draft padded past the target's vocabulary whose pard_token sits in the extra rows: the pair runs
    cut to the shared rows, so that mask id can't be fed; one error line, not an IndexError."""
    import copy
    import json

    import qwen3_14b_speculative_demo as demo

    model = copy.deepcopy(tiny.build_pair()[1])
    model.resize_token_embeddings(tiny.VOCAB + 8)
    folder = tmp_path / "padded-draft"
    model.save_pretrained(folder)
    tiny.build_tokenizer().save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"pard_token": tiny.VOCAB + 4}))
    prompts = tmp_path / "p.txt"
    prompts.write_text("What is 1 + 1?\n", encoding="utf-8")
    rc = demo.main(["--base_model", str(folder), "--teacher_model", str(saved_models / "target"), "--fuser_checkpoint", "none",
                    "--prompts", str(prompts), "--parallel_drafting", "--device", "cpu", "--threads", "1", "--no_warmup"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: ") and "lies past the 320 embedding rows the pair shares" in err[-1], err


@pytest.mark.parametrize("kind", ["chain", "parallel", "tree"])
def test_recorded_rounds_read_nothing_from_the_device(target, draft, monkeypatch, kind):
    """--stream, --save_rounds and rounds=True record each round from host values the round already
    has: a device read of a cache length inside the loop would add a sync to the timed span."""
    from c2c.core.tree import TreeShape

    spec = SpecConfig(4, 24, tree=TreeShape(8, 3, 2) if kind == "tree" else None, parallel=kind == "parallel")
    seen = []
    dec = SpeculativeDecoder(target, draft, spec, SamplingConfig(), set(), masks=[MASK], on_round=seen.append)

    def no_read(cache):
        raise AssertionError("a cache length was read from the device during generation")

    monkeypatch.setattr(kv, "length", no_read)
    result = dec.generate(PROMPTS[0])
    assert len(seen) == result.counters.rounds + 1 and seen[-1].target_cache == seen[-1].committed - 1


def test_a_preset_runs_its_parallel_fuser_with_the_draft_it_was_trained_on(tmp_path):
    """fuser_parallel/ trained on top of the PARD draft (presets/build_parallel.py --fused_from pard)
    records presets/<name>/pard_draft as its base model: the preset then drafts with that folder; any
    other record (or none) keeps the preset's draft."""
    import json

    from c2c.app.presets import trained_on

    fuser = tmp_path / "arith" / "fuser_parallel"
    fuser.mkdir(parents=True)
    assert trained_on(fuser) == "draft"  # no config.json
    for named, want in [("presets/arith/pard_draft", "pard_draft"), ("presets/arith/draft", "draft"),
                        ("/elsewhere/pard_draft", "draft"), ("presets/tiny/pard_draft", "draft")]:
        (fuser / "config.json").write_text(json.dumps({"model": {"base_model": named}}))
        assert trained_on(fuser) == want, named


def test_a_users_fuser_with_a_preset_drafts_with_the_draft_it_was_trained_on():
    """--preset arith --parallel_drafting --fuser_checkpoint presets/arith/fuser: the chain fuser was
    trained on presets/arith/draft, so the preset's draft is that one (not fuser_parallel's pard_draft);
    no --fuser_checkpoint, or `none` (PARD alone): fuser_parallel's draft."""
    from c2c.app import demo
    from c2c.app.cli import parse_with_preset
    from c2c.app.presets import PRESET_ROOT

    def draft(*flags):
        return parse_with_preset(demo.build_parser(), ["--preset", "arith", "--parallel_drafting", *flags]).base_model

    assert draft() == str(PRESET_ROOT / "arith" / "pard_draft")
    assert draft("--fuser_checkpoint", "none") == str(PRESET_ROOT / "arith" / "pard_draft")
    assert draft("--fuser_checkpoint", str(PRESET_ROOT / "arith" / "fuser")) == str(PRESET_ROOT / "arith" / "draft")
    assert draft("--fuser_checkpoint", str(PRESET_ROOT / "arith" / "fuser"), "--base_model", "x") == "x"


def test_build_parallel_builds_the_pard_draft_before_the_fuser_trained_on_it(tmp_path, monkeypatch):
    """`--arms fused plain` (the order its usage line shows): the fused arm trains on top of pard_draft/,
    so the plain arm that rebuilds pard_draft/ runs first; otherwise fuser_parallel/ was trained on the
    previous pard_draft/ and its adapter is refused with the new one (fingerprint)."""
    import importlib.util
    import json
    import sys
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("build_parallel_under_test", Path(__file__).parent.parent / "presets" / "build_parallel.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    (tmp_path / "presets" / "arith").mkdir(parents=True)
    (tmp_path / "presets" / "arith" / "build_info.json").write_text("{}")
    order = []
    monkeypatch.setattr(build, "ROOT", tmp_path)
    monkeypatch.setattr(build, "build_arith", lambda args, arm: order.append(arm) or {"last_eval": {}})
    monkeypatch.setattr(sys, "argv", ["build_parallel.py", "--preset", "arith", "--arms", "fused", "plain"])
    assert build.main() == 0 and order == ["plain", "fused"]
    assert set(json.loads((tmp_path / "presets" / "arith" / "build_info.json").read_text())["parallel"]) == {"plain", "fused"}
