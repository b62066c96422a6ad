"""Tree rounds in the engine (static caches, uncompiled; tests/test_tree_fastpath.py compiles them): every greedy output is the target's for many
tree shapes, with and without fusion; a tree with top_k 1 is the chain, outputs and counters; after
every round both caches hold exactly the committed sequence; sampled trees follow the target's
distribution; bad tree flags are one error line."""

import itertools
from collections import Counter

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

import qwen3_14b_speculative_demo as demo
from c2c.core import cache as kv
from c2c.core.engine import SpecConfig, SpeculativeDecoder, standard_generate
from c2c.core.fuser import C2CFuser, KVShape
from c2c.core.sampling import SamplingConfig
from c2c.core.tree import TreeShape
from tests import tiny

PROMPTS = ([5, 9, 33, 7, 100, 2], [17, 4], [250, 251, 252, 3, 3, 3, 40, 41])
SHAPES = [(4, 4, 1), (6, 3, 2), (8, 4, 2), (16, 5, 3), (32, 6, 4), (12, 2, 6), (9, 9, 1)]


def spec(shape, max_new=30, **kw) -> SpecConfig:
    return SpecConfig(gamma=4, max_new_tokens=max_new, tree=TreeShape(*shape) if shape else None, **kw)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fused", [False, True])
def test_greedy_tree_output_is_the_targets(target, draft, fuser, shape, fused):
    for prompt in PROMPTS:
        want = standard_generate(target, prompt, 30, SamplingConfig(), set()).output_ids
        got = SpeculativeDecoder(target, draft, spec(shape), SamplingConfig(), set(), fuser=fuser if fused else None).generate(prompt)
        assert got.output_ids == want, (shape, prompt)
        assert got.counters.nodes_verified <= shape[0] * got.counters.rounds


def test_a_tree_with_top_k_one_is_the_chain(target, draft, fuser):
    for prompt, max_new in itertools.product(PROMPTS, (30, 7, 3)):
        chain = SpeculativeDecoder(target, draft, SpecConfig(gamma=4, max_new_tokens=max_new), SamplingConfig(), set(),
                                   fuser=fuser).generate(prompt)
        as_tree = SpeculativeDecoder(target, draft, spec((4, 4, 1), max_new), SamplingConfig(), set(), fuser=fuser).generate(prompt)
        assert as_tree.output_ids == chain.output_ids
        for name in ("draft_calls", "target_calls", "rounds", "total_drafted", "total_accepted", "rejections", "fused_tokens",
                     "drafted_at", "accepted_at", "tokens_per_round"):
            assert getattr(as_tree.counters, name) == getattr(chain.counters, name), name


def test_end_of_sequence_inside_a_tree_stops_the_output(target, draft, fuser):
    prompt = PROMPTS[0]
    free = standard_generate(target, prompt, 30, SamplingConfig(), set()).output_ids
    eos = {free[5]}
    want = standard_generate(target, prompt, 30, SamplingConfig(), eos).output_ids
    got = SpeculativeDecoder(target, draft, spec((16, 5, 3)), SamplingConfig(), eos, fuser=fuser).generate(prompt)
    assert got.output_ids == want and got.output_ids[-1] in eos


@pytest.mark.parametrize("fused", [False, True])
def test_after_every_round_the_caches_hold_the_committed_sequence(target, draft, fuser, fused):
    """The target cache equals a fresh prefill of the committed tokens but the pending one; without
    fusion the draft cache equals a fresh draft prefill of what it holds (1e-5). With fusion the
    draft's own K/V at generated positions were made over the fused prefix, so only its length is checked."""
    prompt, seen = PROMPTS[0], []
    decoder = SpeculativeDecoder(target, draft, spec((16, 5, 3), 24), SamplingConfig(), set(), fuser=fuser if fused else None)

    def check(info):
        seq = prompt + decoder_out()
        t_len, d_len = kv.length(decoder.target_cache), kv.length(decoder.draft_cache)
        assert t_len == info.committed - 1 and d_len <= info.committed
        ids = torch.tensor([seq[:t_len]])
        fresh = kv.new_cache(target)
        kv.forward(target, ids, fresh, 0)
        for layer in range(kv.num_layers(fresh)):
            for a, b in zip(kv.read_kv(fresh, layer, 0, t_len), kv.read_kv(decoder.target_cache, layer, 0, t_len)):
                assert torch.allclose(a, b, atol=1e-5), layer
        if not fused:
            fresh = kv.new_cache(draft)
            kv.forward(draft, torch.tensor([seq[:d_len]]), fresh, 0)
            for layer in range(kv.num_layers(fresh)):
                for a, b in zip(kv.read_kv(fresh, layer, 0, d_len), kv.read_kv(decoder.draft_cache, layer, 0, d_len)):
                    assert torch.allclose(a, b, atol=1e-5), layer
        seen.append(info.round)

    emitted: list[int] = []

    def decoder_out():
        return emitted

    def hook(info):
        emitted.extend(info.tokens)
        check(info)

    decoder.on_round = hook
    result = decoder.generate(prompt)
    assert emitted == result.output_ids and len(seen) == result.counters.rounds + 1


def odd_pair():
    """A pair with unusual shapes: 3 query heads over 3 KV heads in the target, 5 over 1 in the draft,
    a 3-layer draft under a 5-layer target (the layer map is offset by 2)."""
    def model(layers, heads, kv_heads, head_dim, seed):
        torch.manual_seed(seed)
        config = Qwen3Config(vocab_size=tiny.VOCAB, hidden_size=60, intermediate_size=96, num_hidden_layers=layers,
                             num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                             max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=None, pad_token_id=None,
                             eos_token_id=tiny.eos_ids())
        return Qwen3ForCausalLM(config).eval().requires_grad_(False)

    target, draft = model(5, 3, 3, 20, 11), model(3, 5, 1, 12, 12)
    torch.manual_seed(13)
    fuser = C2CFuser.create(KVShape.of(draft.config), KVShape.of(target.config), hidden_dim=16, intermediate_dim=16)
    for p in fuser.projectors:
        p.key_gate_logit.data.fill_(1.0)
        p.value_gate_logit.data.fill_(1.0)
    return target, draft, fuser.eval().requires_grad_(False)


def test_unusual_shapes_and_an_offset_layer_map_stay_lossless():
    target, draft, fuser = odd_pair()
    assert min(s for s, _ in fuser.layer_map.values()) > 0  # the map is offset
    for shape in ((8, 4, 2), (20, 5, 4)):
        for prompt in PROMPTS:
            want = standard_generate(target, prompt, 20, SamplingConfig(), set()).output_ids
            for f in (None, fuser):
                got = SpeculativeDecoder(target, draft, spec(shape, 20), SamplingConfig(), set(), fuser=f).generate(prompt)
                assert got.output_ids == want


def test_sampled_trees_follow_the_targets_distribution():
    """The first three sampled tokens of a tiny 6-token-vocabulary pair, over 4,000 seeded runs,
    against the target's exact three-step distribution (enumerated): the tokens after the prefill's
    come from one tree round of depth 3 (max_new_tokens 5), so a draw at every depth of a path is
    checked. Chi-square over the cells expected 5 times or more (the rest pooled in one cell), at the
    1e-4 critical value (Wilson-Hilferty): a correct sampler fails with odds 1e-4; seeded, so the
    outcome is fixed."""
    target, draft = tiny.toy_model(2, 1), tiny.toy_model(1, 2)
    sampling = SamplingConfig(temperature=1.0)
    prompt = [1, 2, 3]
    joint = tiny.three_step_joint(target, prompt, sampling)
    decoder = SpeculativeDecoder(target, draft, spec((6, 3, 2), 5), sampling, set(), generator=torch.Generator().manual_seed(0))
    n = 4000
    with torch.inference_mode():
        counts = Counter(tuple(decoder.generate(prompt).output_ids[:3]) for _ in range(n))
    assert decoder.counters.nodes_verified and max(decoder.counters.drafted_at[:3]) > 0  # a tree round of depth 3 drew them
    chi2, critical, cells = tiny.pooled_chi2(joint, counts, n)
    assert cells > 20 and chi2 < critical, (chi2, critical)


@pytest.mark.parametrize("flags, expected", [(["--tree_budget", "3", "--tree_depth", "4"], "--tree_budget 3 is smaller than --tree_depth 4"),
                                             (["--tree_budget", "8", "--tree_topk", "0"], "--tree_topk must be >= 1"),
                                             (["--tree_budget", "8", "--tree_depth", "0"], "--tree_depth must be >= 1"),
                                             (["--tree_budget", "-1"], "--tree_budget must be >= 0")])
def test_bad_tree_flags_are_one_error_line(tmp_path, capsys, flags, expected):
    try:
        rc = demo.main(["--preset", "tiny", "--threads", "1", "--output_dir", str(tmp_path), *flags])
    except SystemExit as e:  # a usage error from the parser: one line too
        rc = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err


def test_the_demo_runs_trees_and_records_them(tmp_path, capsys):
    import json

    assert demo.main(["--preset", "tiny", "--threads", "1", "--lang", "en", "--tree_budget", "12", "--tree_depth", "4",
                      "--tree_topk", "3", "--max_new_tokens", "24", "--save_results", "--output_dir", str(tmp_path)]) == 0
    data = json.loads(next(tmp_path.glob("results_*.json")).read_text())
    assert data["config"]["tree"] == {"budget": 12, "depth": 4, "top_k": 3} and data["config"]["compile"] is False
    for entry in data["prompts"]:
        assert entry["comparison"]["outputs_match"]
        sp = entry["speculative"]
        assert 0 < sp["nodes_per_round"] <= 12 and sp["theoretical_speedup"] is None and sp["branching"]
    printed = capsys.readouterr().out
    assert "tokens/round (measured, a tree)" in printed
    assert "per-token acceptance: " in printed and "(a tree: along the path the target took, not comparable with a chain's)" in printed


@pytest.mark.parametrize("settings", [dict(), dict(temperature=0.9, top_k=50, seed=3)])
def test_tree_round_records_replay_the_output(settings):
    """--save_rounds / rounds=True: for a tree, drafted_ids are the path the target took, then the
    draft's first choices below it, so the records keep the chain's meaning (tests/test_stream.check_rounds)."""
    from c2c.app import api
    from tests.test_stream import check_rounds

    pipe = api.SpeculativePipeline.from_preset("arith", fuser="preset", threads=1)
    for prompt in ("123+456=", "461+353+981+148="):
        out = pipe.generate(prompt, max_new_tokens=40, rounds=True, tree_budget=16, tree_depth=5, tree_topk=3, **settings)
        check_rounds(out.rounds, out.ids)
        assert sum(r["drafted"] for r in out.rounds) == out.metrics["total_drafted"]
        assert sum(r["accepted"] for r in out.rounds) == out.metrics["total_accepted"]


def test_an_end_of_sequence_token_on_a_rejected_branch_counts_nothing(target, draft):
    """A branch the target did not take may hold an end-of-sequence token: it must not cut what the
    round drafted along the way the target went (a rejection hidden that way would raise alpha)."""
    prompt = PROMPTS[0]
    rounds = []
    for eos in (set(), {119}):
        records = []
        decoder = SpeculativeDecoder(target, draft, spec((16, 5, 3)), SamplingConfig(), eos, on_round=lambda i: records.append(i))
        result = decoder.generate(prompt)
        rounds.append((result, records))
    (free, free_records), (cut, cut_records) = rounds
    first_free, first_cut = free_records[1], cut_records[1]
    if 119 not in first_cut.tokens:  # the end-of-sequence id is not on the path taken: the round counts alike
        assert (first_cut.drafted, first_cut.accepted) == (first_free.drafted, first_free.accepted)
    assert cut.counters.total_accepted <= cut.counters.total_drafted
    assert cut.counters.rejections == sum(1 for r in cut_records[1:] if r.accepted < r.drafted)


def test_top_k_beyond_the_vocabulary_takes_every_token(tmp_path):
    assert demo.main(["--preset", "arith", "--threads", "1", "--tree_budget", "300", "--tree_depth", "2",
                      "--tree_topk", "400", "--max_new_tokens", "12", "--output_dir", str(tmp_path)]) == 0


def test_attention_without_custom_masks_is_an_error_for_trees(target, draft):
    from c2c.errors import UserInputError

    original = target.config._attn_implementation
    target.config._attn_implementation = "flash_attention_2"
    try:
        with pytest.raises(UserInputError, match="tree rounds need attention that takes a tree mask"):
            SpeculativeDecoder(target, draft, spec((8, 4, 2)), SamplingConfig(), set()).generate(PROMPTS[0])
    finally:
        target.config._attn_implementation = original


def test_the_stream_marks_tokens_from_the_drafts_other_choices():
    import io

    from c2c.app import api

    pipe = api.SpeculativePipeline.from_preset("arith", threads=1)
    sink = io.StringIO()
    out = pipe.generate("461,353,", max_new_tokens=40, rounds=True, stream=sink, color=False,
                        tree_budget=16, tree_depth=5, tree_topk=3)
    written = sink.getvalue().split("\n", 1)[1]
    assert "(" in written  # at least one round took a branch that was not the draft's first choice
    plain = "".join(ch for ch in written if ch not in "[](){}<>\n")
    assert plain == out.text
    for r in out.rounds[1:]:
        if "branched_at" in r:
            assert 0 <= r["branched_at"] < r["accepted"]


def test_tree_budget_auto_chooses_a_measured_shape_and_stays_lossless(tmp_path, capsys):
    import json

    from c2c.app.runner import AUTO_BUDGETS

    assert demo.main(["--preset", "tiny", "--threads", "1", "--lang", "en", "--tree_budget", "auto", "--tree_depth", "4",
                      "--max_new_tokens", "24", "--save_results", "--output_dir", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    data = json.loads(next(tmp_path.glob("results_*.json")).read_text())
    tree_cfg, auto = data["config"]["tree"], data["config"]["tree_auto"]
    assert tree_cfg["budget"] in AUTO_BUDGETS and 1 <= tree_cfg["depth"] <= 4
    assert (auto["chosen"]["budget"], auto["chosen"]["depth"]) == (tree_cfg["budget"], tree_cfg["depth"])
    assert auto["chosen"]["tokens_per_second"] == max(c["tokens_per_second"] for c in auto["candidates"])
    assert auto["rounds_logged"] > 0 and sorted(map(int, auto["verify_ms"])) == [b + 1 for b in AUTO_BUDGETS]
    assert f"--tree_budget auto: budget {tree_cfg['budget']}, depth {tree_cfg['depth']}" in err
    assert all(e["comparison"]["outputs_match"] for e in data["prompts"])


def test_tree_budget_auto_without_a_round_to_measure_keeps_the_largest_tree(tmp_path, capsys):
    import json

    from c2c.app.runner import AUTO_BUDGETS

    assert demo.main(["--preset", "tiny", "--threads", "1", "--tree_budget", "auto", "--max_new_tokens", "2", "--no_warmup",
                      "--save_results", "--output_dir", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    data = json.loads(next(tmp_path.glob("results_*.json")).read_text())
    assert data["config"]["tree"]["budget"] == AUTO_BUDGETS[-1] and data["config"]["tree_auto"]["rounds_logged"] == 0
    assert "no tree round in the warm-up to measure" in captured.err and "runs the warm-up anyway" in captured.err
    assert all(not e["speculative"]["branching"] for e in data["prompts"])  # no tree round ran: no tree figures


def test_auto_with_a_depth_beyond_its_budgets_names_auto(tmp_path, capsys):
    assert demo.main(["--preset", "tiny", "--threads", "1", "--tree_budget", "auto", "--tree_depth", "70",
                      "--output_dir", str(tmp_path)]) == 2
    assert "--tree_budget auto weighs budgets up to 64" in capsys.readouterr().err
    assert demo.main(["--preset", "tiny", "--threads", "1", "--tree_budget", "auto", "--tree_depth", "2", "--tree_topk", "1",
                      "--output_dir", str(tmp_path)]) == 2
    assert "more than --tree_topk 1 at --tree_depth 2 can hold" in capsys.readouterr().err


def test_choose_shape_skips_budgets_a_tree_of_that_depth_cannot_hold():
    from c2c.core import tree

    rounds = [([-0.1, -0.5], [1, 1], [0])]
    _, figures = tree.choose_shape(rounds, {5: 1.0, 33: 2.0}, 0.1, 0.0, top_k=2, max_depth=2)
    assert all(c["budget"] <= 2 + 4 * (c["depth"] - 1) for c in figures["candidates"])
    assert {(c["budget"], c["depth"]) for c in figures["candidates"]} == {(4, 2)}
