"""Tree speculation's pure parts: growing a tree of draft continuations, its attention mask, and
walking it with the target's choices. Token ids, log-probabilities and parent indices in, tensors
out: nothing here knows about models, caches or fusion (the engine orchestrates a round).

A tree is plain arrays over its N nodes, in order of depth (a parent always before its children):
`tokens` (N,), `parents` (N,) (-1: a child of the root, the round's pending token), `depths` (N,)
(1 for the root's children) and `scores` (N,), the cumulative draft log-probability of the path
from the root. Growth follows EAGLE-2 (arXiv 2406.16858): from the root, each depth expands the
`top_k` best children of each of the `top_k` best nodes of the depth before (by score), one draft
forward per depth; at the end the best `budget` nodes overall are kept. A score never rises along a
path, so the kept set is closed under ancestors (ties go to the shallower, earlier node). A chain is
the tree with top_k 1: its nodes are the draft's greedy tokens.

The walk: greedy, from the root follow the child holding the target's argmax at the current node;
sampling, at each node draw x from the target's warped distribution and step to the child holding x,
else emit x and stop. The tree is a function of the prefix alone (the draft's top-k, never sampled),
so this is ancestral sampling from the target's distribution: the output is distributed exactly as
the target's (Chen et al. 2023's argument applied node by node; tested by a chi-square test).
Both walks run on the device, vectorised, with fixed shapes: the host reads one decision per round.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UserInputError


@dataclass(frozen=True)
class TreeShape:
    """budget: nodes verified per round (the root not counted); depth: draft forwards per round, the
    longest path; top_k: children per expanded node and nodes expanded per depth."""

    budget: int
    depth: int
    top_k: int

    def __post_init__(self):
        if self.depth < 1:
            raise UserInputError(f"--tree_depth must be >= 1 (draft forwards per round), got {self.depth}")
        if self.top_k < 1:
            raise UserInputError(f"--tree_topk must be >= 1 (1: a chain), got {self.top_k}")
        if self.budget < self.depth:
            raise UserInputError(f"--tree_budget {self.budget} is smaller than --tree_depth {self.depth}: a tree of "
                                 f"depth {self.depth} needs at least {self.depth} nodes; raise --tree_budget or lower --tree_depth")


@dataclass
class Tree:
    tokens: torch.Tensor  # (N,) long
    parents: torch.Tensor  # (N,) long, -1 for the root's children
    depths: torch.Tensor  # (N,) long, >= 1
    scores: torch.Tensor  # (N,) float, cumulative draft log-probability

    def __len__(self) -> int:
        return self.tokens.shape[0]


def children(parent_scores: torch.Tensor, logprobs: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top_k children of each of F expanded nodes: parent_scores (F,), logprobs (F, V) the draft's
    log-probabilities after each. Returns (which parent (F*k,), token (F*k,), score (F*k,)), best first
    per parent."""
    top_k = min(top_k, logprobs.shape[-1])  # a vocabulary smaller than top_k: every token
    values, tokens = torch.topk(logprobs.float(), top_k, dim=-1)  # (F, k)
    F = logprobs.shape[0]
    which = torch.arange(F, device=logprobs.device).repeat_interleave(top_k)  # (F*k,)
    return which, tokens.reshape(-1), (parent_scores.view(F, 1) + values).reshape(-1)


def best(scores: torch.Tensor, depths: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the `count` best nodes by score (ties: shallower, then earlier), in index order."""
    n = scores.shape[0]
    order = torch.arange(n, device=scores.device)
    # one sortable key: score first; depth and index only break ties (a stable sort on the score
    # after sorting by (depth, index) keeps that order among equals)
    keyed = torch.argsort(depths * (n + 1) + order, stable=True)
    ranked = keyed[torch.argsort(-scores[keyed], stable=True)]
    return torch.sort(ranked[:count]).values


def grown_nodes(depth: int, top_k: int) -> int:
    """The most nodes `grow` makes at this depth and top_k (and so the largest budget it can fill):
    top_k children of the root, then top_k children of each of top_k frontier nodes per later depth."""
    return top_k + top_k ** 2 * (depth - 1)


def grow(root_logprobs: torch.Tensor, expand, shape: TreeShape) -> tuple[Tree, torch.Tensor]:
    """Grow a tree from the draft's log-probabilities after the root (V,). `expand(frontier, tree)`
    runs the draft over the frontier nodes (F,) of the tree so far (every earlier node they descend
    from was expanded before them) and returns their log-probabilities (F, V). Returns the kept tree
    (the best shape.budget nodes, re-indexed in creation order) and, for each kept node, its index in
    the grown tree (so the caller can find what it stored per grown node)."""
    device, k = root_logprobs.device, shape.top_k
    _, tokens, scores = children(torch.zeros(1, device=device), root_logprobs.view(1, -1), k)
    grown = Tree(tokens, torch.full_like(tokens, -1), torch.ones_like(tokens), scores)
    frontier = best(scores, grown.depths, k)
    for depth in range(2, shape.depth + 1):
        which, tokens, scores = children(grown.scores.index_select(0, frontier), expand(frontier, grown), k)
        first = len(grown)
        grown = Tree(torch.cat([grown.tokens, tokens]), torch.cat([grown.parents, frontier.index_select(0, which)]),
                     torch.cat([grown.depths, torch.full_like(tokens, depth)]), torch.cat([grown.scores, scores]))
        frontier = first + best(scores, torch.full_like(tokens, depth), k)
    keep = best(grown.scores, grown.depths, shape.budget)  # closed under ancestors: a score never rises along a path
    index = torch.full((len(grown),), -1, dtype=torch.long, device=device)
    index[keep] = torch.arange(keep.shape[0], device=device)
    parents = grown.parents.index_select(0, keep)
    kept = Tree(grown.tokens.index_select(0, keep), torch.where(parents >= 0, index.index_select(0, parents.clamp_min(0)), -1),
                grown.depths.index_select(0, keep), grown.scores.index_select(0, keep))
    return kept, keep


def visibility(parents: torch.Tensor, depth: int | None = None) -> torch.Tensor:
    """(N, N) bool: node i may see node j when j is i or one of its ancestors. On the device, no host
    read: `depth` steps up the parent pointers (default N: a tree of N nodes is at most N deep)."""
    n = parents.shape[0]
    return ancestors(torch.arange(n, device=parents.device), parents, n if depth is None else min(depth, n))


def ancestors(nodes: torch.Tensor, parents: torch.Tensor, depth: int) -> torch.Tensor:
    """(F, N) bool: for each of `nodes` (F,), itself and its ancestors among the N nodes; `depth` steps
    up at most. On the device; F x N, not N x N, for a large grown tree."""
    F, n = nodes.shape[0], parents.shape[0]
    rows = torch.zeros(F, n, dtype=torch.bool, device=parents.device)
    index = torch.arange(F, device=parents.device)
    up = nodes.clone()
    for _ in range(depth + 1):
        rows[index, up.clamp_min(0)] |= up >= 0
        up = torch.where(up >= 0, parents.index_select(0, up.clamp_min(0)), up)
    return rows


def verify_visibility(parents: torch.Tensor, seen: torch.Tensor | None = None) -> torch.Tensor:
    """(N+1, N+1) bool over [root, nodes]: the root sees itself; node i the root, its ancestors and
    itself. `seen`: visibility(parents), when the caller has it."""
    n = parents.shape[0]
    block = torch.zeros(n + 1, n + 1, dtype=torch.bool, device=parents.device)
    block[:, 0] = True
    block[1:, 1:] = visibility(parents) if seen is None else seen
    return block


def walk(tokens: torch.Tensor, parents: torch.Tensor, depths: torch.Tensor, choice: torch.Tensor, max_depth: int,
         seen: torch.Tensor | None = None) -> torch.Tensor:
    """The accepted path, on the device. choice (N+1,): the target's token at the root (index 0) and
    at each node i (index i+1): its argmax (greedy) or its draw (sampling). A node is accepted when
    its token equals its parent's choice and its parent is accepted (siblings hold distinct tokens,
    so at most one node per depth is). `seen`: visibility(parents), when the caller has it. Returns (max_depth+2,) long: [n accepted, the path's node
    indices by depth (-1 past n), the target's token after the path]."""
    n = tokens.shape[0]
    parent_choice = choice.index_select(0, parents + 1)  # (N,)
    edge_ok = tokens == parent_choice  # (N,)
    seen = visibility(parents) if seen is None else seen
    on_path = ~(seen & ~edge_ok.view(1, n)).any(-1)  # (N,): every edge to the root holds
    accepted = on_path.long().sum()
    slots = torch.full((max_depth + 1,), n, dtype=torch.long, device=tokens.device)  # n: "none" (a padding slot)
    slots.scatter_(0, torch.where(on_path, depths - 1, max_depth), torch.arange(n, device=tokens.device))
    path = torch.where(slots[:max_depth] < n, slots[:max_depth], -1)
    last = torch.where(accepted > 0, path.index_select(0, (accepted - 1).clamp_min(0).view(1)).squeeze(0) + 1, 0)
    return torch.cat([accepted.view(1), path, choice.index_select(0, last.view(1))])


def drafted_path(tokens: list[int], parents: list[int], path: list[int]) -> list[int]:
    """What the round drafted along the way the target went (host lists): the accepted path's tokens,
    then from its last node (or the root) down the draft's first choices (children are kept best
    first). So position len(path) is the draft's guess the target rejected, as in a chain's drafts;
    for a chain (top_k 1) it is exactly the chain's drafts."""
    out = [tokens[i] for i in path]
    node = path[-1] if path else -1
    for i, p in enumerate(parents):
        if p == node:
            out.append(tokens[i])
            node = i
    return out


def branch_point(parents: list[int], path: list[int]) -> int | None:
    """Where an accepted path (host node indices) leaves the draft's first choices: the index of its
    first node that is not its parent's first child (children are kept best first), else None."""
    first: dict[int, int] = {}
    for i, p in enumerate(parents):
        first.setdefault(p, i)
    return next((k for k, node in enumerate(path) if first[parents[node]] != node), None)


def accepted_under(scores: list[float], depths: list[int], path: list[int], budget: int, depth: int) -> int:
    """How much of a round's accepted path (host lists over its kept tree) a smaller tree of `budget`
    nodes and `depth` would have held: the path's longest prefix whose nodes lie within `depth` and
    among the best `budget` of the nodes there (by score; ties to the shallower, earlier node, as
    `best`). The target's choices do not depend on the tree, so for a budget up to the recorded
    tree's this is what that tree would have accepted (nodes the recorded tree did not keep can't be
    seen: an estimate when shallower trees would have kept them)."""
    eligible = sorted((i for i in range(len(scores)) if depths[i] <= depth), key=lambda i: (-scores[i], depths[i], i))
    rank = {node: r for r, node in enumerate(eligible)}
    held = 0
    for node in path:
        if depths[node] > depth or rank[node] >= budget:
            break
        held += 1
    return held


def choose_shape(rounds: list[tuple[list[float], list[int], list[int]]], verify_ms: dict[int, float], draft_depth_ms: float,
                 other_ms: float, top_k: int, max_depth: int) -> tuple[TreeShape, dict]:
    """The (budget, depth) with the most estimated tokens per second of round time: per candidate, the
    mean over `rounds` (kept scores, depths, accepted path) of accepted_under + 1 tokens, over
    depth x draft_depth_ms + the verify of budget+1 tokens (`verify_ms`, keyed by that size) +
    other_ms. Returns the shape and the figures behind the choice."""
    table = []
    for size in sorted(verify_ms):
        budget = size - 1
        for depth in range(1, max_depth + 1):
            if budget < depth or budget > grown_nodes(depth, top_k):
                continue  # a chain can't be shorter than its depth; a tree of this depth can't hold the budget
            tokens = sum(accepted_under(sc, dp, pa, budget, depth) + 1 for sc, dp, pa in rounds) / max(len(rounds), 1)
            ms = depth * draft_depth_ms + verify_ms[size] + other_ms
            table.append({"budget": budget, "depth": depth, "tokens_per_round": tokens, "round_ms": ms,
                          "tokens_per_second": 1000 * tokens / ms})
    if not table:
        raise ValueError("no (budget, depth) fits: every budget exceeds what the trees can hold or is below depth 1")
    best_row = max(table, key=lambda r: r["tokens_per_second"])
    return TreeShape(best_row["budget"], best_row["depth"], top_k), {"chosen": best_row, "candidates": table}


def sample_choices(probs: torch.Tensor, uniforms: torch.Tensor, depths_with_root: torch.Tensor) -> torch.Tensor:
    """The target's draw at the root and every node by inverse CDF: probs (N+1, V) the warped
    distributions, uniforms (max_depth+1,) drawn once per round, one per depth (only one node per
    depth is ever on the walked path, so each draw on it is independent). Returns (N+1,) long."""
    u = uniforms.index_select(0, depths_with_root).unsqueeze(-1)  # (N+1, 1)
    cdf = probs.float().cumsum(-1)  # (N+1, V)
    x = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)  # first index whose cdf exceeds u * total
    return x.squeeze(-1).clamp_max(probs.shape[-1] - 1)
