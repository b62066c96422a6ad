"""The three ways a speculative round fills its drafts, behind one small interface.

A round kind proposes drafts and has the target check them; the loop (`SpeculativeDecoder.generate`)
then records the round and fuses the newly committed positions, the same for every kind:

- `ChainRound`: gamma drafts, one draft forward each (the draft's greedy block one compiled graph);
- `ParallelRound`: gamma drafts in ONE draft forward over [unseen tokens, gamma-1 mask ids]
  (c2c.core.parallel), then the chain's verify and acceptance;
- `TreeRound`: a tree of drafts, one draft forward per depth, verified in one target forward and
  walked on the device (c2c.core.tree_steps).

Each kind's `run` takes the loop's state (what the draft has not seen, the pending token, the
committed length and what the draft cache holds) and returns a `RoundEnd`: host values read once
(the round's one host synchronisation) plus the device tensors the next round starts from.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import cache as kv
from . import parallel
from . import tree as trees
from .sampling import SamplingConfig, accept_greedy, accept_sampled, next_token, probabilities
from .tree import TreeShape
from .tree_steps import TreeDecision, grow_tree, verify_tree


@dataclass
class RoundEnd:
    """What the loop needs from a finished round."""

    n: int  # drafts the target accepted
    drafted_ids: list[int]  # the round's drafts (a tree: the taken path, then the draft's first choices below it)
    new_tokens: list[int]  # the accepted drafts, then the target's token
    draft_len: int  # positions the draft cache holds now (all committed)
    pending: torch.Tensor  # () the target's token: no model has processed it
    feed: object  # what the next round's draft starts from (the kind's own form)
    branched_at: int | None = None  # tree rounds: where the accepted path left the draft's first choices


def draft_block(model, cache, feed: torch.Tensor, position_ids: torch.Tensor, steps: int, keyword: str) -> torch.Tensor:
    """`steps` greedy draft tokens in one function: the compiled fast path captures it as one graph
    (one replay per round instead of one per draft step), the next token chosen on the device.

    feed (1, k): the tokens the draft has not seen (k = 1, or 2 after an all-accepted round) at
    position_ids (1, k); `keyword`: the forward's cache keyword (kv.cache_keyword). Returns the drafted
    ids (steps,). Same ops as `ChainRound.propose`'s greedy loop, so the same tokens."""
    tokens = []
    for _ in range(steps):
        logits = model(input_ids=feed, position_ids=position_ids, use_cache=True, logits_to_keep=1, **{keyword: cache}).logits
        token = logits[0, -1].argmax(-1)
        tokens.append(token)
        feed = token.view(1, 1)
        position_ids = position_ids[:, -1:] + 1
    return torch.stack(tokens)


def accept_round(drafted: torch.Tensor, q, target_logits: torch.Tensor, sampling: SamplingConfig | None = None,
                 generator: torch.Generator | None = None, force: torch.Tensor | None = None) -> torch.Tensor:
    """The round's decision on the device: (g+2,) long, [n accepted, d_1..d_g, the target's token]
    (the correction at the first rejection, else the bonus). The host reads it once; the next
    round's draft feed is a slice of it ([d_g, token] after an all-accepted round, else [token]).

    drafted (g,), q (g, V) the draft's probabilities (sampling only), target_logits (g+1, V);
    `sampling` None or greedy: the longest prefix equal to the target's argmax. `force` (0-d bool
    device flag, timing only): the greedy rule, and where true every draft accepted and the bonus
    from the target."""
    if force is not None or sampling is None or sampling.greedy:
        n, token = accept_greedy(drafted, target_logits, force)
    else:
        p = probabilities(target_logits, sampling)  # (g+1, V)
        if q is None:  # g == 0: nothing drafted, sample straight from p
            q = p[:0]
        n, token = accept_sampled(drafted, q, p, generator)
    return torch.cat([n.view(1), drafted, token.view(1)])


def verify_block(model, cache, pending: torch.Tensor, drafted: torch.Tensor, position_ids: torch.Tensor, keyword: str,
                 force: torch.Tensor) -> torch.Tensor:
    """The target's verify of [pending, d_1..d_g] and the greedy acceptance in one function: the
    compiled fast path captures both as one graph, with its own code object (a compiled model call
    shares transformers' `forward` with every other compiled step, and checks their guards too).

    pending (): the token the target has not seen, drafted (g,), position_ids (1, g+1), force (): the
    timing-only forced acceptance as a device flag (one graph, not a second 14B graph to compile).
    Returns the round's decision (see `accept_round`)."""
    block = torch.cat([pending.view(1), drafted]).view(1, -1)
    logits = model(input_ids=block, position_ids=position_ids, use_cache=True, **{keyword: cache}).logits
    return accept_round(drafted, None, logits[0], force=force)


def step_forward(model, input_ids: torch.Tensor, cache, start: int, logits_to_keep: int = 0, call=None):
    """`cache.forward`, first telling CUDA graph trees that a new step begins when `call` is a compiled step."""
    if call is not None:
        step_begin(input_ids.device)
    return kv.forward(model, input_ids, cache, start, logits_to_keep=logits_to_keep, call=call)


def step_begin(device: torch.device) -> None:
    """Tell CUDA graph trees that the previous step's outputs are consumed (may be overwritten)."""
    if device.type == "cuda":
        torch.compiler.cudagraph_mark_step_begin()


class ChainRound:
    """gamma drafts, one draft forward each, checked by one target forward. The shared verify and
    acceptance (`verify`) and the roll-back serve `ParallelRound` too."""

    def __init__(self, dec, compiled, same_device: bool):
        self.dec = dec
        greedy = dec.sampling.greedy
        self.draft_step = compiled(dec.draft) if compiled else None
        self.verify_step = compiled(dec.target) if compiled else None
        # greedy drafting as one graph per round; sampling keeps one graph per draft step (its generator
        # draws on the host side of torch and can't live inside a captured graph)
        self.draft_graph = compiled.function(draft_block, dec.device) if compiled and greedy else None
        # greedy verify and acceptance as one graph, where the two models share a device
        self.verify_graph = compiled.function(verify_block, dec.device) if compiled and greedy and same_device else None

    def first_feed(self, pending: torch.Tensor):
        return pending.view(1, 1)

    def run(self, feed, pending: torch.Tensor, committed: int, draft_len: int, room: int, clock) -> RoundEnd:
        g = min(self.dec.spec.gamma, room)
        # 1. draft
        drafted, q = self.propose(feed, draft_len, g)
        clock.lap("draft")
        # 2. verify and accept; 3. read the decision: the round's one host synchronisation
        decided = self.verify(pending, drafted, q, committed - 1, clock)  # (g+2,): n, d_1..d_g, token
        decision = decided.tolist()
        n, drafted_ids = decision[0], decision[1 : 1 + g]
        # 4. roll back both caches to what is committed
        kv.crop(self.dec.target_cache, committed + n)
        draft_len, feed = self.roll_back(feed, decided, committed, draft_len, n, g)
        return RoundEnd(n, drafted_ids, drafted_ids[:n] + [decision[-1]], draft_len, decided[g + 1], feed)

    def propose(self, feed: torch.Tensor, start: int, g: int):
        """g autoregressive draft tokens. feed (1, k): tokens the draft has not seen yet."""
        dec = self.dec
        if self.draft_graph is not None and g == dec.spec.gamma and feed.shape[-1] <= 2:
            positions = torch.arange(start, start + feed.shape[-1], device=feed.device).unsqueeze(0)
            step_begin(dec.device)
            # a copy: with CUDA graphs the graph's output memory is reused once the verify step begins,
            # and the drafted ids are read again after it (acceptance, the round's record)
            drafted = self.draft_graph(dec.draft, dec.draft_cache, feed, positions, g, kv.cache_keyword(dec.draft)).clone()
            dec.counters.draft_calls += g
            return drafted, None
        tokens, qs = [], []
        for _ in range(g):
            # compiled: one token, or the 2-token catch-up after an all-accepted round (its own graph;
            # eager it cost a 28-layer draft ~10x a compiled step on an H100). Longer feeds (gamma 0) stay eager.
            call = self.draft_step if feed.shape[-1] <= 2 else None
            logits = step_forward(dec.draft, feed, dec.draft_cache, start, logits_to_keep=1, call=call)  # (1, 1, V)
            start += feed.shape[-1]
            token, q = next_token(logits[0, -1], dec.sampling, dec.generator)
            tokens.append(token)
            qs.append(q)
            feed = token.view(1, 1)
        dec.counters.draft_calls += g
        drafted = torch.stack(tokens) if tokens else torch.empty(0, dtype=torch.long, device=dec.device)  # (g,)
        return drafted, (torch.stack(qs) if qs and qs[0] is not None else None)

    def verify(self, pending: torch.Tensor, drafted: torch.Tensor, q, start: int, clock) -> torch.Tensor:
        """One target forward over [pending, d_1..d_g] and the acceptance -> the round's decision
        (`accept_round`) on the sampling device. A full greedy round on the fast path is one compiled
        call; otherwise the verify (compiled when full) and then the acceptance, eager."""
        dec, g = self.dec, drafted.shape[0]
        dec.counters.target_calls += 1
        if self.verify_graph is not None and g == dec.spec.gamma:
            positions = torch.arange(start, start + g + 1, device=dec.device).unsqueeze(0)
            step_begin(dec.device)
            # a copy: with CUDA graphs the graph's output memory is reused by the next replay, and the
            # next round's feed and pending token are slices of it
            decision = self.verify_graph(dec.target, dec.target_cache, pending, drafted, positions,
                                         kv.cache_keyword(dec.target), dec.force).clone()
            clock.lap("target")
            return decision
        block = torch.cat([pending.view(1), drafted]).view(1, -1).to(dec.target_device)  # (1, g+1)
        call = self.verify_step if g == dec.spec.gamma else None  # shorter last rounds stay eager
        logits = step_forward(dec.target, block, dec.target_cache, start, call=call)  # (1, g+1, V)
        clock.lap("target")
        return accept_round(drafted, q, logits[0].to(dec.device), dec.sampling, dec.generator,
                            dec.force if dec.force_accept else None)

    def roll_back(self, feed, decided: torch.Tensor, committed: int, draft_len: int, n: int, g: int):
        """The draft cache cut to the committed tokens it ran (its own accepted drafts); returns (its
        length, the next feed: the tokens it lacks, slices of the decision)."""
        if g == 0:
            return draft_len, torch.cat([feed.view(-1), decided[g + 1 :]]).view(1, -1)
        draft_len = committed + min(n, g - 1)
        kv.crop(self.dec.draft_cache, draft_len)
        return draft_len, decided[g : g + 2].view(1, 2) if n == g else decided[g + 1 :].view(1, 1)


class ParallelRound(ChainRound):
    """gamma drafts from one draft forward (c2c.core.parallel), then the chain's verify. The feed is
    (window (gamma+1,), count): the draft's unseen tokens are the window's first `count`."""

    def __init__(self, dec, compiled, same_device: bool, masks: list[int]):
        super().__init__(dec, compiled, same_device)
        self.masks = torch.tensor(masks, dtype=torch.long, device=dec.device)  # (gamma-1,)
        self.graph = compiled.function(parallel.parallel_draft, dec.device) if compiled else None

    def first_feed(self, pending: torch.Tensor):
        window = torch.cat([pending.view(1), pending.new_zeros(self.dec.spec.gamma)])  # (gamma+1,)
        return window, torch.ones((), dtype=torch.long, device=pending.device)

    def propose(self, feed, start: int, g: int):
        dec = self.dec
        window, count = feed
        if g == 0:  # the last round, one token left: nothing to draft (the draft runs no forward)
            return torch.empty(0, dtype=torch.long, device=dec.device), None
        full = g == dec.spec.gamma and window.shape[0] == g + 1  # the compiled shape; short last rounds run as they are
        uniforms = None if dec.sampling.greedy else torch.rand(g, device=dec.device, generator=dec.generator)
        step_begin(dec.device)
        drafted, q = (self.graph if full and self.graph else parallel.parallel_draft)(
            dec.draft, dec.draft_cache, window, count, self.masks[: g - 1], kv.cache_keyword(dec.draft), dec.sampling, uniforms)
        dec.counters.draft_calls += 1
        # copies: with CUDA graphs the graph's outputs are overwritten once the next graph runs
        return drafted.clone(), (None if q is None else q.clone())

    def roll_back(self, feed, decided: torch.Tensor, committed: int, draft_len: int, n: int, g: int):
        """The draft's write position already moved back past its masks (parallel_draft): it holds the
        committed tokens of earlier rounds; this round's are the next window. (g == 0 is the last
        round: the draft ran nothing and the state is not used again.)"""
        if g == 0:
            return draft_len, feed
        return committed, parallel.next_window(decided, g)


class TreeRound:
    """A tree of drafts (c2c.core.tree_steps): grown by the draft one forward per depth, verified by one
    target forward, walked on the device; both caches compacted to the accepted path on the device."""

    def __init__(self, dec, compiled, same_device: bool):
        self.dec = dec
        # greedy or sampled: the draft's growth and the verify with the walk and both caches' compaction,
        # one graph each (the round's uniforms are an input, drawn with the user's generator)
        self.graphs = None
        if compiled and same_device:
            self.graphs = (compiled.function(grow_tree, dec.device), compiled.function(verify_tree, dec.device))
        self.last = ChainRound(dec, None, same_device)  # a last round with no room for a draft: the target's token alone

    def first_feed(self, pending: torch.Tensor):
        return pending.view(1, 1)

    def run(self, feed, pending: torch.Tensor, committed: int, draft_len: int, room: int, clock) -> RoundEnd:
        dec = self.dec
        if room < 1:
            return self.last.run(feed, pending, committed, draft_len, room, clock)
        tree = dec.spec.tree
        shape = TreeShape(tree.budget, min(tree.depth, room), tree.top_k)
        dec.counters.branching = dec.counters.branching or shape.top_k > 1  # a round with more than a chain's choices
        d, tokens, parents, decided = self.grow_and_verify(feed, pending, shape, clock)
        path = d.path[: d.n]
        drafted_ids = trees.drafted_path(tokens, parents, path)  # the taken path, then the draft's first choices
        feed = d.next_feed(decided)
        return RoundEnd(d.n, drafted_ids, [tokens[i] for i in path] + [d.token], committed + d.m, d.pending(decided), feed,
                        trees.branch_point(parents, path))

    def grow_and_verify(self, feed: torch.Tensor, pending: torch.Tensor, shape: TreeShape, clock):
        """Draft a tree after the pending token, verify it in one target forward, walk it and keep the
        accepted path in both caches: on the fast path two compiled calls, the round's random numbers
        (sampling) drawn between them. Returns the decision (`TreeDecision`, host values), the tree's
        tokens and parents (host lists) and the output on the device (the next pending token and the
        draft's next feed are slices of it)."""
        dec = self.dec
        full = shape == dec.spec.tree and feed.shape[-1] <= 2  # the compiled shapes; short last rounds run as they are
        grow, verify = (self.graphs if full and self.graphs else (grow_tree, verify_tree))
        # 1. draft: the tokens it has not seen, then one forward per depth over the frontier
        step_begin(dec.device)
        packed, scores = grow(dec.draft, dec.draft_cache, feed, kv.cache_keyword(dec.draft), shape, dec.sampling)
        # a copy: with CUDA graphs the graph's outputs are overwritten once the verify graph runs
        packed = packed.clone()
        scores = scores.clone() if dec.tree_log is not None else None
        dec.counters.draft_calls += shape.depth
        clock.lap("draft")
        # 2-4. verify [pending, nodes] in one forward, walk, keep the path in both caches
        uniforms = None  # sampling: the round's random numbers, one per depth, drawn with the user's generator
        if not dec.sampling.greedy:
            uniforms = torch.rand(shape.depth + 1, device=dec.device, generator=dec.generator)
        step_begin(dec.device)
        out = verify(dec.target, dec.target_cache, dec.draft_cache, pending, packed, kv.cache_keyword(dec.target),
                     shape.depth, dec.sampling, uniforms, dec.force).clone()
        n_nodes = packed.shape[0] // 4
        dec.counters.target_calls += 1
        dec.counters.nodes_verified += n_nodes
        clock.lap("target")
        decision, tokens, parents = TreeDecision.read(out.tolist(), shape.depth, n_nodes)  # sync: the round's one host read
        if dec.tree_log is not None:  # --tree_budget auto's warm-up: what smaller trees would have accepted
            dec.tree_log.append((scores.tolist(), packed[2 * n_nodes : 3 * n_nodes].tolist(), decision.path[: decision.n]))
        return decision, tokens, parents, out


def round_kind(dec, compiled, masks: list[int] | None):
    """The round kind the decoder's SpecConfig asks for."""
    same_device = dec.device == dec.target_device
    if dec.spec.tree is not None:
        return TreeRound(dec, compiled, same_device)
    if dec.spec.parallel:
        if masks is None:
            raise ValueError("parallel drafting needs the draft's mask id(s) (c2c.core.parallel.config_mask_ids)")
        return ParallelRound(dec, compiled, same_device, parallel.mask_row(masks, dec.spec.gamma))
    return ChainRound(dec, compiled, same_device)
