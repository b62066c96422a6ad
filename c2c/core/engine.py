"""The generation loops: target-only (the reference) and speculative decoding with optional C2C fusion.

Batch size 1. The engine knows nothing about tokenizers, prompts or files: it takes token ids and
returns token ids with counters. A speculative round is five named steps: draft, verify, accept
(the round's one host synchronisation), roll back, fuse. Caches are rolled back by cropping; the
prefix is never recomputed.

Cache bookkeeping (host integers, never read from the device): the sequence holds `committed`
tokens (prompt + output). The last output token is "pending": no model has processed it yet, so the
target cache holds committed-1 positions after every round. The draft cache holds the same, or one
fewer when all gamma drafts were accepted (the draft never ran its own last guess); the tokens it
lacks are fed at the start of the next round.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import cache as kv
from . import tree as trees
from .fuser import C2CFuser, StackedProjectors
from .tree import TreeShape
from .sampling import SamplingConfig, accept_greedy, accept_sampled, next_token, probabilities
from .tree_steps import grow_tree, verify_tree


@dataclass(frozen=True)
class SpecConfig:
    gamma: int = 4
    max_new_tokens: int = 256
    prefill_fusion: bool = True
    decode_fusion: bool = True
    fuse_last_prompt: bool = True  # decode fusion also covers the last prompt position (C2C's prefill skips it)
    tree: TreeShape | None = None  # None: a chain of gamma drafts per round; else a tree of drafts (c2c.core.tree)

    def __post_init__(self):
        if self.gamma < 1:
            raise ValueError(f"gamma must be >= 1 (draft tokens per round), got {self.gamma}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")

    @property
    def longest(self) -> int:
        """The most drafts a round holds on one path: gamma for a chain, the depth for a tree."""
        return self.tree.depth if self.tree is not None else self.gamma

    @property
    def lookahead(self) -> int:
        """Cache positions a round may write past the committed sequence: gamma drafts for a chain; for
        a tree the target's verified nodes or the draft's fed frontier, the larger."""
        if self.tree is None:
            return self.gamma
        return max(self.tree.budget, (self.tree.depth - 1) * self.tree.top_k)


@dataclass
class Counters:
    """Raw counts and times of one run; `metrics` turns them into the reported figures."""

    draft_calls: int = 0  # draft forward passes, prefill included
    target_calls: int = 0  # target forward passes, prefill included
    rounds: int = 0  # verification passes (target calls after the prefill)
    total_drafted: int = 0  # draft tokens up to and including the first end-of-sequence token of each block
    total_accepted: int = 0
    rejections: int = 0  # rounds that ended at a rejected draft token (not all counted drafts accepted)
    fused_tokens: int = 0  # draft cache positions overwritten by the fuser (per position, all layers)
    nodes_verified: int = 0  # tree rounds: draft nodes the target checked (0 for chain rounds)
    branching: bool = False  # tree rounds with top_k > 1 (a chain's closed form does not describe them)
    gamma_rounds: int | None = None  # the most drafts a round could hold on one path (gamma capped by max_new_tokens)
    drafted_at: list[int] = field(default_factory=list)  # [k]: rounds in which draft token k was proposed
    accepted_at: list[int] = field(default_factory=list)  # [k]: rounds in which draft token k was accepted
    tokens_per_round: dict[int, int] = field(default_factory=dict)  # tokens a round produced -> rounds
    times: dict[str, float] = field(default_factory=dict)  # phase -> seconds
    calls: dict[str, int] = field(default_factory=dict)  # phase -> timed spans
    runs: int = 1  # generations summed into these counters (one prefill each)

    @classmethod
    def merged(cls, items: list["Counters"]) -> "Counters":
        """The sum of several runs' counters (e.g. all prompts of a benchmark repeat)."""
        total = cls(runs=0)
        for c in items:
            total.branching = total.branching or c.branching
            for name in ("draft_calls", "target_calls", "rounds", "total_drafted", "total_accepted", "rejections", "fused_tokens",
                         "nodes_verified", "runs"):
                setattr(total, name, getattr(total, name) + getattr(c, name))
            if c.gamma_rounds is not None:
                total.gamma_rounds = max(total.gamma_rounds or 0, c.gamma_rounds)
            width = max(len(total.drafted_at), len(c.drafted_at))
            total.drafted_at = [sum(x[k] for x in (total.drafted_at, c.drafted_at) if k < len(x)) for k in range(width)]
            total.accepted_at = [sum(x[k] for x in (total.accepted_at, c.accepted_at) if k < len(x)) for k in range(width)]
            for mine, theirs in ((total.tokens_per_round, c.tokens_per_round), (total.times, c.times), (total.calls, c.calls)):
                for key, value in theirs.items():
                    mine[key] = mine.get(key, 0) + value
        return total


@dataclass
class GenerationResult:
    output_ids: list[int]
    latency: float  # seconds, prefill to last token, device synchronised
    time_to_first_token: float
    counters: Counters


@dataclass(frozen=True)
class RoundInfo:
    """What a hook (`on_round`) observes after each round, host values only.

    Round 0 is the prefill: the target's first token, nothing drafted. In round k >= 1 the draft
    proposed `drafted_ids` (`drafted` tokens), the target accepted the first `accepted`, and the
    output grew by `tokens`: the accepted drafts, then the target's own token (a correction if
    accepted < drafted, else the bonus), cut after an end-of-sequence token. Drafts after an
    end-of-sequence token are left out, as in the counters. Over all rounds, `tokens` add up to the
    output ids, `drafted` and `accepted` to the counters' totals.
    """

    committed: int  # prompt + committed output length (the position after the target's token)
    target_cache: int
    draft_cache: int
    drafted: int
    accepted: int
    round: int = 0
    tokens: tuple[int, ...] = ()
    drafted_ids: tuple[int, ...] = ()
    branched_at: int | None = None  # tree rounds: where the accepted path left the draft's first choices

    def record(self) -> dict:
        """The JSON form `--save_rounds` writes."""
        out = {"round": self.round, "drafted": self.drafted, "accepted": self.accepted, "tokens": list(self.tokens),
               "drafted_ids": list(self.drafted_ids)}
        if self.branched_at is not None:
            out["branched_at"] = self.branched_at
        return out


HOOK_PHASE = "callback"  # the on_round / on_token hook's seconds: in no round phase, out of the latency


class HookTimer:
    """Calls a user hook (None: nothing) and adds up its seconds, which the caller leaves out of the
    latency: the hook runs after the round's host sync, while the device waits, so its time is
    the hook's alone (printing a streamed round, say)."""

    def __init__(self, hook):
        self.hook, self.seconds = hook, 0.0

    def __call__(self, *args) -> None:
        if self.hook is not None:
            t0 = time.perf_counter()
            self.hook(*args)
            self.seconds += time.perf_counter() - t0


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class CompiledSteps:
    """`torch.compile`d model calls for the fixed-shape steps (draft one-token step, target
    (gamma+1)-token verify, target one-token step), built once per model and reused across runs.

    Used together with static caches: on CUDA the default mode "reduce-overhead" captures CUDA
    graphs, which need the fixed tensor addresses static caches give. The first call of each shape
    compiles (seconds to minutes); callers time that apart, in their warm-up.
    """

    def __init__(self, mode: str | None = "auto", backend: str = "inductor"):
        self.mode, self.backend = mode, backend
        self._compiled: dict[int, object] = {}
        self._caches: dict[tuple[int, int, str], tuple[object, object]] = {}
        # Every model and shape shares transformers' forward code object, so each (model, shape) pair is
        # one recompile; the default limit (8) would silently fall back to eager in a gamma sweep.
        config = torch._dynamo.config
        name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
        setattr(config, name, max(getattr(config, name), 64))

    def function(self, fn, device: torch.device):
        """A compiled plain function working on `device` (e.g. the fixed-window fusion step), built once."""
        return self._compile(fn, device)

    def __call__(self, model):
        """The compiled model call, built once per model."""
        return self._compile(model, model_device(model))

    def _compile(self, target, device: torch.device):
        key = id(target)
        if key not in self._compiled:
            mode = self.mode
            if mode == "auto":  # CUDA graphs on GPUs; on CPUs plain inductor code generation
                mode = "reduce-overhead" if device.type == "cuda" else None
            self._compiled[key] = torch.compile(target, mode=mode, backend=self.backend, dynamic=False)
        return self._compiled[key]

    def cache(self, model, capacity: int, role: str = "target"):
        """The static cache of `capacity` positions for `model` in `role` ("target" or "draft": one
        model may serve as both): the same tensors on every call, emptied.

        CUDA graphs replay only on the addresses they were recorded with, and static caches are graph
        inputs: a fresh cache per prompt would re-record every graph once per prompt (one of three
        causes why, on an H100, a forced-accept round of 0.6B <- 14B at gamma 4 cost 73 ms against the
        ~28 ms of its parts). So one generation at a time per CompiledSteps; the previous run's cache is reset.
        """
        key = (id(model), capacity, role)
        held = self._caches.get(key)
        if held is not None and held[0] is model:
            with torch.inference_mode():  # its tensors may be inference tensors, made in an earlier run
                kv.reset(held[1])
            return held[1]
        cache = kv.new_cache(model, capacity)
        self._caches[key] = (model, cache)
        return cache

    @staticmethod
    def step_begin(device: torch.device) -> None:
        """Tell CUDA graph trees that the previous step's outputs are consumed (may be overwritten)."""
        if device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()


def step_forward(model, input_ids: torch.Tensor, cache, start: int, logits_to_keep: int = 0, call=None):
    """`cache.forward`, first telling CUDA graph trees that a new step begins when `call` is a compiled step."""
    if call is not None:
        CompiledSteps.step_begin(input_ids.device)
    return kv.forward(model, input_ids, cache, start, logits_to_keep=logits_to_keep, call=call)


class PhaseClock:
    """Attributes the time between consecutive laps to named phases.

    On CUDA it records events and reads them once at the end (no host sync per lap); on CPU the
    work is synchronous and perf_counter is exact.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.laps: list[tuple[str, object]] = []
        self.start()

    def _now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self) -> None:
        self.laps = [("", self._now())]

    def lap(self, phase: str) -> None:
        self.laps.append((phase, self._now()))

    def totals(self, counters: Counters) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        for (_, a), (phase, b) in zip(self.laps, self.laps[1:]):
            seconds = a.elapsed_time(b) / 1000 if self.cuda else b - a
            counters.times[phase] = counters.times.get(phase, 0.0) + seconds
            counters.calls[phase] = counters.calls.get(phase, 0) + 1


def static_capacity(positions: int, bucket: int = 256) -> int:
    """Static cache length rounded up to a multiple of `bucket`: the cache's shape is part of the
    compiled graph, so prompts of different lengths must share a few sizes, not recompile each."""
    return bucket * -(-positions // bucket)


def cache_sizes(prompt_len: int, max_new_tokens: int, gamma: int) -> tuple[int, int]:
    """The static cache sizes of a compiled target-only run and of a compiled speculative run: runs
    of other sizes use other caches and graphs, so a warm-up must cover each size the timed runs use."""
    return static_capacity(prompt_len + max_new_tokens + 1), static_capacity(prompt_len + max_new_tokens + gamma + 2)


def model_device(model) -> torch.device:
    """Where the model's input ids must go (its embedding's device; models may be split)."""
    return model.get_input_embeddings().weight.device


def standard_generate(
    target,
    prompt_ids: list[int],
    max_new_tokens: int,
    sampling: SamplingConfig,
    eos_ids: set[int],
    generator: torch.Generator | None = None,
    compiled: CompiledSteps | None = None,
    on_token: Callable[[int], None] | None = None,
) -> GenerationResult:
    """Target-only decoding, one token per forward: the reference the speculative output must match.

    With `compiled`, a static cache and a compiled one-token step (the fast path's baseline).
    `on_token` sees each token as it is made (e.g. to stream it); its time is left out of the latency.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    device = model_device(target)
    counters = Counters()
    step = compiled(target) if compiled else None
    sync_device(device)
    t0 = time.perf_counter()
    cache = compiled.cache(target, cache_sizes(len(prompt_ids), max_new_tokens, 0)[0]) if compiled else kv.new_cache(target)
    prompt = torch.tensor([prompt_ids], device=device)  # (1, n0)
    logits = kv.forward(target, prompt, cache, 0, logits_to_keep=1)  # (1, 1, V)
    token, _ = next_token(logits[0, -1].to(device), sampling, generator)
    out = [token.item()]  # sync: the token decides whether to stop
    ttft = time.perf_counter() - t0
    hook = HookTimer(on_token)
    hook(out[-1])
    position = len(prompt_ids)
    while out[-1] not in eos_ids and len(out) < max_new_tokens:
        logits = step_forward(target, token.view(1, 1), cache, position, logits_to_keep=1, call=step)
        position += 1
        token, _ = next_token(logits[0, -1].to(device), sampling, generator)
        out.append(token.item())  # sync: one per token, as in any plain decoding loop
        hook(out[-1])
    sync_device(device)
    counters.target_calls = len(out)
    if hook.seconds:
        counters.times[HOOK_PHASE] = hook.seconds
    return GenerationResult(out, time.perf_counter() - t0 - hook.seconds, ttft, counters)


def draft_block(model, cache, feed: torch.Tensor, position_ids: torch.Tensor, steps: int, keyword: str) -> torch.Tensor:
    """`steps` greedy draft tokens in one function: the compiled fast path captures it as one graph
    (one replay per round instead of one per draft step), the next token chosen on the device.

    feed (1, k): the tokens the draft has not seen (k = 1, or 2 after an all-accepted round) at
    position_ids (1, k); `keyword`: the forward's cache keyword (kv.cache_keyword). Returns the drafted
    ids (steps,). Same ops as `SpeculativeDecoder._draft`'s greedy loop, so the same tokens."""
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


def top2_margin(target, prompt_ids: list[int], output_prefix: list[int]) -> float:
    """The target's top-1 minus top-2 logit after prompt + output_prefix: how near a tie the next
    token was (a greedy divergence in bf16 is a rounding flip only where this is small)."""
    ids = torch.tensor([prompt_ids + output_prefix], device=model_device(target))
    logits = kv.forward(target, ids, kv.new_cache(target), 0, logits_to_keep=1)[0, -1].float()
    top = torch.topk(logits, 2).values
    return (top[0] - top[1]).item()


def fuse_positions(fuser: C2CFuser | StackedProjectors, target_cache, draft_cache, start: int, end: int) -> int:
    """Overwrite the draft's K/V at positions [start, end) with the fuser's output, every mapped layer
    at once (a C2CFuser is first turned into its stacked form when it can be, see C2CFuser.batched)."""
    if end <= start:
        return 0
    fusion = fuser.batched() if isinstance(fuser, C2CFuser) else fuser
    fused = fusion.fuse_layers(*kv.read_layers(target_cache, fusion.target_layers, start, end),
                               *kv.read_layers(draft_cache, fusion.draft_layers, start, end))
    kv.write_layers(draft_cache, fusion.draft_layers, start, *fused)
    return end - start


def fuse_window(fusion: C2CFuser | StackedProjectors, target_cache, draft_cache, positions: torch.Tensor, keep: torch.Tensor) -> None:
    """Decode fusion with fixed shapes, for static caches and compilation: fuse the draft's K/V at
    `positions` (W,) but write back only where `keep` (W,) is true (the newly committed positions;
    the rest of the window is already fused and keeps its values). `fusion` as the engine resolved
    it (C2CFuser.batched()); with pooled caches the reads and writes are one op each."""
    mask = keep.view(1, 1, 1, -1, 1)
    old_k, old_v = kv.read_layers_at(draft_cache, fusion.draft_layers, positions)  # (n, B, Hd, W, Dd)
    new_k, new_v = fusion.fuse_layers(*kv.read_layers_at(target_cache, fusion.target_layers, positions), old_k, old_v)
    kv.write_layers_at(draft_cache, fusion.draft_layers, positions,
                       torch.where(mask, new_k, old_k), torch.where(mask, new_v, old_v))


class SpeculativeDecoder:
    """Speculative decoding of one prompt: draft proposes, target verifies, fuser feeds the draft."""

    def __init__(
        self,
        target,
        draft,
        spec: SpecConfig,
        sampling: SamplingConfig,
        eos_ids: set[int],
        fuser: C2CFuser | None = None,
        generator: torch.Generator | None = None,
        on_round: Callable[[RoundInfo], None] | None = None,
        compiled: CompiledSteps | None = None,
        force_accept: bool = False,
    ):
        """`compiled`: static caches and compiled fixed-shape steps (same output ids as eager).
        `force_accept`: timing only (engine overhead with every draft accepted); the output is then
        NOT the target's, so nothing user-facing sets it."""
        self.target, self.draft, self.spec, self.sampling = target, draft, spec, sampling
        self.eos_ids, self.fuser, self.generator, self.on_round = eos_ids, fuser, generator, on_round
        self.fusion = None  # what fuses: fuser.batched(), looked up again for every prompt (the fuser may have moved)
        self.device = model_device(draft)  # sampling and acceptance happen here
        self.target_device = model_device(target)
        self.compiled, self.force_accept = compiled, force_accept
        self.tree_log: list | None = None  # a list: each tree round appends (kept scores, depths, accepted path)
        self.draft_step = compiled(draft) if compiled else None
        self.verify_step = compiled(target) if compiled else None
        self.fuse_step = compiled.function(fuse_window, self.device) if compiled and fuser is not None else None
        # greedy drafting as one graph per round; sampling keeps one graph per draft step (its generator
        # draws on the host side of torch and can't live inside a captured graph)
        self.draft_graph = compiled.function(draft_block, self.device) if compiled and sampling.greedy else None
        # greedy verify and acceptance as one graph, where the two models share a device
        same_device = self.device == self.target_device
        self.verify_graph = compiled.function(verify_block, self.device) if self.draft_graph and same_device else None
        # tree rounds, greedy or sampled: the draft's growth and the verify with the walk and both caches'
        # compaction, one graph each (the round's uniforms are an input, drawn with the user's generator)
        self.tree_graphs = None
        if compiled and spec.tree is not None and same_device:
            self.tree_graphs = (compiled.function(grow_tree, self.device), compiled.function(verify_tree, self.device))
        # the forced acceptance as a device flag: an input of the verify graph (so one graph serves both)
        forced = self.verify_graph or force_accept or spec.tree is not None
        self._force = torch.tensor(force_accept, device=self.device) if forced else None

    # ---------------------------------------------------------------- the round's steps

    def _draft(self, feed: torch.Tensor, start: int, g: int):
        """g autoregressive draft tokens. feed (1, k): tokens the draft has not seen yet."""
        if self.draft_graph is not None and g == self.spec.gamma and feed.shape[-1] <= 2:
            positions = torch.arange(start, start + feed.shape[-1], device=feed.device).unsqueeze(0)
            CompiledSteps.step_begin(self.device)
            # a copy: with CUDA graphs the graph's output memory is reused once the verify step begins,
            # and the drafted ids are read again after it (acceptance, the round's record)
            drafted = self.draft_graph(self.draft, self.draft_cache, feed, positions, g, kv.cache_keyword(self.draft)).clone()
            self.counters.draft_calls += g
            return drafted, None
        tokens, qs = [], []
        for _ in range(g):
            # compiled: one token, or the 2-token catch-up after an all-accepted round (its own graph;
            # eager it cost a 28-layer draft ~10x a compiled step on an H100). Longer feeds (gamma 0) stay eager.
            call = self.draft_step if feed.shape[-1] <= 2 else None
            logits = step_forward(self.draft, feed, self.draft_cache, start, logits_to_keep=1, call=call)  # (1, 1, V)
            start += feed.shape[-1]
            token, q = next_token(logits[0, -1], self.sampling, self.generator)
            tokens.append(token)
            qs.append(q)
            feed = token.view(1, 1)
        self.counters.draft_calls += g
        drafted = torch.stack(tokens) if tokens else torch.empty(0, dtype=torch.long, device=self.device)  # (g,)
        return drafted, (torch.stack(qs) if qs and qs[0] is not None else None)

    def _verify(self, pending: torch.Tensor, drafted: torch.Tensor, q, start: int, clock: "PhaseClock") -> torch.Tensor:
        """One target forward over [pending, d_1..d_g] and the acceptance -> the round's decision
        (`accept_round`) on the sampling device. A full greedy round on the fast path is one compiled
        call; otherwise the verify (compiled when full) and then the acceptance, eager."""
        g = drafted.shape[0]
        self.counters.target_calls += 1
        if self.verify_graph is not None and g == self.spec.gamma:
            positions = torch.arange(start, start + g + 1, device=self.device).unsqueeze(0)
            CompiledSteps.step_begin(self.device)
            # a copy: with CUDA graphs the graph's output memory is reused by the next replay, and the
            # next round's feed and pending token are slices of it
            decision = self.verify_graph(self.target, self.target_cache, pending, drafted, positions,
                                         kv.cache_keyword(self.target), self._force).clone()
            clock.lap("target")
            return decision
        block = torch.cat([pending.view(1), drafted]).view(1, -1).to(self.target_device)  # (1, g+1)
        call = self.verify_step if g == self.spec.gamma else None  # shorter last rounds stay eager
        logits = step_forward(self.target, block, self.target_cache, start, call=call)  # (1, g+1, V)
        clock.lap("target")
        return accept_round(drafted, q, logits[0].to(self.device), self.sampling, self.generator,
                            self._force if self.force_accept else None)

    def _fuse(self, start: int, end: int) -> None:
        self.counters.fused_tokens += fuse_positions(self.fusion, self.target_cache, self.draft_cache, start, end)

    def _fuse_decode(self, start: int, end: int) -> None:
        """Decode fusion of positions [start, end): a compiled fixed window of gamma+1 positions (a
        tree's depth+1) when compiling (at most that many become committed per round), the plain
        slices otherwise."""
        width = self.spec.longest + 1
        if self.fuse_step is None or end - start > width:
            return self._fuse(start, end)
        positions = (torch.arange(end - width, end, device=self.device)).clamp_min(0)  # (W,)
        keep = positions >= start  # clamped duplicates of position 0 are never kept
        CompiledSteps.step_begin(self.device)
        self.fuse_step(self.fusion, self.target_cache, self.draft_cache, positions, keep)
        self.counters.fused_tokens += end - start

    # ---------------------------------------------------------------- a tree round (static caches)

    def _tree_round(self, feed: torch.Tensor, pending: torch.Tensor, shape: TreeShape, clock: "PhaseClock"):
        """Draft a tree after the pending token, verify it in one target forward, walk it and keep the
        accepted path in both caches (c2c.core.tree_steps): on the fast path two compiled calls, the
        round's random numbers (sampling) drawn between them. Returns the round's decision as host
        values ([n, path node indices by depth (-1 past n), m, last path token, the target's token],
        the tree's tokens, its parents) and the output on the device (the next pending token and
        the draft's next feed are slices of it)."""
        full = shape == self.spec.tree and feed.shape[-1] <= 2  # the compiled shapes; short last rounds run as they are
        grow, verify = (self.tree_graphs if full and self.tree_graphs else (grow_tree, verify_tree))
        # 1. draft: the tokens it has not seen, then one forward per depth over the frontier
        CompiledSteps.step_begin(self.device)
        packed, scores = grow(self.draft, self.draft_cache, feed, kv.cache_keyword(self.draft), shape, self.sampling)
        # a copy: with CUDA graphs the graph's outputs are overwritten once the verify graph runs
        packed = packed.clone()
        scores = scores.clone() if self.tree_log is not None else None
        self.counters.draft_calls += shape.depth
        clock.lap("draft")
        # 2-4. verify [pending, nodes] in one forward, walk, keep the path in both caches
        uniforms = None  # sampling: the round's random numbers, one per depth, drawn with the user's generator
        if not self.sampling.greedy:
            uniforms = torch.rand(shape.depth + 1, device=self.device, generator=self.generator)
        CompiledSteps.step_begin(self.device)
        out = verify(self.target, self.target_cache, self.draft_cache, pending, packed, kv.cache_keyword(self.target),
                     shape.depth, self.sampling, uniforms, self._force).clone()
        n_nodes = packed.shape[0] // 4
        self.counters.target_calls += 1
        self.counters.nodes_verified += n_nodes
        clock.lap("target")
        host = out.tolist()  # sync: the round's one host read
        width = shape.depth + 4
        decision, tokens, parents = host[:width], host[width : width + n_nodes], host[width + n_nodes :]
        if self.tree_log is not None:  # --tree_budget auto's warm-up: what smaller trees would have accepted
            n = decision[0]
            self.tree_log.append((scores.tolist(), packed[2 * n_nodes : 3 * n_nodes].tolist(), decision[1 : 1 + n]))
        return decision, tokens, parents, out

    # ---------------------------------------------------------------- the loop

    def generate(self, prompt_ids: list[int]) -> GenerationResult:
        spec, c = self.spec, Counters()
        self.counters = c
        if spec.tree is not None:
            for role, model in (("target", self.target), ("draft", self.draft)):
                kv.check_tree_support(model, role)

        width = max(0, min(spec.longest, spec.max_new_tokens - 2))  # the most drafts a round can hold on one path
        c.drafted_at, c.accepted_at = [0] * width, [0] * width
        c.gamma_rounds = width
        # a fuser with every gate closed changes nothing (fused == the draft's own K/V): skip its cost
        fusing = self.fuser is not None and self.fuser.open_gates()[0] > 0
        self.fusion = self.fuser.batched() if fusing else None  # every layer at once where it can be
        n0 = len(prompt_ids)
        if n0 < 1:
            raise ValueError("the prompt must hold at least one token")
        sync_device(self.device)
        t_start = time.perf_counter()
        clock = PhaseClock(self.device)
        capacity = cache_sizes(n0, spec.max_new_tokens, spec.lookahead)[1]
        if self.compiled:
            self.target_cache = self.compiled.cache(self.target, capacity)
            self.draft_cache = self.compiled.cache(self.draft, capacity, "draft")
        elif spec.tree is not None:  # tree rounds write their nodes where the device says: static caches
            self.target_cache, self.draft_cache = kv.new_cache(self.target, capacity), kv.new_cache(self.draft, capacity)
        else:
            self.target_cache, self.draft_cache = kv.new_cache(self.target), kv.new_cache(self.draft)

        # Prefill: the target gives the first token; the draft fills its cache; prefill fusion.
        prompt = torch.tensor([prompt_ids], device=self.target_device)  # (1, n0)
        logits = kv.forward(self.target, prompt, self.target_cache, 0, logits_to_keep=1)
        pending, _ = next_token(logits[0, -1].to(self.device), self.sampling, self.generator)
        c.target_calls += 1
        out = [pending.item()]  # sync: the first token (time to first token, maybe end of sequence)
        ttft = time.perf_counter() - t_start
        clock.lap("target_prefill")
        kv.forward(self.draft, prompt.to(self.device), self.draft_cache, 0, logits_to_keep=1)
        c.draft_calls += 1
        clock.lap("draft_prefill")
        # Prefill fusion: every prompt position but the last, as C2C does. The last one is committed
        # and both caches hold it (the target has just worked out its answer there): decode fusion
        # covers it now, before the first draft, unless fuse_last_prompt is off.
        fuse_from = 0 if spec.prefill_fusion else n0 - 1
        fuse_to = n0 if spec.decode_fusion and spec.fuse_last_prompt else n0 - 1
        if fusing and fuse_to > fuse_from:
            self._fuse(fuse_from, fuse_to)
            clock.lap("fusion_prefill")  # once per prompt: kept out of the per-round cost
        decode_fused_upto = n0  # from here decode fusion covers generated positions
        hook = HookTimer(self.on_round)
        if self.on_round is not None:
            hook(RoundInfo(n0 + 1, kv.length(self.target_cache), kv.length(self.draft_cache), 0, 0, 0, (out[0],)))
            clock.lap(HOOK_PHASE)

        committed, draft_len = n0 + 1, n0
        feed = pending.view(1, 1)  # tokens the draft has not seen: seq[draft_len:committed]
        while out[-1] not in self.eos_ids and len(out) < spec.max_new_tokens:
            g = min(spec.gamma, spec.max_new_tokens - len(out) - 1)
            room = spec.max_new_tokens - len(out) - 1
            branched_at = None
            if spec.tree is not None and room >= 1:
                # 1-4. a tree round: draft a tree, verify it in one forward, walk it, keep the path
                shape = TreeShape(spec.tree.budget, min(spec.tree.depth, room), spec.tree.top_k)
                c.branching = c.branching or shape.top_k > 1  # a round with more than a chain's choices
                decision, tokens, parents, decided = self._tree_round(feed, pending, shape, clock)
                n, depth = decision[0], shape.depth
                path, m = decision[1 : 1 + n], decision[1 + depth]
                drafted_ids = trees.drafted_path(tokens, parents, path)  # the taken path, then the draft's first choices
                g = len(drafted_ids)
                branched_at = trees.branch_point(parents, path)
                new_tokens = [tokens[i] for i in path] + [decision[depth + 3]]
                draft_len = committed + m  # the draft holds the committed sequence, then the path nodes it fed
                committed += n + 1
                pending = decided[depth + 3]  # views: no launch
                feed = decided[depth + 2 : depth + 4].view(1, 2) if m < n else decided[depth + 3 : depth + 4].view(1, 1)
            else:
                # 1. draft
                drafted, q = self._draft(feed, draft_len, g)
                clock.lap("draft")
                # 2. verify and accept; 3. read the decision: the round's one host synchronisation
                decided = self._verify(pending, drafted, q, committed - 1, clock)  # (g+2,): n, d_1..d_g, token
                decision = decided.tolist()
                n, drafted_ids = decision[0], decision[1 : 1 + g]
                new_tokens = drafted_ids[:n] + [decision[-1]]
                token = decided[g + 1]  # a view: no launch
                # 4. roll back both caches to what is committed
                old_committed = committed
                committed += n + 1
                kv.crop(self.target_cache, committed - 1)
                if g > 0:
                    draft_len = old_committed + min(n, g - 1)
                    kv.crop(self.draft_cache, draft_len)
                    all_accepted = n == g
                    feed = decided[g : g + 2].view(1, 2) if all_accepted else decided[g + 1 :].view(1, 1)
                else:
                    feed = torch.cat([feed.view(-1), token.view(1)]).view(1, -1)
                pending = token
            # 5. record (drafts after an end-of-sequence token are never counted), emit up to the first one
            # (a tree's drafted_ids are its taken path then the draft's first choices: the same rule as a chain's)
            counted = next((k + 1 for k, t in enumerate(drafted_ids) if t in self.eos_ids), g)
            accepted = min(n, counted)
            emitted = len(out)
            for t in new_tokens:
                out.append(t)
                if t in self.eos_ids:
                    break
            self._record(counted, accepted, len(out) - emitted)
            clock.lap("overhead")
            # 6. decode fusion of the newly committed positions both caches hold
            if fusing and spec.decode_fusion and draft_len > decode_fused_upto:
                self._fuse_decode(decode_fused_upto, draft_len)
                decode_fused_upto = draft_len
                clock.lap("fusion")
            if self.on_round is not None:
                hook(RoundInfo(committed, kv.length(self.target_cache), kv.length(self.draft_cache), counted,
                               accepted, c.rounds, tuple(out[emitted:]), tuple(drafted_ids[:counted]),
                               branched_at if branched_at is not None and branched_at < accepted else None))
                clock.lap(HOOK_PHASE)  # the hook's time: in no phase, and out of the latency
        sync_device(self.device)
        latency = time.perf_counter() - t_start - hook.seconds
        clock.totals(c)
        return GenerationResult(out, latency, ttft, c)

    def _record(self, g: int, n: int, emitted: int) -> None:
        c = self.counters
        c.rounds += 1
        c.total_drafted += g
        c.total_accepted += n
        c.rejections += n < g
        for k in range(g):
            c.drafted_at[k] += 1
        for k in range(n):
            c.accepted_at[k] += 1
        c.tokens_per_round[emitted] = c.tokens_per_round.get(emitted, 0) + 1
