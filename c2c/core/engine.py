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
from .fuser import C2CFuser, StackedProjectors
from .rounds import round_kind, step_begin, step_forward
from .sampling import SamplingConfig, next_token
from .tree import TreeShape


@dataclass(frozen=True)
class SpecConfig:
    gamma: int = 4
    max_new_tokens: int = 256
    prefill_fusion: bool = True
    decode_fusion: bool = True
    fuse_last_prompt: bool = True  # decode fusion also covers the last prompt position (C2C's prefill skips it)
    tree: TreeShape | None = None  # None: a chain of gamma drafts per round; else a tree of drafts (c2c.core.tree)
    parallel: bool = False  # all gamma drafts of a round from one draft forward (c2c.core.parallel)

    def __post_init__(self):
        if self.gamma < 1:
            raise ValueError(f"gamma must be >= 1 (draft tokens per round), got {self.gamma}")
        if self.parallel and self.tree is not None:
            raise ValueError("parallel drafting drafts a chain: it can't be combined with tree rounds")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")

    @property
    def longest(self) -> int:
        """The most drafts a round holds on one path: gamma for a chain, the depth for a tree."""
        return self.tree.depth if self.tree is not None else self.gamma

    @property
    def lookahead(self) -> int:
        """Cache positions a round may write past the committed sequence: gamma drafts for a chain; the
        draft's block of 2 gamma for parallel drafting (c2c.core.parallel); for a tree the target's
        verified nodes or the draft's fed frontier, the larger."""
        if self.tree is None:
            return 2 * self.gamma if self.parallel else self.gamma
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
    parallel: bool = False  # parallel drafting: one draft forward per round, whatever gamma
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
            total.parallel = total.parallel or c.parallel
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

    step_begin = staticmethod(step_begin)  # tell CUDA graph trees the previous step's outputs are consumed


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
        masks: list[int] | None = None,
    ):
        """`compiled`: static caches and compiled fixed-shape steps (same output ids as eager).
        `masks`: the draft's mask id(s), for parallel drafting (c2c.core.parallel.config_mask_ids).
        `force_accept`: timing only (engine overhead with every draft accepted); the output is then
        NOT the target's, so nothing user-facing sets it."""
        self.target, self.draft, self.spec, self.sampling = target, draft, spec, sampling
        self.eos_ids, self.fuser, self.generator, self.on_round = eos_ids, fuser, generator, on_round
        self.fusion = None  # what fuses: fuser.batched(), looked up again for every prompt (the fuser may have moved)
        self.device = model_device(draft)  # sampling and acceptance happen here
        self.target_device = model_device(target)
        self.compiled, self.force_accept = compiled, force_accept
        self.tree_log: list | None = None  # a list: each tree round appends (kept scores, depths, accepted path)
        self.fuse_step = compiled.function(fuse_window, self.device) if compiled and fuser is not None else None
        # the forced acceptance as a device flag: an input of the verify graph (so one graph serves both)
        self.force = torch.tensor(force_accept, device=self.device)
        self.rounds = round_kind(self, compiled, masks)  # chain, parallel or tree (c2c.core.rounds)

    # ---------------------------------------------------------------- fusion

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

    # ---------------------------------------------------------------- the loop

    def generate(self, prompt_ids: list[int]) -> GenerationResult:
        spec, c = self.spec, Counters()
        self.counters = c
        if spec.tree is not None:
            for role, model in (("target", self.target), ("draft", self.draft)):
                kv.check_tree_support(model, role)

        width = max(0, min(spec.longest, spec.max_new_tokens - 2))  # the most drafts a round can hold on one path
        c.drafted_at, c.accepted_at = [0] * width, [0] * width
        c.gamma_rounds, c.parallel = width, spec.parallel
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
        elif spec.tree is not None or spec.parallel:  # tree and parallel rounds write where the device says: static caches
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
            hook(RoundInfo(n0 + 1, n0, n0, 0, 0, 0, (out[0],)))
            clock.lap(HOOK_PHASE)

        committed, draft_len = n0 + 1, n0
        feed = self.rounds.first_feed(pending)  # what the draft has not seen: seq[draft_len:committed]
        while out[-1] not in self.eos_ids and len(out) < spec.max_new_tokens:
            room = spec.max_new_tokens - len(out) - 1  # drafts that fit before max_new_tokens
            # 1-4. draft, verify, accept (the round's one host read), roll both caches back to what is committed
            end = self.rounds.run(feed, pending, committed, draft_len, room, clock)
            committed += end.n + 1
            draft_len, pending, feed = end.draft_len, end.pending, end.feed
            # 5. record (drafts after an end-of-sequence token are never counted), emit up to the first one
            # (a tree's drafted_ids are its taken path then the draft's first choices: the same rule as a chain's)
            g = len(end.drafted_ids)
            counted = next((k + 1 for k, t in enumerate(end.drafted_ids) if t in self.eos_ids), g)
            accepted = min(end.n, counted)
            emitted = len(out)
            for t in end.new_tokens:
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
            if self.on_round is not None:  # host values only: the target holds all but the pending token
                branched = end.branched_at if end.branched_at is not None and end.branched_at < accepted else None
                hook(RoundInfo(committed, committed - 1, draft_len, counted, accepted, c.rounds, tuple(out[emitted:]),
                               tuple(end.drafted_ids[:counted]), branched))
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
