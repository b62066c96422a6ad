"""Tree speculation's pure parts (c2c.core.tree): growth, visibility, the verify mask, the greedy and
sampled walks. No models: token ids, log-probabilities and parents in, tensors out."""

import math
from collections import Counter

import pytest
import torch

from c2c.core import tree
from c2c.errors import UserInputError


def markov(vocab: int, seed: int, sharp: float = 2.0) -> torch.Tensor:
    """A next-token table (V, V) of log-probabilities: row t is the distribution after token t."""
    g = torch.Generator().manual_seed(seed)
    return (sharp * torch.randn(vocab, vocab, generator=g)).log_softmax(-1)


def grow_on(table: torch.Tensor, root_token: int, shape: tree.TreeShape):
    def expand(frontier, grown):
        return table.index_select(0, grown.tokens.index_select(0, frontier))
    return tree.grow(table[root_token], expand, shape)


def test_visibility_is_each_node_and_its_ancestors():
    parents = torch.tensor([-1, -1, 0, 0, 2, 1])
    seen = tree.visibility(parents).int()
    assert seen.tolist() == [[1, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0], [1, 0, 1, 0, 0, 0], [1, 0, 0, 1, 0, 0],
                             [1, 0, 1, 0, 1, 0], [0, 1, 0, 0, 0, 1]]
    assert torch.equal(tree.visibility(parents, depth=3), tree.visibility(parents))


def test_the_verify_mask_lets_a_node_see_the_prefix_the_root_and_its_ancestors():
    """What verify_tree itself builds (tree_steps.verify_allowed), over a cache of 8 positions with 2 held."""
    from c2c.core import cache as kv
    from c2c.core.tree_steps import verify_allowed

    parents = torch.tensor([-1, 0, -1])
    allowed = verify_allowed(parents, tree.visibility(parents), torch.tensor(2), 8).int().tolist()
    assert allowed == [[1, 1, 1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 1, 0, 0]]
    mask = kv.additive_mask(torch.tensor(allowed, dtype=torch.bool), torch.float32)
    assert mask.max() == 0 and mask.min() == torch.finfo(torch.float32).min


@pytest.mark.parametrize("budget, depth, top_k", [(8, 4, 2), (12, 3, 3), (5, 5, 1), (30, 6, 4)])
def test_a_grown_tree_is_closed_under_ancestors_and_keeps_the_best_nodes(budget, depth, top_k):
    table = markov(40, seed=budget + depth)
    kept, grown_index = grow_on(table, 3, tree.TreeShape(budget, depth, top_k))
    assert len(kept) == budget and int(kept.depths.max()) <= depth
    for i in range(len(kept)):
        p = int(kept.parents[i])
        assert p < i and (p == -1 and kept.depths[i] == 1 or kept.depths[i] == kept.depths[p] + 1)
        before = table[3] if p == -1 else table[int(kept.tokens[p])]
        base = 0.0 if p == -1 else float(kept.scores[p])
        assert math.isclose(float(kept.scores[i]), base + float(before[int(kept.tokens[i])]), abs_tol=1e-5)
    for i in range(len(kept)):  # siblings hold distinct tokens
        sib = [j for j in range(len(kept)) if int(kept.parents[j]) == int(kept.parents[i]) and j != i]
        assert all(int(kept.tokens[j]) != int(kept.tokens[i]) for j in sib)
    assert grown_index.shape == (budget,) and bool((grown_index[1:] > grown_index[:-1]).all())


def test_top_k_one_is_the_drafts_greedy_chain():
    table = markov(30, seed=1)
    kept, _ = grow_on(table, 7, tree.TreeShape(5, 5, 1))
    chain, t = [], 7
    for _ in range(5):
        t = int(table[t].argmax())
        chain.append(t)
    assert kept.tokens.tolist() == chain and kept.parents.tolist() == [-1, 0, 1, 2, 3]


def test_the_greedy_walk_follows_the_targets_argmax():
    tokens, parents = torch.tensor([5, 6, 7, 8, 9]), torch.tensor([-1, -1, 0, 0, 3])
    depths = torch.tensor([1, 1, 2, 2, 3])
    # root chooses 5 (node 0); node 0 chooses 8 (node 3); node 3 chooses 9 (node 4); node 4 chooses 2
    choice = torch.tensor([5, 8, 0, 0, 9, 2])
    assert tree.walk(tokens, parents, depths, choice, 3).tolist() == [3, 0, 3, 4, 2]
    choice = torch.tensor([6, 0, 4, 0, 0, 0])  # root -> node 1, which chooses 4: no child holds it
    assert tree.walk(tokens, parents, depths, choice, 3).tolist() == [1, 1, -1, -1, 4]
    choice = torch.tensor([1, 0, 0, 0, 0, 0])  # nothing accepted: the root's choice is the token
    assert tree.walk(tokens, parents, depths, choice, 3).tolist() == [0, -1, -1, -1, 1]


def test_sample_choices_is_inverse_cdf_per_node():
    probs = torch.tensor([[0.0, 0.5, 0.5, 0.0], [0.25, 0.25, 0.25, 0.25]])
    depths = torch.tensor([0, 1])
    assert tree.sample_choices(probs, torch.tensor([0.0, 0.99]), depths).tolist() == [1, 3]
    assert tree.sample_choices(probs, torch.tensor([0.5, 0.3]), depths).tolist() == [2, 1]


def test_tree_sampling_generates_the_targets_distribution():
    """Ancestral sampling through deterministic trees: 3 tokens generated round by round (each round's
    tree grown by the draft's table from the last token, walked with the target's draws) follow the
    target's Markov chain. Chi-square over the 4^3 = 64 sequences of a 4-token vocabulary, 20,000
    samples: with 63 degrees of freedom, the 1e-4 critical value is 117 (a correct sampler fails with
    odds 1e-4; seeded, so the outcome is fixed)."""
    V, n = 4, 20_000
    target = markov(V, seed=3, sharp=1.0).exp()  # (V, V) probabilities
    draft = markov(V, seed=4, sharp=1.0)  # another table: the draft is wrong often
    shape = tree.TreeShape(6, 3, 2)
    g = torch.Generator().manual_seed(0)
    counts = Counter()
    for _ in range(n):
        out, last = [], 0
        while len(out) < 3:
            kept, _ = grow_on(draft, last, shape)
            rows = torch.cat([torch.tensor([last]), kept.tokens])
            choice = tree.sample_choices(target.index_select(0, rows), torch.rand(shape.depth + 1, generator=g),
                                         torch.cat([torch.zeros(1, dtype=torch.long), kept.depths]))
            decision = tree.walk(kept.tokens, kept.parents, kept.depths, choice, shape.depth).tolist()
            accepted, path, token = decision[0], decision[1 : 1 + shape.depth], decision[-1]
            out += [int(kept.tokens[i]) for i in path[:accepted]] + [token]
            last = out[-1]
        counts[tuple(out[:3])] += 1
    chi2 = 0.0
    for a in range(V):
        for b in range(V):
            for c in range(V):
                expected = n * float(target[0, a] * target[a, b] * target[b, c])
                chi2 += (counts[(a, b, c)] - expected) ** 2 / expected
    assert chi2 < 117, chi2


@pytest.mark.parametrize("budget, depth, top_k, flag", [(3, 4, 2, "--tree_budget"), (8, 0, 2, "--tree_depth"),
                                                       (8, 4, 0, "--tree_topk")])
def test_bad_tree_shapes_name_the_flag(budget, depth, top_k, flag):
    with pytest.raises(UserInputError, match=flag):
        tree.TreeShape(budget, depth, top_k)


def test_accepted_under_keeps_the_paths_prefix_within_budget_and_depth():
    # kept tree: 0 (d1, -0.1), 1 (d1, -0.5), 2 (d2 under 0, -0.3), 3 (d2 under 0, -0.9), 4 (d3 under 2, -0.4)
    scores, depths, path = [-0.1, -0.5, -0.3, -0.9, -0.4], [1, 1, 2, 2, 3], [0, 2, 4]
    assert tree.accepted_under(scores, depths, path, 5, 3) == 3  # the recorded tree itself
    assert tree.accepted_under(scores, depths, path, 3, 3) == 3  # ranks 0, 1, 2: -0.1, -0.3, -0.4
    assert tree.accepted_under(scores, depths, path, 2, 3) == 2  # node 4 (rank 2) is cut
    assert tree.accepted_under(scores, depths, path, 5, 1) == 1  # depth 1 holds node 0 only of the path
    assert tree.accepted_under(scores, depths, [1], 1, 3) == 0  # node 1 is not among the best one


def test_choose_shape_trades_tokens_against_round_time():
    scores, depths, path = [-0.1, -0.5, -0.3, -0.9, -0.4], [1, 1, 2, 2, 3], [0, 2, 4]
    rounds = [(scores, depths, path)] * 4
    cheap = {3: 1.0, 6: 1.0}  # a verify costs the same at 3 and 6 tokens: the deepest, largest tree wins
    shape, figures = tree.choose_shape(rounds, cheap, draft_depth_ms=0.1, other_ms=0.0, top_k=2, max_depth=3)
    assert (shape.budget, shape.depth) == (5, 3) and figures["chosen"]["tokens_per_round"] == 4
    steep = {3: 1.0, 6: 10.0}  # a large verify is expensive: the small tree wins
    shape, _ = tree.choose_shape(rounds, steep, draft_depth_ms=0.1, other_ms=0.0, top_k=2, max_depth=3)
    assert shape.budget == 2
