"""The key invariant: greedy speculative output == target-only greedy output, token for token."""

import pytest
import torch

from c2c.core import cache as kv
from c2c.core.engine import SpecConfig, SpeculativeDecoder, fuse_positions, standard_generate
from c2c.core.sampling import SamplingConfig

GREEDY = SamplingConfig()
PROMPTS = {
    "one_token": [17],
    "short": [5, 9, 33, 100, 7, 61, 2],
    "long": [(i * 37 + 11) % 300 for i in range(45)],
}
FUSION_MODES = {"off": None, "prefill": (True, False), "decode": (False, True), "both": (True, True)}


def reference(target, prompt, n, eos=frozenset()):
    with torch.inference_mode():
        return standard_generate(target, prompt, n, GREEDY, set(eos)).output_ids


def speculate(target, draft, prompt, gamma, n, fuser=None, prefill=True, decode=True, eos=frozenset(), **kw):
    spec = SpecConfig(gamma, n, prefill, decode)
    with torch.inference_mode():
        return SpeculativeDecoder(target, draft, spec, kw.pop("sampling", GREEDY), set(eos), fuser=fuser, **kw).generate(prompt)


def test_standard_loop_matches_transformers_generate(target):
    prompt = PROMPTS["short"]
    with torch.inference_mode():
        hf = target.generate(torch.tensor([prompt]), max_new_tokens=30, do_sample=False, eos_token_id=None)
    assert reference(target, prompt, 30) == hf[0, len(prompt):].tolist()


@pytest.mark.parametrize("gamma", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("mode", list(FUSION_MODES))
@pytest.mark.parametrize("prompt_name", list(PROMPTS))
def test_greedy_speculative_equals_target_greedy(target, draft, fuser, gamma, mode, prompt_name):
    prompt = PROMPTS[prompt_name]
    flags = FUSION_MODES[mode]
    result = speculate(
        target, draft, prompt, gamma, 40,
        fuser=fuser if flags else None, prefill=bool(flags and flags[0]), decode=bool(flags and flags[1]),
    )
    assert result.output_ids == reference(target, prompt, 40)
    c = result.counters
    assert 0 < c.total_accepted < c.total_drafted, "the tiny pair should partly agree (exercises rollback)"
    expected_prefill = len(prompt) - 1 if flags and flags[0] else 0
    if flags is None:
        assert c.fused_tokens == 0
    elif flags == (True, False):
        assert c.fused_tokens == expected_prefill
    else:  # decode fusion covers generated positions the draft holds
        assert c.fused_tokens > expected_prefill


def test_fusion_changes_the_drafts_guesses_not_the_output(target, draft, fuser):
    prompt = PROMPTS["long"]
    plain = speculate(target, draft, prompt, 4, 40)
    fused = speculate(target, draft, prompt, 4, 40, fuser=fuser)
    assert fused.output_ids == plain.output_ids
    assert (fused.counters.total_accepted, fused.counters.rounds) != (plain.counters.total_accepted, plain.counters.rounds)


def test_fusion_really_rewrites_the_draft_cache(target, draft, fuser):
    prompt = torch.tensor([PROMPTS["long"]])
    with torch.inference_mode():
        tcache, dcache = kv.new_cache(target), kv.new_cache(draft)
        kv.forward(target, prompt, tcache, 0)
        kv.forward(draft, prompt, dcache, 0)
        before = [tuple(t.clone() for t in kv.read_kv(dcache, layer, 0, prompt.shape[1])) for layer in range(2)]
        assert fuse_positions(fuser, tcache, dcache, 3, 10) == 7
        for layer in range(2):
            k, v = kv.read_kv(dcache, layer, 0, prompt.shape[1])
            assert not torch.equal(k[:, :, 3:10], before[layer][0][:, :, 3:10])
            assert not torch.equal(v[:, :, 3:10], before[layer][1][:, :, 3:10])
            assert torch.equal(k[:, :, :3], before[layer][0][:, :, :3]) and torch.equal(k[:, :, 10:], before[layer][0][:, :, 10:])


def test_identical_draft_has_every_token_accepted(target):
    result = speculate(target, target, PROMPTS["short"], 4, 41)
    c = result.counters
    assert c.total_accepted == c.total_drafted > 0
    assert result.output_ids == reference(target, PROMPTS["short"], 41)
    assert c.tokens_per_round == {5: 8}  # 1 token from the prefill, then 8 full rounds of gamma+1


@pytest.mark.parametrize("same_draft", [True, False])
def test_end_of_sequence_inside_a_drafted_block_stops_there(target, draft, same_draft):
    prompt = PROMPTS["short"]
    full = reference(target, prompt, 40)
    stop_at = 11  # an end-of-sequence id first seen at this index, mid-block for gamma 8
    eos = {full[stop_at]}
    first = full.index(full[stop_at])
    expected = full[: first + 1]
    assert reference(target, prompt, 40, eos) == expected
    result = speculate(target, target if same_draft else draft, prompt, 8, 40, eos=eos)
    assert result.output_ids == expected


@pytest.mark.parametrize("n,gamma", [(13, 3), (7, 5), (1, 4), (2, 8)])
def test_never_more_than_max_new_tokens(target, draft, n, gamma):
    for d in (draft, target):
        result = speculate(target, d, PROMPTS["short"], gamma, n)
        assert result.output_ids == reference(target, PROMPTS["short"], n)
        assert len(result.output_ids) == n


def test_after_every_round_both_caches_hold_the_committed_length(target, draft, fuser):
    rounds = []
    result = speculate(target, draft, PROMPTS["short"], 3, 30, fuser=fuser, on_round=rounds.append)
    assert len(rounds) > 1 and rounds[0].round == 0 and rounds[0].drafted == 0  # the prefill's record
    assert rounds[0].target_cache == rounds[0].draft_cache == rounds[0].committed - 1 == len(PROMPTS["short"])
    lag = 0
    for i, r in enumerate(rounds[1:], 1):
        assert r.target_cache == r.committed - 1  # every token but the pending last one
        if r.drafted == 0:  # only a last round with room for one token skips the draft
            assert i == len(rounds) - 1
            lag += 1
        else:
            lag = 1 if r.accepted == r.drafted else 0  # the draft never ran its own last guess
        assert r.draft_cache == r.committed - 1 - lag
    assert rounds[-1].committed == len(PROMPTS["short"]) + len(result.output_ids)


def test_seeded_sampling_repeats_exactly_and_seeds_matter(target, draft, fuser):
    sampling = SamplingConfig(temperature=0.9, top_k=50, top_p=0.95)

    def run(seed):
        gen = torch.Generator().manual_seed(seed)
        return speculate(target, draft, PROMPTS["short"], 4, 30, fuser=fuser, sampling=sampling, generator=gen).output_ids

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_standard_sampling_is_seeded(target):
    sampling = SamplingConfig(temperature=1.0)

    def run(seed):
        with torch.inference_mode():
            return standard_generate(target, PROMPTS["short"], 20, sampling, set(), torch.Generator().manual_seed(seed)).output_ids

    assert run(3) == run(3) and run(3) != run(4)


def test_bad_spec_config_is_rejected():
    with pytest.raises(ValueError, match="gamma"):
        SpecConfig(gamma=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SpecConfig(max_new_tokens=-1)


def test_top2_margin_is_the_gap_between_the_two_best_logits(target):
    from c2c.core.engine import top2_margin

    prompt, prefix = PROMPTS["short"], reference(target, PROMPTS["short"], 5)[:3]
    with torch.inference_mode():
        logits = target(input_ids=torch.tensor([prompt + prefix])).logits[0, -1]
        margin = top2_margin(target, prompt, prefix)
    top = torch.topk(logits, 2).values
    assert margin == pytest.approx((top[0] - top[1]).item(), abs=1e-5) and margin >= 0


@pytest.mark.parametrize("prefill", [True, False])
def test_decode_fusion_covers_the_last_prompt_position_unless_turned_off(target, draft, fuser, prefill):
    """C2C's prefill fusion leaves the last prompt token; our decode fusion fuses it before the first draft."""
    prompt = PROMPTS["long"]
    runs = {}
    for last in (True, False):
        spec = SpecConfig(3, 30, prefill, True, fuse_last_prompt=last)
        seen = []
        with torch.inference_mode():
            decoder = SpeculativeDecoder(target, draft, spec, GREEDY, set(), fuser=fuser)
            result = decoder.generate(prompt)
            seen = decoder.draft_cache.layers[0].keys[0, :, len(prompt) - 1].clone()  # (H, D) at the last prompt position
        assert result.output_ids == reference(target, prompt, 30)
        runs[last] = (result.counters.fused_tokens, seen)
    assert runs[True][0] == runs[False][0] + 1
    assert not torch.equal(runs[True][1], runs[False][1])
