"""The trainer on sliding-window drafts (Mistral, Starcoder2, Phi-3: a window on every layer; Gemma
2/3, Qwen2: sliding and global layers): with sequences longer than the window, each query of the
all-position and the parallel objectives equals what decoding computes -- prefill of the prefix,
prefill fusion, then the round's tokens through that cache, under the model's own sliding mask; in a
batch of rows with their own blocks, padding and COD's subset of queries too."""

import dataclasses

import pytest
import torch

from c2c.core import cache as kv
from c2c.core.engine import fuse_positions
from c2c.tools.train_objective import all_position_logits
from c2c.tools.train_parallel import MaskEmbedding, cod_queries, parallel_logits
from tests import archs, tiny


def decoded_mask(draft, mask: MaskEmbedding) -> torch.Tensor:
    """The mask token's input embedding as decoding computes it: the vector merged into its row of a
    copy of the draft, looked up by id (Gemma's embedding layer scales it)."""
    import copy

    merged = copy.deepcopy(draft)
    mask.merge_into(merged)
    return merged.get_input_embeddings()(torch.tensor([mask.mask_id]))[0]


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
                tail = torch.cat([embed(x[0, m : a + 1]), decoded_mask(draft, mask).view(1, -1).expand(j, -1)])
                want = engine_logits(target, draft, fuser, x, m, tail)
                assert torch.allclose(parallel[j, a + j], want, atol=1e-4), (name, j, a)


def windowed(name: str) -> archs.Arch:
    """`name` from archs, or "Phi-3 windowed" (Phi-3 with a sliding window, as Phi-3-mini-4k) and
    "Qwen2 windowed" (a window on the layers from max_window_layers on: sliding and global layers
    without Gemma's alternation)."""
    base, windowed_, _ = name.partition(" windowed")
    if not windowed_:
        return archs.BY_NAME[name]
    arch = archs.BY_NAME[base]
    more = dict(sliding_window=archs.WINDOW)
    if base == "Qwen2":
        more |= dict(use_sliding_window=True, max_window_layers=1)
    return dataclasses.replace(arch, name=name, config=arch.config | more)


def decoded(target, draft, fuser, x, starts, m: int, tail: torch.Tensor) -> torch.Tensor:
    """As `engine_logits` for one row x (1, L) whose layout `starts` (L,) may hold several blocks
    before m: prefill of the prompt (block start 0) and its fusion, then each block before m as a
    round through the cache, fused after it, then `tail` at positions m.."""
    dcache = kv.new_cache(draft)
    if m:
        tcache = kv.new_cache(target)
        kv.forward(target, x[:, :m], tcache, 0)
        prompt = int((starts[:m] == 0).sum())
        kv.forward(draft, x[:, :prompt], dcache, 0)
        fuse_positions(fuser, tcache, dcache, 0, prompt)
        bounds = sorted(set(starts[prompt:m].tolist())) + [m]
        for s, e in zip(bounds, bounds[1:]):
            kv.forward(draft, x[:, s:e], dcache, s)
            fuse_positions(fuser, tcache, dcache, s, e)
    positions = torch.arange(m, m + tail.shape[0]).view(1, -1)
    keyword = kv.cache_keyword(draft)
    return draft(inputs_embeds=tail.unsqueeze(0), position_ids=positions, use_cache=True, **{keyword: dcache}).logits[0, -1]


@pytest.mark.parametrize("name", ["Mistral", "Gemma 2", "Gemma 3", "Starcoder2", "Phi-3 windowed", "Qwen2 windowed"])
def test_a_batch_of_rows_with_their_own_blocks_and_padding_sees_what_decoding_sees(name):
    """Two rows, different prompts and blocks (several per row, queries past the window in each),
    right padding (own blocks); the parallel objective with COD's subset of queries."""
    arch = windowed(name)
    target = archs.build_model(arch)
    draft = archs.build_model(arch)
    archs._perturb(draft, 0.25, 100)
    fuser = archs.open_fuser(draft, target)
    assert set(kv.sliding_windows(draft).values()) & {archs.WINDOW}
    torch.manual_seed(3)
    L, k = 28, 3
    x = torch.randint(3, tiny.VOCAB - 8, (2, L))
    pos = torch.arange(L)
    starts = torch.stack([torch.where(pos < 14, 0, torch.where(pos < 24, 14, pos)),  # prompt, a block, padding
                          torch.where(pos < 5, 0, torch.where(pos < 19, 5, 19))])  # prompt, a long block, another
    embed = draft.get_input_embeddings()
    with torch.no_grad():
        _, chain = all_position_logits(fuser, target, draft, x, starts)
        mask = MaskEmbedding(draft, tiny.VOCAB - 1)
        mask.vector.add_(torch.randn_like(mask.vector))
        queries = cod_queries(L, k, 0.6, 0.3, (1, 2))
        _, parallel = parallel_logits(fuser, target, draft, x, starts, mask, k, queries=queries)
        for b in range(2):
            for p in range(1, L, 3):
                m = int(starts[b, p])
                want = decoded(target, draft, fuser, x[b : b + 1], starts[b], m, embed(x[b, m : p + 1]))
                assert torch.allclose(chain[b, p], want, atol=1e-4), (name, b, p)
            for i, q in enumerate(queries.tolist()):
                j, p = divmod(q, L)
                if j == 0 or p % 2:
                    continue
                m = int(starts[b, p - j])
                tail = torch.cat([embed(x[b, m : p - j + 1]), decoded_mask(draft, mask).view(1, -1).expand(j, -1)])
                want = decoded(target, draft, fuser, x[b : b + 1], starts[b], m, tail)
                assert torch.allclose(parallel[b, i], want, atol=1e-4), (name, b, j, p)
