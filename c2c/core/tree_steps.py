"""A tree round's two model steps on static caches, as plain functions the fast path compiles (one
graph each, CUDA graphs on a GPU) and short rounds call as they are:

- `grow_tree`: the draft takes the tokens it has not seen, then grows the tree depth by depth (one
  forward over the frontier per depth, `c2c.core.tree.grow`), its nodes written after the committed
  sequence in the draft's cache;
- `verify_tree`: the target's one forward over [pending token, nodes], the walk (greedy, or the
  round's uniforms drawn by the caller), and both caches' compaction: the accepted path moved to
  contiguous positions and each write position set, all on the device. Its output is the round's
  one host read.

Every per-round value (the committed length, the positions, where the nodes lie) comes from the
caches' device-side write positions, so no round's numbers are baked into a graph: fixed (budget,
depth, top_k) means fixed shapes. The tree's own logic lives in `c2c.core.tree` (no caches, no models).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import cache as kv
from . import tree as trees
from .sampling import SamplingConfig, probabilities
from .tree import TreeShape


@dataclass(frozen=True)
class TreeDecision:
    """`verify_tree`'s output, (depth + 4 + 2N,) long, laid out here once for both sides:
    [n accepted, the path's node indices by depth (-1 past n), m path nodes the draft holds (n or n-1),
    the path's last token, the target's token, the tree's tokens (N), its parents (N)]."""

    n: int
    path: list[int]  # node indices by depth, -1 past n
    m: int
    last: int
    token: int

    @staticmethod
    def pack(n: torch.Tensor, path: torch.Tensor, m: torch.Tensor, last: torch.Tensor, token: torch.Tensor,
             tokens: torch.Tensor, parents: torch.Tensor) -> torch.Tensor:
        return torch.cat([n.view(1), path, m.view(1), last.view(1), token.view(1), tokens, parents])

    @classmethod
    def read(cls, host: list[int], depth: int, nodes: int) -> tuple["TreeDecision", list[int], list[int]]:
        """The host's copy of a packed output -> (the decision, the tree's tokens, its parents)."""
        head = depth + 4
        n, path, m, last, token = host[0], host[1 : 1 + depth], host[1 + depth], host[2 + depth], host[3 + depth]
        return cls(n, path, m, last, token), host[head : head + nodes], host[head + nodes : head + 2 * nodes]

    @property
    def depth(self) -> int:
        return len(self.path)

    def pending(self, packed: torch.Tensor) -> torch.Tensor:
        """The target's token on the device (a view of the packed output: no launch)."""
        return packed[self.depth + 3]

    def next_feed(self, packed: torch.Tensor) -> torch.Tensor:
        """The draft's next feed on the device: [the path's last token, the target's token] when the draft
        never fed the path's last node (m < n), else the target's token alone (a view)."""
        first = self.depth + 2 if self.m < self.n else self.depth + 3
        return packed[first : self.depth + 4].view(1, -1)


def draft_logprobs(logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """The draft's log-probabilities (..., V) a tree grows from: warped as the run samples, so greedy
    and sampled trees are the draft's own top-k, a function of the prefix alone."""
    if sampling.greedy:
        return logits.float().log_softmax(-1)
    return probabilities(logits, sampling).log()


def _allowed(prefix: torch.Tensor, start: torch.Tensor, tail: torch.Tensor) -> torch.Tensor:
    """(Q, capacity) bool: every query sees the positions `prefix` (capacity,) allows, and the block
    `tail` (Q, T) says what it sees of positions start..start+T-1 (the round's nodes)."""
    allowed = prefix.expand(tail.shape[0], -1).clone()
    return allowed.index_copy_(1, start + torch.arange(tail.shape[1], device=tail.device), tail)


def _key_positions(cache, start: torch.Tensor, tail: torch.Tensor) -> torch.Tensor:
    """(capacity,): each cache slot's position: its index, but the block of slots from `start` holds
    the positions `tail` (the round's nodes sit at their depth's position; sliding windows count in positions)."""
    slots = torch.arange(kv.capacity(cache), device=tail.device)
    return slots.index_copy(0, start + torch.arange(tail.shape[0], device=tail.device), tail)


def _forward(model, cache, keyword: str, tokens: torch.Tensor, positions: torch.Tensor, allowed: torch.Tensor | None,
             keep: int = 0, key_positions: torch.Tensor | None = None) -> torch.Tensor:
    mask = None if allowed is None else kv.tree_mask(model, allowed, positions, key_positions)
    return kv.forward_masked(model, tokens.view(1, -1), cache, positions.view(1, -1), mask, keep, keyword)[0]


def verify_allowed(parents: torch.Tensor, seen: torch.Tensor, held: torch.Tensor, capacity: int) -> torch.Tensor:
    """(N+1, capacity) bool, what the target's verify of [pending, nodes] (written at `held`, a 0-d device
    tensor) may see: every query the `held` committed positions; the pending token itself; node i the
    pending token, its ancestors and itself (`seen`: visibility(parents)). On held's device."""
    device = held.device
    tail = trees.verify_visibility(parents, seen).to(device)  # (N+1, N+1) over [pending, nodes]
    return _allowed(torch.arange(capacity, device=device) < held, held, tail)


def grow_tree(model, cache, feed: torch.Tensor, keyword: str, shape: TreeShape, sampling: SamplingConfig):
    """The draft's part of a tree round. feed (1, k): the tokens the draft has not seen (the pending
    token, after a round whose path ended at a node it never fed, that node first), written at the
    cache's write position; then one forward per depth over the frontier, each node at position
    (committed - 1 + its depth), written after the committed sequence and seeing the committed
    positions, its fed ancestors and itself.

    Returns (packed (4N,) long: the kept tree's tokens, parents, depths and, per node, where its K/V
    lie after the committed sequence (-1: never fed, the draft never ran it), scores (N,))."""
    device, width = feed.device, feed.shape[-1]
    start = kv.write_position(cache).clone()  # a copy: the forward moves the write position in place
    root = _forward(model, cache, keyword, feed, start + torch.arange(width, device=device), None, keep=1)
    committed = start + width  # the draft now holds the committed sequence, the pending token last
    prefix = torch.arange(kv.capacity(cache), device=device) < committed
    fed: list[torch.Tensor] = []  # grown node indices, in the order their K/V follow the committed ones

    def expand(frontier: torch.Tensor, grown: trees.Tree) -> torch.Tensor:
        before = torch.cat(fed) if fed else frontier[:0]
        lines = trees.ancestors(frontier, grown.parents, shape.depth)  # (F, grown): each frontier node's line
        tail = torch.cat([lines.index_select(1, before), torch.eye(frontier.shape[0], dtype=torch.bool, device=device)], 1)
        depths = grown.depths.index_select(0, torch.cat([before, frontier]))  # of the block's nodes, in slot order
        out = _forward(model, cache, keyword, grown.tokens.index_select(0, frontier),
                       committed - 1 + grown.depths.index_select(0, frontier), _allowed(prefix, committed, tail),
                       key_positions=_key_positions(cache, committed, committed - 1 + depths))
        fed.append(frontier)
        return draft_logprobs(out, sampling)

    kept, grown_index = trees.grow(draft_logprobs(root[-1], sampling), expand, shape)
    fed_all = torch.cat(fed) if fed else grown_index[:0]
    match = grown_index.view(-1, 1) == fed_all.view(1, -1)  # (N, fed): a node is fed at most once
    slot = (match.long() * torch.arange(1, fed_all.shape[0] + 1, device=device)).sum(-1) - 1
    return torch.cat([kept.tokens, kept.parents, kept.depths, slot]), kept.scores


def forced_choice(choice: torch.Tensor, tokens: torch.Tensor, parents: torch.Tensor, depths: torch.Tensor,
                  seen: torch.Tensor) -> torch.Tensor:
    """Timing only: the target's choices replaced so that the walk accepts the whole path to the
    first of the deepest nodes, as a forced chain round accepts every draft."""
    n = tokens.shape[0]
    on_path = seen.index_select(0, depths.argmax().view(1)).view(n)  # its line, itself included
    into = torch.where(on_path, parents + 1, n + 1)  # the choice at each path node's parent: the node's token
    forced = torch.cat([choice, choice[:1]]).scatter(0, into, tokens)
    return forced[: n + 1]


def verify_tree(model, cache, draft_cache, pending: torch.Tensor, packed: torch.Tensor, keyword: str, depth: int,
                sampling: SamplingConfig, uniforms: torch.Tensor | None, force: torch.Tensor) -> torch.Tensor:
    """The target's part of a tree round and the round's end, on the device. pending (): the token
    the target has not seen; packed: `grow_tree`'s; uniforms (depth+1,): the round's random numbers
    (sampling; drawn once per round by the caller with the user's generator); force (): the
    timing-only forced acceptance as a device flag.

    Both caches end holding the accepted path at contiguous positions: the target's [pending, path]
    after its committed sequence, the draft's the path nodes it has fed. Returns the packed
    `TreeDecision` (depth + 4 + 2N,) long on pending's device; the draft's next feed and the next
    pending token are slices of it (`TreeDecision.next_feed`, `TreeDecision.pending`)."""
    out_device = pending.device
    tokens, parents, depths, slot = packed.view(4, -1)
    t_device = model.get_input_embeddings().weight.device  # the target's inputs (a split model: its first device)
    held = kv.write_position(cache).clone().to(t_device)  # the target holds committed - 1 positions: all but the pending token
    with_root = torch.cat([depths.new_zeros(1), depths])
    seen = trees.visibility(parents, depth)  # (N, N), for the mask and the walk
    logits = _forward(model, cache, keyword, torch.cat([pending.view(1), tokens]).to(t_device),
                      held + with_root.to(t_device), verify_allowed(parents, seen, held, kv.capacity(cache)),
                      key_positions=_key_positions(cache, held, held + with_root.to(t_device))).to(out_device)
    if sampling.greedy:
        choice = logits.argmax(-1)
    else:  # ancestral sampling along the tree: each draw is the target's own (c2c.core.tree explains why it is exact)
        choice = trees.sample_choices(probabilities(logits, sampling), uniforms, with_root)
    choice = torch.where(force, forced_choice(choice, tokens, parents, depths, seen), choice)
    decided = trees.walk(tokens, parents, depths, choice, depth, seen)  # [n, path (depth), token]
    n, path = decided[0], decided[1 : 1 + depth]
    steps = torch.arange(depth, device=out_device)
    # the target wrote [pending, nodes] at held..: keep the pending token there, the path right after it
    kv.move_positions(cache, held + 1 + path.clamp_min(0).to(t_device), held + 1 + steps.to(t_device))
    kv.set_length(cache, held + 1 + n.to(t_device))
    # the draft wrote its fed nodes after the committed sequence (held + 1 positions): the path's fed prefix
    where = slot.index_select(0, path.clamp_min(0))
    fed = ((path >= 0) & (where >= 0)).long().cumprod(0)  # every path node but perhaps the deepest was fed
    m = fed.sum()
    committed = held.to(out_device) + 1
    kv.move_positions(draft_cache, committed + where.clamp_min(0), committed + steps)
    kv.set_length(draft_cache, committed + m)
    last = tokens.index_select(0, path.index_select(0, (n - 1).clamp_min(0).view(1)).clamp_min(0)).view(1)
    return TreeDecision.pack(n, path, m, last, decided[-1], tokens, parents)
