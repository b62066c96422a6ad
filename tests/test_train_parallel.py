"""The parallel-drafting objective (c2c.tools.train_parallel): the attention layout checked query by
query against visible sets built by hand; without fusion every query's logits equal the draft run on
[x_0..x_anchor, j masks] as parallel drafting runs it; block 0 equals the all-position objective."""

import pytest
import torch

from c2c.core import cache as kv
from c2c.tools import train_data, train_objective
from c2c.tools.train_parallel import MaskEmbedding, parallel_logits, supervised_blocks, visible
from tests import tiny


def hand_visible(starts: list[int], k: int) -> list[set[tuple[str, int, int]]]:
    """Per query (j, p) in block-major order, the set of keys it may see, as (kind, block, position)."""
    L, out = len(starts), []
    for j in range(k):
        for p in range(L):
            a = p - j
            if a < 0:
                out.append({("own", j, p)})
                continue
            seen = {("fused", 0, q) for q in range(starts[a])}
            seen |= {("own", 0, q) for q in range(starts[a], a + 1)}
            seen |= {("own", i, a + i) for i in range(1, j + 1)}
            out.append(seen)
    return out


def key_name(index: int, L: int) -> tuple[str, int, int]:
    if index < L:
        return ("fused", 0, index)
    if index < 2 * L:
        return ("own", 0, index - L)
    rest = index - 2 * L
    return ("own", 1 + rest // L, rest % L)


@pytest.mark.parametrize("k, width, offset", [(3, 4, 0), (4, 5, 2), (2, 3, 1), (5, 6, 3)])
def test_the_layout_is_what_each_block_may_see_by_hand(k, width, offset):
    L, lo = 14, 3
    starts, supervised = train_data.block_layout(L, lo, L - 1, width, offset)
    got = visible(starts.view(1, -1), k)[0]
    want = hand_visible(starts.tolist(), k)
    for index, keys in enumerate(want):
        row = {key_name(i, L) for i in torch.nonzero(got[index]).flatten().tolist()}
        assert row == keys, (index // L, index % L)
    sup = supervised_blocks(supervised.view(1, -1), k)[0].view(k, L)
    for j in range(k):
        for p in range(L):
            assert bool(sup[j, p]) == bool(supervised[p] and p - j >= 0 and supervised[p - j]), (j, p)


def test_without_fusion_each_query_is_the_draft_run_on_its_anchor_and_masks(target, draft):
    torch.manual_seed(0)
    L, k = 12, 4
    x = torch.randint(0, tiny.VOCAB - 8, (2, L))
    starts = torch.stack([train_data.block_layout(L, 2, L - 1, k + 1, o)[0] for o in (0, 2)])
    mask = MaskEmbedding(draft, tiny.VOCAB - 1)
    with torch.no_grad():
        mask.vector.add_(torch.randn_like(mask.vector))  # a trained vector, not the row it started from
        _, logits = parallel_logits(None, target, draft, x, starts, mask, k, fuse=False)
        logits = logits.view(2, k, L, -1)
        for b in range(2):
            for j in range(k):
                for p in range(j, L):
                    a = p - j
                    emb = torch.cat([draft.get_input_embeddings()(x[b : b + 1, : a + 1]), mask.vector.view(1, 1, -1).expand(1, j, -1)], 1)
                    want = draft(inputs_embeds=emb).logits[0, -1]
                    assert torch.allclose(logits[b, j, p], want, atol=1e-4), (b, j, p)


def test_block_zero_is_the_all_position_objective(target, draft, fuser):
    torch.manual_seed(1)
    L = 16
    x = torch.randint(0, tiny.VOCAB - 8, (1, L))
    starts = train_data.block_layout(L, 2, L - 1, 5, 1)[0].view(1, -1)
    with torch.no_grad():
        t_all, d_all = train_objective.all_position_logits(fuser, target, draft, x, starts)
        t_par, d_par = parallel_logits(fuser, target, draft, x, starts, MaskEmbedding(draft, tiny.VOCAB - 1), 3)
    assert torch.allclose(t_all, t_par) and torch.allclose(d_all, d_par[:, :L], atol=1e-4)


def test_the_mask_embedding_merges_into_its_row(draft):
    import copy

    copy_ = copy.deepcopy(draft)
    mask = MaskEmbedding(copy_, 5)
    with torch.no_grad():
        mask.vector.fill_(0.5)
    mask.merge_into(copy_)
    assert torch.equal(copy_.get_input_embeddings().weight[5], torch.full_like(mask.vector, 0.5))
    assert kv.cache_keyword(copy_)  # still a model
