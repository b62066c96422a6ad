"""The trainer's data: sequences with a supervised span, drawn into right-padded batches.

A sequence is token ids with the span [lo, hi) of positions whose next-token guess is trained: for
answers (chat turns, or prompts the target answered) lo is the first answer position and hi the
position of the answer's last token (it predicts nothing); for plain text windows lo is
`min_prefix` and hi the window's end. A batch holds distinct sequences of any lengths, right-padded
(causal attention never lets a real position see the padding after it, so a padded row computes
exactly what it computes alone; tested), with each position's block start and whether it is
supervised (`block_layout`); drawn from a length-sorted pool of a few batches' worth of rows, a
batch pads less while every row stays as likely as any other. Rows and block offsets come from the caller's `random.Random` alone,
so every process of a data-parallel run draws the same global batch and keeps its share.

This module knows nothing about the fuser or the loss; `c2c.tools.train_objective` turns a batch into
logits and `c2c.tools.training` runs the loop.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from ..core import cache as kv
from ..errors import UserInputError

PAD_ID = 0  # the padding token id: never attended by a real position, never supervised


# ---------------------------------------------------------------- where sequences come from


@torch.no_grad()
def greedy_batch(model, prompts: list[list[int]], max_new_tokens: int, eos_ids: set[int], batch_size: int = 64) -> list[list[int]]:
    """Greedy continuations of many prompts, batched with left padding (prompts sorted by length, so
    a batch pads little; the padding is masked out and positions count real tokens only).

    Each continuation ends at its first end-of-sequence token (included) or after max_new_tokens.
    The reference for single prompts is `engine.standard_generate`; a test checks they agree.
    """
    from ..core.engine import model_device

    device = model_device(model)
    eos = torch.tensor(sorted(eos_ids), device=device)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs: list[list[int]] = [[] for _ in prompts]
    for first in range(0, len(order), batch_size):
        chunk = order[first : first + batch_size]
        width = max(len(prompts[i]) for i in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long, device=device)
        mask = torch.zeros(len(chunk), width, dtype=torch.long, device=device)
        for row, i in enumerate(chunk):
            ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i], device=device)
            mask[row, width - len(prompts[i]):] = 1
        cache = kv.new_cache(model)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        tokens = []
        done = torch.zeros(len(chunk), dtype=torch.bool, device=device)
        x = ids
        for _ in range(max_new_tokens):
            logits = kv.forward_masked(model, x, cache, positions, mask)  # 2-D mask: padding out, causal in
            x = logits[:, -1].argmax(-1)  # (B,)
            tokens.append(x)
            done |= torch.isin(x, eos)
            if bool(done.all()):  # sync: once per generated position
                break
            x = x.view(-1, 1)
            positions = positions[:, -1:] + 1
            mask = torch.cat([mask, mask.new_ones(len(chunk), 1)], dim=1)
        block = torch.stack(tokens, 1).tolist()  # (B, steps)
        for i, row in zip(chunk, block):
            ends = [k for k, t in enumerate(row) if t in eos_ids]
            outputs[i] = row[: ends[0] + 1] if ends else row
    return outputs


@torch.no_grad()
def target_generations(target, tokenizer, prompts: list, max_new_tokens: int, eos_ids: set[int],
                       processes=None, enable_thinking: bool = False) -> list[tuple[list[int], int]]:
    """Each prompt (a string, or a conversation ending with a user turn; chat template applied)
    followed by the target's own greedy continuation, as (token ids, prompt length): training on
    what the draft will see, split points inside the answers. Across several processes each answers
    its share of the prompts and all get every answer."""
    from .chat_data import prompt_ids
    from ..app.prompts import encode_prompt

    encoded = [encode_prompt(tokenizer, p, enable_thinking) if isinstance(p, str) else prompt_ids(tokenizer, p, enable_thinking)
               for p in prompts]
    count, rank = (processes.count, processes.rank) if processes is not None else (1, 0)
    mine = greedy_batch(target, encoded[rank::count], max_new_tokens, eos_ids)
    if count > 1:
        shares = [None] * count
        torch.distributed.all_gather_object(shares, mine)
        answers = [shares[i % count][i // count] for i in range(len(encoded))]
    else:
        answers = mine
    return [(ids + out, len(ids)) for ids, out in zip(encoded, answers)]


def make_windows(token_streams: list[list[int]], seq_len: int, separator: int | None) -> torch.Tensor:
    """Concatenate the token streams (separated by `separator`) and cut windows (N, seq_len)."""
    flat: list[int] = []
    for ids in token_streams:
        flat.extend(ids)
        if separator is not None:
            flat.append(separator)
    n = len(flat) // seq_len
    if n < 2:
        raise UserInputError(f"training data too small: {len(flat)} tokens make fewer than 2 windows of {seq_len}")
    return torch.tensor(flat[: n * seq_len]).view(n, seq_len)


def split_heldout(items: list, fraction: float) -> tuple[list, list]:
    """The last `fraction` of the items (at least one) is held out: training never sees it. The items
    are whole units (windows, or each conversation's answers together)."""
    n_held = max(1, int(len(items) * fraction))
    if len(items) - n_held < 1:
        raise UserInputError(f"training data too small: {len(items)} sequences leave none after the held-out share")
    return items[:-n_held], items[-n_held:]


# ---------------------------------------------------------------- batches


@dataclass(frozen=True)
class Batch:
    """Right-padded rows and their layout. `rows`: which sequences (indices into the data), so
    `distinct` counts real variety; `lengths`: real tokens per row."""

    x: torch.Tensor  # (B, L) token ids, PAD_ID after each row's end
    starts: torch.Tensor  # (B, L) the block start of each position (see block_layout)
    supervised: torch.Tensor  # (B, L) bool: positions a loss is taken on
    lengths: tuple[int, ...]
    rows: tuple[int, ...]

    @property
    def distinct(self) -> int:
        return len(set(self.rows))

    @property
    def padding(self) -> int:
        """Padding positions the target reads (and the draft) in this batch."""
        return self.x.numel() - sum(self.lengths)

    def share(self, rank: int, count: int) -> "Batch":
        """This process's rows (rank, rank + count, ...), cut to the longest of them."""
        if count == 1:
            return self
        pick = slice(rank, None, count)
        lengths = self.lengths[pick]
        width = max(lengths)
        return Batch(self.x[pick, :width], self.starts[pick, :width], self.supervised[pick, :width], lengths, self.rows[pick])


def block_layout(length: int, lo: int, hi: int, width: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Block starts (length,) and supervised positions (length,) of one sequence whose supervised
    span is [lo, hi): blocks of `width` positions begin at lo + offset + k*width (and at lo itself:
    a first, shorter block when the offset is not 0), each no longer than width, so a block starting
    at m with s positions is a split (m, s) of the one-split objective, and a draft round of gamma =
    width-1 drafts after m committed tokens.

    Positions before lo are the prompt: block start 0 (the draft's own causal pass, as prefill
    computes it, unfused). Positions from hi on (the last token, padding) are their own block."""
    pos = torch.arange(length)
    span = pos - (lo + offset)
    blocks = torch.where(span >= 0, lo + offset + span.div(width, rounding_mode="floor") * width, torch.full_like(pos, lo))
    starts = torch.where(pos < lo, torch.zeros_like(pos), torch.where(pos < hi, blocks, pos))
    return starts, (pos >= lo) & (pos < hi)


def one_split_layout(length: int, lo: int, hi: int, width: int, offset: int, m: int, s: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The one-split objective's layout: the span before m drafted in rounds (block_layout), then one
    supervised block [m, m + s); only it is supervised."""
    starts, _ = block_layout(length, lo, hi, width, offset)
    pos = torch.arange(length)
    block = (pos >= m) & (pos < m + s)
    starts = torch.where(block, torch.full_like(pos, m), torch.where(pos >= m + s, pos, starts))
    return starts, block


class SplitData:
    """Sequences with their supervised spans, and the batches drawn from them.

    Plain text: fixed windows, spans after `min_prefix` tokens. Answers (prompt + answer): the span
    covers the answer, where drafting happens (the first answer token comes from the target's
    prefill, so the draft's first guess is made at the first answer position, lo = n0)."""

    def __init__(self, rows: list[list[int]], spans: list[tuple[int, int]], gamma: int):
        kept = [(r, s) for r, s in zip(rows, spans) if s[1] - s[0] >= 1]
        if not kept:
            raise UserInputError("training data hold no sequence long enough for a prefix and a suffix")
        self.rows = [torch.as_tensor(r, dtype=torch.long) for r, _ in kept]
        self.spans = [s for _, s in kept]
        self.gamma = gamma

    @classmethod
    def from_windows(cls, windows: torch.Tensor, min_prefix: int, gamma: int) -> "SplitData":
        return cls(list(windows), [(min_prefix, windows.shape[1])] * len(windows), gamma)

    @classmethod
    def from_answers(cls, items: list[tuple[list[int], int]], gamma: int) -> "SplitData":
        """items: (prompt + answer ids, prompt length n0)."""
        return cls([ids for ids, _ in items], [(n0, len(ids) - 1) for ids, n0 in items], gamma)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def supervised_positions(self) -> int:
        return sum(hi - lo for lo, hi in self.spans)

    def _rows(self, rng: random.Random, batch_size: int, pool: int = 1) -> list[int]:
        """batch_size rows, all distinct when the data hold that many (repeats only beyond that).

        `pool` > 1 buckets by length without favouring any row: pool x batch_size distinct rows are
        drawn, sorted by length and cut into pool batches, and one of them, drawn uniformly, is this
        batch (so every row is as likely as without the pool, and its batch mates have lengths like
        its own: less padding). The pool holds at most half the data: a pool of all of it would be the
        same rows every time, cut into the same few batches (48 rows, batches of 8: 6 compositions)."""
        n = len(self.rows)
        if batch_size > n:
            picked: list[int] = []
            while len(picked) < batch_size:
                picked += rng.sample(range(n), min(batch_size - len(picked), n))
            return picked
        chunks = max(1, min(pool, n // (2 * batch_size)))  # a pool of at most half the data: varied batches
        drawn = rng.sample(range(n), chunks * batch_size)
        if chunks == 1:
            return drawn
        drawn.sort(key=lambda i: (len(self.rows[i]), i))
        first = rng.randrange(chunks) * batch_size
        return drawn[first : first + batch_size]

    def _batch(self, rows: list[int], layouts: list[tuple[torch.Tensor, torch.Tensor]]) -> Batch:
        lengths = tuple(len(self.rows[i]) for i in rows)
        L = max(lengths)
        x = torch.full((len(rows), L), PAD_ID, dtype=torch.long)
        starts = torch.arange(L).repeat(len(rows), 1)
        supervised = torch.zeros(len(rows), L, dtype=torch.bool)
        for b, (i, (row_starts, row_supervised)) in enumerate(zip(rows, layouts)):
            n = lengths[b]
            x[b, :n] = self.rows[i]
            starts[b, :n], supervised[b, :n] = row_starts, row_supervised
        return Batch(x, starts, supervised, lengths, tuple(rows))

    def sample_blocks(self, rng: random.Random, batch_size: int, pool: int = 1) -> Batch:
        """A batch for the all-position objective: every span position supervised, in blocks of
        gamma+1 with a random offset per row (`pool`: see _rows)."""
        rows = self._rows(rng, batch_size, pool)
        width = self.gamma + 1
        layouts = [block_layout(len(self.rows[i]), *self.spans[i], width, rng.randrange(width)) for i in rows]
        return self._batch(rows, layouts)

    def sample(self, rng: random.Random, batch_size: int, pool: int = 1) -> Batch:
        """A batch for the one-split objective: per row one split (m, s), s uniform in 1..gamma+1,
        the suffix inside the span (`pool`: see _rows)."""
        rows = self._rows(rng, batch_size, pool)
        width, layouts = self.gamma + 1, []
        for i in rows:
            lo, hi = self.spans[i]
            s = rng.randint(1, min(width, hi - lo))
            m = rng.randint(lo, hi - s)
            layouts.append(one_split_layout(len(self.rows[i]), lo, hi, width, rng.randrange(width), m, s))
        return self._batch(rows, layouts)

    def evaluation(self, tokens: int, batch_size: int, seed: int = 12345) -> list[Batch]:
        """Fixed held-out batches, the same at every evaluation: the sequences in order, every span
        position supervised in blocks (offsets from `seed`), until at least `tokens` positions are
        covered or every sequence is used. A position is never scored twice (paired counts over
        repeats would look more certain than they are): `supervised_positions` is the most there is."""
        rng, batches, covered = random.Random(seed), [], 0
        width = self.gamma + 1
        for first in range(0, len(self.rows), batch_size):
            rows = list(range(first, min(first + batch_size, len(self.rows))))
            layouts = [block_layout(len(self.rows[i]), *self.spans[i], width, rng.randrange(width)) for i in rows]
            batches.append(self._batch(rows, layouts))
            covered += int(batches[-1].supervised.sum())
            if covered >= tokens:
                break
        return batches

    def prompts(self, count: int) -> list[list[int]]:
        """The first `count` sequences cut at their span's start: prompts for the engine's held-out figure."""
        return [self.rows[i][: self.spans[i][0]].tolist() for i in range(min(count, len(self.rows)))]
