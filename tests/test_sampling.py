"""The acceptance rules. Sampling must preserve the target distribution exactly (statistical test)."""

import math

import pytest
import torch

from c2c.core.sampling import SamplingConfig, accept_greedy, accept_sampled, probabilities


def chi2_critical(df: int, tail: float = 1e-6) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile with upper tail `tail`."""
    z = {1e-6: 4.7534}[tail]
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_greedy_accepts_the_agreeing_prefix_then_the_targets_token():
    logits = torch.full((4, 6), -1.0)
    for i, best in enumerate([2, 4, 1, 5]):
        logits[i, best] = 1.0
    n, token = accept_greedy(torch.tensor([2, 4, 3]), logits)
    assert (n.item(), token.item()) == (2, 1)  # correction at the first mismatch
    n, token = accept_greedy(torch.tensor([2, 4, 1]), logits)
    assert (n.item(), token.item()) == (3, 5)  # all accepted: the bonus token
    n, token = accept_greedy(torch.tensor([0, 4, 1]), logits)
    assert (n.item(), token.item()) == (0, 2)


def test_speculative_sampling_preserves_the_target_distribution():
    """Simulate whole sequences with toy position-dependent p and q; each emitted position must follow p.

    Failure odds for a correct rule: under 1e-6 per chi-square test (3 tests, fixed seed).
    """
    V, gamma, trials, positions = 6, 2, 20000, 3
    g = torch.Generator().manual_seed(1234)
    p = torch.softmax(torch.randn(positions + gamma + 1, V, generator=g) * 1.5, -1)  # target, per position
    q = torch.softmax(torch.randn(positions + gamma + 1, V, generator=g) * 1.5, -1)  # a draft that disagrees
    counts = torch.zeros(positions, V)
    for _ in range(trials):
        seq = []
        while len(seq) < positions:
            at = len(seq)
            drafted = torch.multinomial(q[at : at + gamma], 1, generator=g).squeeze(-1)  # (gamma,)
            n, token = accept_sampled(drafted, q[at : at + gamma], p[at : at + gamma + 1], g)
            seq += drafted[: int(n)].tolist() + [int(token)]
        for pos in range(positions):
            counts[pos, seq[pos]] += 1
    for pos in range(positions):
        assert chi2(counts[pos], p[pos]) < chi2_critical(V - 1), f"position {pos}: {counts[pos]} vs {p[pos] * trials}"


def test_a_draft_equal_to_the_target_is_always_accepted():
    p = torch.softmax(torch.randn(4, 9), -1)
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        drafted = torch.multinomial(p[:3], 1, generator=g).squeeze(-1)
        n, _ = accept_sampled(drafted, p[:3], p, g)
        assert n.item() == 3


def test_probabilities_top_k_and_top_p():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert torch.allclose(probabilities(logits, SamplingConfig(1.0)), torch.tensor([0.5, 0.3, 0.15, 0.05]))
    top2 = probabilities(logits, SamplingConfig(1.0, top_k=2))
    assert torch.allclose(top2, torch.tensor([0.625, 0.375, 0.0, 0.0]))
    nucleus = probabilities(logits, SamplingConfig(1.0, top_p=0.8))  # smallest set reaching 0.8: first two
    assert torch.allclose(nucleus, torch.tensor([0.625, 0.375, 0.0, 0.0]))
    sharp = probabilities(logits, SamplingConfig(0.5))
    assert sharp[0] > 0.5 and torch.isclose(sharp.sum(), torch.tensor(1.0))


@pytest.mark.parametrize("kwargs", [{"temperature": -1}, {"top_k": -2}, {"top_p": 0.0}, {"top_p": 1.5}])
def test_bad_sampling_settings_are_rejected(kwargs):
    with pytest.raises(ValueError):
        SamplingConfig(**kwargs)


def test_engine_sampling_follows_the_target_joint_distribution_with_an_eos_inside_blocks(target, draft):
    """Whole speculative runs (gamma 3, tiny models, top-k 4 so the support is small): the first two
    output tokens must follow the target's exact joint distribution, computed from its logits, while
    one of the likely tokens is an end-of-sequence id (runs that emit it stop there, inside a block).
    Failure odds for a correct engine: under 1e-6 (chi-square, fixed seed)."""
    from c2c.core import cache as kv
    from c2c.core.engine import SpecConfig, SpeculativeDecoder

    prompt, cfg = [5, 9, 33], SamplingConfig(temperature=1.5, top_k=4)

    def next_probs(ids):
        with torch.inference_mode():
            logits = kv.forward(target, torch.tensor([ids]), kv.new_cache(target), 0, logits_to_keep=1)[0, -1]
        return probabilities(logits, cfg)

    p1 = next_probs(prompt)
    firsts = torch.nonzero(p1).flatten().tolist()
    eos = {firsts[1]}  # the second most likely first token ends the sequence
    cells = {}
    for t1 in firsts:
        if t1 in eos:
            cells[(t1, None)] = p1[t1].item()
            continue
        p2 = next_probs(prompt + [t1])
        for t2 in torch.nonzero(p2).flatten().tolist():
            cells[(t1, t2)] = p1[t1].item() * p2[t2].item()
    keys = list(cells)
    counts = torch.zeros(len(keys))
    gen = torch.Generator().manual_seed(7)
    with torch.inference_mode():
        decoder = SpeculativeDecoder(target, draft, SpecConfig(3, 4), cfg, eos, generator=gen)  # one 2-token block
        for _ in range(800):
            out = decoder.generate(prompt).output_ids
            if out[0] in eos:
                assert out == out[:1]
            key = (out[0], None if out[0] in eos else out[1])
            counts[keys.index(key)] += 1
            assert all(t not in eos for t in out[:-1])  # nothing after an end-of-sequence token
    assert chi2(counts, torch.tensor([cells[k] for k in keys])) < chi2_critical(len(keys) - 1)
