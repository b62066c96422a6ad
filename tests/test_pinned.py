"""Definitions users rely on that a plausible one-line bug would change while the output stays lossless:
the accepted length counts the target's own token, fusion covers exactly the committed positions,
C2C's hard gate opens only above logit 0, the counters add up as documented."""

import pytest
import torch

from c2c.core import cache as kv
from c2c.core import metrics
from c2c.core.engine import Counters, GenerationResult, SpecConfig, SpeculativeDecoder, standard_generate
from c2c.core.fuser import C2CFuser, KVShape, StackedProjectors
from c2c.core.sampling import SamplingConfig

PROMPT = [5, 17, 33, 80, 91, 12, 7, 44]


def test_average_accepted_length_counts_the_bonus_and_correction_tokens():
    """3 rounds accepting 6 drafts emit 6 drafts + 3 target tokens, plus the prefill's token: 10 tokens
    over 4 target passes = 2.5 (without the target's own token per round it would read 1.75)."""
    c = Counters(draft_calls=13, target_calls=4, rounds=3, total_drafted=12, total_accepted=6, rejections=3,
                 drafted_at=[3, 3, 3, 3], accepted_at=[3, 2, 1, 0])
    result = GenerationResult(list(range(10)), 1.0, 0.1, c)
    m = metrics.speculative_metrics(result, "", gamma=4)
    assert m["average_accepted_length"] == pytest.approx(2.5)
    assert m["num_tokens"] == 10 and m["tokens_per_second"] == pytest.approx(10.0)


@pytest.mark.parametrize("gamma", [1, 3, 5])
def test_engine_counters_add_up_as_documented(target, draft, fuser, gamma):
    with torch.inference_mode():  # no end-of-sequence ids: the run makes all 40 tokens
        result = SpeculativeDecoder(target, draft, SpecConfig(gamma, 40), SamplingConfig(), set(), fuser=fuser).generate(PROMPT)
    c = result.counters
    m = metrics.speculative_metrics(result, "", gamma)
    assert len(result.output_ids) == 40
    assert c.target_calls == c.rounds + 1  # the prefill plus one verify per round
    # every round emits its accepted drafts plus exactly one target token; the prefill emits one
    assert len(result.output_ids) == 1 + c.total_accepted + c.rounds
    assert m["average_accepted_length"] == pytest.approx((1 + c.total_accepted + c.rounds) / (c.rounds + 1))
    assert sum(k * v for k, v in c.tokens_per_round.items()) == len(result.output_ids) - 1
    assert sum(c.tokens_per_round.values()) == c.rounds and c.rejections <= c.rounds
    assert c.accepted_at[0] <= c.drafted_at[0] and all(a >= b for a, b in zip(c.accepted_at, c.accepted_at[1:]))


def layer0_keys_unfused(draft, ids: list[int]) -> torch.Tensor:
    """The draft's layer-0 K for `ids` without fusion. Layer 0's K depends only on each token and its
    position, so a position of a fused run whose layer-0 K equals this one (up to the rounding of a
    differently blocked matrix product) was not fused."""
    cache = kv.new_cache(draft)
    kv.forward(draft, torch.tensor([ids]), cache, 0)
    return kv.read_kv(cache, 0, 0, len(ids))[0]


@pytest.mark.parametrize("fuse_last_prompt", [True, False])
@pytest.mark.parametrize("gamma", [1, 4])
def test_fusion_covers_every_committed_position_and_only_those(target, draft, fuser, gamma, fuse_last_prompt):
    spec = SpecConfig(gamma, 30, True, True, fuse_last_prompt=fuse_last_prompt)
    with torch.inference_mode():
        dec = SpeculativeDecoder(target, draft, spec, SamplingConfig(), set(), fuser=fuser)
        result = dec.generate(PROMPT)
        held = kv.length(dec.draft_cache)
        ids = (PROMPT + result.output_ids)[:held]
        fused = kv.read_kv(dec.draft_cache, 0, 0, held)[0]
        plain = layer0_keys_unfused(draft, ids)
    changed = [not torch.allclose(fused[:, :, p], plain[:, :, p], atol=1e-4) for p in range(held)]
    last_prompt = len(PROMPT) - 1
    expected = [fuse_last_prompt or p != last_prompt for p in range(held)]
    assert changed == expected
    assert result.counters.fused_tokens == held - (0 if fuse_last_prompt else 1)


def test_no_fusion_leaves_every_position_unfused(target, draft, fuser):
    spec = SpecConfig(4, 20, False, False)
    with torch.inference_mode():
        dec = SpeculativeDecoder(target, draft, spec, SamplingConfig(), set(), fuser=fuser)
        result = dec.generate(PROMPT)
        held = kv.length(dec.draft_cache)
        ran = kv.read_kv(dec.draft_cache, 0, 0, held)[0]
        assert torch.allclose(ran, layer0_keys_unfused(draft, (PROMPT + result.output_ids)[:held]), atol=1e-5)
    assert result.counters.fused_tokens == 0


@pytest.mark.parametrize("logit, opens", [(0.0, False), (-1e-6, False), (1e-6, True)])
def test_hard_gate_opens_only_above_zero(logit, opens):
    torch.manual_seed(0)
    fuser = C2CFuser.create(KVShape(2, 1, 8), KVShape(3, 2, 4), hidden_dim=16, intermediate_dim=16)
    for p in fuser.projectors:
        p.key_gate_logit.data.fill_(logit)
        p.value_gate_logit.data.fill_(logit)
    fuser.eval().requires_grad_(False)
    assert fuser.open_gates() == ((4, 4) if opens else (0, 4))
    tk, tv = torch.randn(2, 1, 2, 3, 4), torch.randn(2, 1, 2, 3, 4)
    dk, dv = torch.randn(2, 1, 1, 3, 8), torch.randn(2, 1, 1, 3, 8)
    single = fuser.projectors[0](tk[0], tv[0], dk[0], dv[0])
    for k, v in (fuser.fuse_layers(tk, tv, dk, dv), fuser.batched().fuse_layers(tk, tv, dk, dv)):
        assert torch.equal(k, dk) != opens and torch.equal(v, dv) != opens
    assert torch.equal(single[0], dk[0]) != opens
    assert isinstance(fuser.batched(), StackedProjectors)  # the stacked path above is the one inference uses


def test_acceptance_rate_counts_drafts_after_a_rejection_and_probability_does_not():
    c = Counters(target_calls=3, rounds=2, total_drafted=8, total_accepted=1, rejections=2,
                 drafted_at=[2, 2, 2, 2], accepted_at=[1, 0, 0, 0])
    stats = metrics.round_statistics(c, gamma=4)
    assert stats["acceptance_rate"] == pytest.approx(1 / 8)
    assert stats["acceptance_probability"] == pytest.approx(1 / 3)
    assert stats["accepted_per_position"] == pytest.approx([0.5, 0.0, 0.0, 0.0])


def test_greedy_output_equals_target_for_every_gamma_up_to_the_length(target, draft, fuser):
    with torch.inference_mode():
        ref = standard_generate(target, PROMPT, 24, SamplingConfig(), set()).output_ids
        for gamma in range(1, 9):
            out = SpeculativeDecoder(target, draft, SpecConfig(gamma, 24), SamplingConfig(), set(), fuser=fuser).generate(PROMPT)
            assert out.output_ids == ref, gamma
