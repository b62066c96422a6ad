"""The parallel-drafting objective (`train_fuser --parallel_drafts K`): the draft learns to propose
the target's next K tokens from [a real anchor token, K-1 mask ids] in one forward, reading the fused
K/V of the positions before its round, as `ParallelRound` drafts (c2c.core.parallel).

Layout (PARD's, arXiv 2504.18583, with a fused prefix): a batch's rows x (B, L) are copied into K
blocks; block 0 is the real tokens, block j >= 1 is L mask ids at the positions 0..L-1 of the tokens
they stand for. The draft runs once over the K*L tokens (the mask's embedding a trained vector,
`inputs_embeds`), through a fusing cache (`cache.fusing_cache`: at every layer the real tokens' own
K/V fused at once), and attention keys are [fused real (L), own real (L), own masks ((K-1) L)]. A
query of block j at position p has its anchor a = p - j (the round's last real token) and sees:

- the fused K/V of the real positions before starts[a] (what the draft cache holds before the round:
  every committed token of earlier rounds, fused by decode fusion);
- its own K/V of the real positions starts[a]..a (the round's window: the last round's tokens, the
  draft has not seen them yet, `train_data.block_layout` with width K+1);
- its own K/V of the masks on its diagonal: block i at position a+i, i = 1..j.

Its output is draft j+1 of the round anchored at a: the target's distribution at position p. Block 0
is exactly the all-position objective (offset 1, so AR drafting with the same files still works).
Supervised where both p and the anchor lie in the row's answer span. Without fusion the fused half
is the draft's own K/V (plain PARD). This module knows nothing about files or the loop.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core import cache as kv
from ..core.adapter import MASK_FILE
from ..core.parallel import config_mask_ids


def visible(starts: torch.Tensor, k: int) -> torch.Tensor:
    """(B, K*L, (K+1)*L) bool, what each query of the K blocks sees among [fused real, own real, own
    masks of blocks 1..K-1] (see the module docstring). starts (B, L): each real position's block start.
    Queries whose anchor lies before the sequence see their own key alone (never supervised)."""
    B, L = starts.shape
    device = starts.device
    j = torch.arange(k, device=device).view(k, 1)  # (K, 1) block
    p = torch.arange(L, device=device).view(1, L)  # (1, L) position
    a = p - j  # (K, L) anchor
    start = starts.gather(1, a.clamp_min(0).view(1, -1).expand(B, -1)).view(B, k, L, 1)  # (B, K, L, 1)
    q = torch.arange(L, device=device).view(1, 1, 1, L)
    anchor = a.view(1, k, L, 1)
    fused = q < start  # (B, K, L, L)
    own = (q >= start) & (q <= anchor)
    i = torch.arange(1, k, device=device).view(1, 1, 1, k - 1, 1)  # mask blocks 1..K-1
    diag = (i <= j.view(1, k, 1, 1, 1)) & (q.view(1, 1, 1, 1, L) == (anchor.view(1, k, L, 1, 1) + i))  # (1, K, L, K-1, L)
    masks = diag.expand(B, -1, -1, -1, -1).reshape(B, k, L, (k - 1) * L)
    allowed = torch.cat([fused, own, masks], -1)  # (B, K, L, (K+1) L)
    before = (a < 0).view(1, k, L, 1)  # no anchor: the query sees its own key alone (keeps softmax finite)
    own_key = torch.where(j == 0, L + p, 2 * L + (j - 1) * L + p)  # (K, L): each query's own key
    self_key = torch.arange((k + 1) * L, device=device).view(1, 1, 1, -1) == own_key.view(1, k, L, 1)
    allowed = torch.where(before, self_key, allowed)
    return allowed.view(B, k * L, (k + 1) * L)


def supervised_blocks(supervised: torch.Tensor, k: int) -> torch.Tensor:
    """(B, K*L) bool: query (j, p) is supervised when p and its anchor p - j are both in the span."""
    B, L = supervised.shape
    rows = [supervised]
    for j in range(1, k):
        anchor_in = torch.cat([supervised.new_zeros(B, j), supervised[:, : L - j]], 1)
        rows.append(supervised & anchor_in)
    return torch.cat(rows, 1)


class MaskEmbedding(nn.Module):
    """The mask token's embedding, trained (initialised from the draft's row of `mask_id`). Inference
    writes it into that row of the draft's embedding (`merge_into`): no resize, as PARD drafts do."""

    def __init__(self, draft, mask_id: int):
        super().__init__()
        self.mask_id = mask_id
        self.vector = nn.Parameter(draft.get_input_embeddings().weight[mask_id].detach().float().clone())

    def embeds(self, draft, x: torch.Tensor, k: int) -> torch.Tensor:
        """(B, K*L, H): the real tokens' embeddings, then K-1 blocks of the mask vector, as the draft's
        embedding layer returns its row (Gemma's scale the rows by sqrt(hidden): `embed_scale`)."""
        layer = draft.get_input_embeddings()
        real = layer(x)  # (B, L, H)
        scale = getattr(layer, "embed_scale", None)
        vector = self.vector if scale is None else self.vector * torch.as_tensor(scale, device=self.vector.device)
        mask = vector.to(real.dtype).view(1, 1, -1).expand(x.shape[0], x.shape[1] * (k - 1), -1)
        return torch.cat([real, mask], 1)

    @torch.no_grad()
    def merge_into(self, draft) -> None:
        draft.get_input_embeddings().weight[self.mask_id] = self.vector.to(draft.get_input_embeddings().weight.dtype)


def cod_queries(length: int, k: int, rate: float, floor: float, seed: tuple[int, int]) -> torch.Tensor | None:
    """PARD's conditional drop-token (COD): the queries (indices into the K*L block-major queries) one
    training step keeps; None when `rate` is 0 (all of them). Block 0 is kept whole; in mask block j the
    query at p (anchor a = p - j) is kept iff a's chain reaches block j: it goes on past block j-1 with
    probability share(j) / share(j-1), share(j) = max(rate**j, floor), so block j keeps share(j) of its
    anchors on average and a kept mask query always has the masks before it on its diagonal (the keys
    it attends to). Queries without an anchor (p < j, never supervised) are dropped. Drawn from `seed`
    (the run's seed and the step): the same on every process and on --resume; one choice per position
    for the whole batch."""
    if not rate or k < 2:
        return None
    share = [max(rate**j, floor) for j in range(k)]
    go_on = torch.tensor([share[j] / share[j - 1] for j in range(1, k)])  # (K-1,)
    generator = torch.Generator().manual_seed(seed[0] * 1_000_003 + seed[1])
    reach = (torch.rand(length, k - 1, generator=generator) < go_on).long().cumprod(1).bool()  # (L, K-1): a reaches block j
    kept = [torch.arange(length)]
    for j in range(1, k):
        anchors = torch.nonzero(reach[: max(length - j, 0), j - 1]).flatten()  # anchors whose query p = a + j lies in the row
        kept.append(j * length + anchors + j)
    return torch.cat(kept)


def narrowed(queries: torch.Tensor | None, length: int, width: int) -> torch.Tensor | None:
    """`cod_queries` drawn for the global batch (`length` positions) as indices into one process's share
    of it, cut to `width` <= length positions (`Batch.share`): the queries past `width` (padding in that
    share, never supervised) dropped, block 0 still whole and first."""
    if queries is None or width == length:
        return queries
    j, p = queries.div(length, rounding_mode="floor"), queries.remainder(length)
    inside = p < width
    return j[inside] * width + p[inside]


def parallel_logits(fuser, target, draft, x: torch.Tensor, starts: torch.Tensor, mask: MaskEmbedding, k: int,
                    fuse: bool = True, target_logits: torch.Tensor | None = None, queries: torch.Tensor | None = None):
    """Target logits (B, L, V) and the draft's (B, K*L, V): query (j, p) is draft j+1 of the round
    anchored at p - j, compared with the target's at p. One target forward (skipped when given) and
    one draft pass. `queries` (Q,) (COD, `cod_queries`): only those queries run (the first L, block 0,
    always), and the draft's logits are (B, Q, V) in that order."""
    B, L = x.shape
    tcache = None
    if target_logits is None or fuse:
        with torch.no_grad():
            tcache = kv.new_cache(target)
            t_logits = kv.forward(target, x, tcache, 0)
        target_logits = t_logits if target_logits is None else target_logits

    def fuse_layer(layer, keys, values):
        real = keys[:, :, :L], values[:, :, :L]
        if not fuse or layer not in fuser.layer_map:
            return real
        return fuser.fuse_layer(layer, kv.read_kv(tcache, fuser.layer_map[layer][0], 0, L), real)

    allowed = visible(starts.to(x.device), k)  # (B, KL, (K+1)L)
    positions = torch.arange(L, device=x.device).repeat(k).expand(B, -1)  # (B, K*L)
    embeds = mask.embeds(draft, x, k)  # (B, K*L, H)
    if queries is not None:  # keys: [fused real, own real] whole, then the kept mask queries' own K/V
        queries = queries.to(x.device)
        columns = torch.cat([torch.arange(2 * L, device=x.device), L + queries[L:]])
        allowed = allowed.index_select(1, queries).index_select(2, columns)
        positions, embeds = positions.index_select(1, queries), embeds.index_select(1, queries)
    real = torch.arange(L, device=x.device).view(1, L)  # keys: [fused real, own real, the queries' own masks]
    attention = kv.layer_masks(draft, allowed, positions[:1], torch.cat([real, positions[:1]], 1))  # (B, 1, Q, L + Q)
    logits = kv.forward_embeds(draft, embeds, kv.fusing_cache(draft, fuse_layer), positions, attention)
    return target_logits, logits


# ---------------------------------------------------------------- the trainer's side


def default_mask_id(draft, tokenizer=None) -> int:
    """An id for the mask, as PARD takes one from the unused range: the draft's last embedding row when
    the tokenizer holds fewer ids than the embedding (Qwen3: 151,669 of 151,936), else the largest id
    that decodes to a control character (never in text), else the largest that is not a special token
    (its row is then trained as the mask; `--mask_id` chooses another)."""
    rows = draft.get_input_embeddings().weight.shape[0]
    used = len(tokenizer) if tokenizer is not None else rows
    if used < rows:
        return rows - 1
    special = set(getattr(tokenizer, "all_special_ids", [])) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    ordinary = [i for i in range(used - 1, -1, -1) if i not in special]
    if tokenizer is not None:  # a byte-level vocabulary's control characters never occur in text
        for i in ordinary:
            text = tokenizer.decode([i])
            if len(text) == 1 and ord(text) < 32 and text not in "\t\n\r":
                return i
    return ordinary[0]


def check_mask_id(requested: int, draft, tokenizer, say=print) -> int:
    """The mask id a run trains: `requested` (-1: `default_mask_id`), inside the draft's embedding rows
    (an error otherwise); a requested id the text may hold gets a warning (its row becomes the mask)."""
    from ..errors import UserInputError

    rows = draft.get_input_embeddings().weight.shape[0]
    named = config_mask_ids(draft.config)  # a draft trained for parallel drafting already (PARD's layout)
    if requested == -1 and named is not None:
        if len(set(named)) > 1:
            raise UserInputError(f"the draft's config.json names {len(set(named))} mask ids ({named}); the trainer trains "
                                 "one: choose it with --mask_id")
        if not 0 <= named[0] < rows:
            raise UserInputError(f"the draft's config.json names mask id {named[0]}, outside its {rows} embedding rows: "
                                 "fix its config.json, or choose one with --mask_id")
        say(f"parallel drafting: mask id {named[0]}, the one the draft's config.json names (its row is trained on from "
            "where it is)")
        return named[0]
    if requested == -1:
        chosen = default_mask_id(draft, tokenizer)
        say(f"parallel drafting: mask id {chosen} (an id the tokenizer never makes)")
        return chosen
    if not 0 <= requested < rows:
        raise UserInputError(f"--mask_id {requested} is outside the draft's {rows} embedding rows: choose one below {rows}, "
                             "or -1 for a free one")
    if requested < len(tokenizer) and requested not in set(getattr(tokenizer, "all_special_ids", [])):
        text = tokenizer.decode([requested])
        if not (len(text) == 1 and ord(text) < 32):
            say(f"WARNING: --mask_id {requested} is the token {text!r}, which the text may hold: its embedding row is "
                "trained as the mask, and the draft reads that token as a mask from then on (-1 picks an unused id)")
    return requested


def step_loss(trainer, mine, total_queries: int, queries: torch.Tensor | None = None):
    """The parallel objective's loss on this process's share of a batch: the mean over the global
    batch's supervised queries (every offset weighs the same, as PARD's); `queries`: COD's kept ones."""
    cfg = trainer.cfg
    k = cfg.parallel_drafts
    t_logits, d_logits = parallel_logits(trainer.fuser, trainer.target, trainer.draft, mine.x.to(trainer.device), mine.starts,
                                         trainer.mask, k, fuse=cfg.fusion, queries=queries)
    from .train_objective import token_losses

    keep = supervised_blocks(mine.supervised.to(trainer.device), k)
    L = t_logits.shape[1]
    queries = torch.arange(k * L, device=trainer.device) if queries is None else queries.to(trainer.device)
    keep = keep.index_select(1, queries)
    t_logits = t_logits.index_select(1, queries.remainder(L))  # each query's target position, no K-fold copy
    return token_losses(t_logits[keep], d_logits[keep], cfg.objective).sum() / total_queries


@torch.no_grad()
def offset_agreement(trainer, batches) -> dict:
    """Held-out top-1 agreement with the target per offset (draft 1..K of a round), fused (as trained)
    and unfused (the same draft and mask, fusion off), with the paired won/lost per offset."""
    cfg, k = trainer.cfg, trainer.cfg.parallel_drafts
    right = {arm: [0] * k for arm in ("fused", "unfused")}
    won, lost, total = [0] * k, [0] * k, [0] * k
    for batch in batches:
        x = batch.x.to(trainer.device)
        keep = supervised_blocks(batch.supervised.to(trainer.device), k).view(x.shape[0], k, -1)
        t, fused = parallel_logits(trainer.fuser, trainer.target, trainer.draft, x, batch.starts, trainer.mask, k, fuse=cfg.fusion)
        plain = fused if not cfg.fusion else parallel_logits(trainer.fuser, trainer.target, trainer.draft, x, batch.starts,
                                                             trainer.mask, k, fuse=False, target_logits=t)[1]
        want = t.argmax(-1)  # (B, L)
        for j in range(k):
            m = keep[:, j]
            f = fused.view(x.shape[0], k, x.shape[1], -1)[:, j].argmax(-1)[m] == want[m]
            u = plain.view(x.shape[0], k, x.shape[1], -1)[:, j].argmax(-1)[m] == want[m]
            right["fused"][j] += int(f.sum())
            right["unfused"][j] += int(u.sum())
            won[j] += int((f & ~u).sum())
            lost[j] += int((u & ~f).sum())
            total[j] += int(m.sum())
    share = lambda counts: [c / n if n else None for c, n in zip(counts, total)]  # noqa: E731
    return {"parallel_agreement_fused": share(right["fused"]), "parallel_agreement_unfused": share(right["unfused"]),
            "parallel_won": won, "parallel_lost": lost, "parallel_positions": total}


class merged_mask:
    """While inside, the draft's embedding row `mask_id` holds the trained mask vector (the engine
    reads ids, not embeddings); the row is restored after."""

    def __init__(self, draft, mask: MaskEmbedding):
        self.draft, self.mask = draft, mask

    def __enter__(self):
        weight = self.draft.get_input_embeddings().weight
        self.saved = weight[self.mask.mask_id].detach().clone()
        self.mask.merge_into(self.draft)

    def __exit__(self, *exc):
        with torch.no_grad():
            self.draft.get_input_embeddings().weight[self.mask.mask_id] = self.saved


@torch.no_grad()
def engine_figures(trainer, prompts: list[list[int]]) -> dict:
    """The engine's tokens per target call for the parallel round (gamma K, greedy) on held-out prompts,
    with the trained draft (adapter on, mask merged), fused and unfused (each output the target's own),
    and the paired verdict over prompts (c2c.tools.engine_eval), every key prefixed `parallel_`."""
    from .engine_eval import decode_counts, figures

    cfg = trainer.cfg
    args = (trainer.target, trainer.draft, prompts, cfg.parallel_drafts, cfg.eval_new_tokens, trainer.eos_ids)
    with merged_mask(trainer.draft, trainer.mask):  # adapter=None: the unfused arm keeps the trained adapter on
        fused = decode_counts(trainer.fuser if cfg.fusion else None, *args, masks=[trainer.mask.mask_id])
        unfused = decode_counts(None, *args, masks=[trainer.mask.mask_id])
    return {f"parallel_{k}": v for k, v in figures(fused, unfused).items()}


def save(trainer, folder, dtype: torch.dtype) -> None:
    """The mask vector beside the adapter, and its id and K in adapter.json (c2c.core.adapter.load_mask reads them)."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    folder = Path(folder)
    save_file({"mask": trainer.mask.vector.detach().to("cpu", dtype).contiguous()}, str(folder / MASK_FILE))  # read by adapter.load_mask
    meta = json.loads((folder / "adapter.json").read_text(encoding="utf-8"))
    meta |= {"parallel_drafts": trainer.cfg.parallel_drafts, "mask_id": trainer.mask.mask_id}
    (folder / "adapter.json").write_text(json.dumps(meta, indent=2))


def export_pard(trainer, folder, tokenizer, dtype: torch.dtype):
    """The trained draft in PARD's layout: the adapter merged into its weights, the mask vector in its
    row, `pard_token` in config.json. vLLM's parallel drafting and `--parallel_drafting` load it as it is."""
    from pathlib import Path

    import copy

    folder = Path(folder)
    if trainer.adapter is not None:
        trainer.adapter.detach()  # a copy of an attached draft would carry the hooks on top of the merged change
        model = trainer.adapter.merged_copy(trainer.draft)
        trainer.adapter.attach(trainer.draft)
    else:
        model = copy.deepcopy(trainer.draft)
    trainer.mask.merge_into(model)
    model.config.pard_token = trainer.mask.mask_id
    model.to(dtype).save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder
