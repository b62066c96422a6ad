"""The trainer on sliding-window drafts (Mistral: a window on every layer; Gemma 2: sliding and global
layers alternating): with sequences longer than the window, each query of the all-position and the
parallel objectives equals what decoding computes -- prefill of the prefix, prefill fusion, then the
round's tokens through that cache, under the model's own sliding mask."""

import pytest
import torch

from c2c.core import cache as kv
from c2c.core.engine import fuse_positions
from c2c.tools.train_objective import all_position_logits
from c2c.tools.train_parallel import MaskEmbedding, parallel_logits
from tests import archs, tiny


def engine_logits(target, draft, fuser, x, m: int, tail: torch.Tensor) -> torch.Tensor:
    """The draft's logits at the last of `tail` (T, H embeddings) fed at positions m.. after a prefix
    x[:, :m] prefilled and fused, as decoding computes them."""
    tcache, dcache = kv.new_cache(target), kv.new_cache(draft)
    kv.forward(target, x[:, :m], tcache, 0)
    kv.forward(draft, x[:, :m], dcache, 0)
    fuse_positions(fuser, tcache, dcache, 0, m)
    positions = torch.arange(m, m + tail.shape[0]).view(1, -1)
    keyword = kv.cache_keyword(draft)
    return draft(inputs_embeds=tail.unsqueeze(0), position_ids=positions, use_cache=True, **{keyword: dcache}).logits[0, -1]


@pytest.mark.parametrize("name", ["Mistral", "Gemma 2"])
def test_both_objectives_see_what_decoding_sees_past_the_window(name):
    target, draft = archs.build_pair(archs.BY_NAME[name])
    fuser = archs.open_fuser(draft, target)
    torch.manual_seed(3)
    L, m, k = 30, 14, 3  # the window is archs.WINDOW (12): queries from position 14 on see past it
    assert archs.WINDOW < m
    x = torch.randint(3, tiny.VOCAB - 8, (1, L))
    starts = torch.where(torch.arange(L) < m, 0, m).view(1, L)  # the prompt [0, m), then one block from m
    embed = draft.get_input_embeddings()
    with torch.no_grad():
        _, chain = all_position_logits(fuser, target, draft, x, starts)
        mask = MaskEmbedding(draft, tiny.VOCAB - 1)
        mask.vector.add_(torch.randn_like(mask.vector))
        _, parallel = parallel_logits(fuser, target, draft, x, starts, mask, k)
        parallel = parallel.view(k, L, -1)
        for p in range(m, L):
            want = engine_logits(target, draft, fuser, x, m, embed(x[0, m : p + 1]))
            assert torch.allclose(chain[0, p], want, atol=1e-4), (name, p)
        for j in range(1, k):
            for a in range(m, L - j, 3):
                tail = torch.cat([embed(x[0, m : a + 1]), mask.vector.view(1, -1).expand(j, -1)])
                want = engine_logits(target, draft, fuser, x, m, tail)
                assert torch.allclose(parallel[j, a + j], want, atol=1e-4), (name, j, a)
