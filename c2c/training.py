"""Training C2C projectors for speculative decoding; both language models stay frozen.

Objective (made for how the demo uses the fuser), `suffixes="all"` (the default): every position
of a sequence's supervised span (the answer, for problems) is trained at once. The span is tiled
into blocks of gamma+1 positions (a random offset per sequence); a query in the block starting at m
sees the fused K/V of every position before m and the draft's own K/V from m on, which is exactly
the draft's cache at decode time after a prefix of m tokens. One target forward and two draft
passes do it (pass 1: the draft's own K/V everywhere, fused with the target's; pass 2: the draft
again over a cache of the fused K/V with a block mask). `suffixes="one"` is the earlier objective
and the reference the tests compare blocks against: a window of text is split into a prefix of m
tokens and a suffix of s tokens, s uniform in 1..gamma+1. The target runs over prefix + suffix; the
draft runs over the prefix, its K/V at every prefix position are fused with the target's (as
prefill and decode fusion leave the cache at decode time), then the draft runs the suffix on its own
unfused K/V, exactly as it does while drafting a round. The loss makes the fused draft's next-token
distribution on the suffix match the target's: KL(p_target || q_draft) or cross-entropy on the
target's greedy tokens. Gradients reach only the projectors, through the draft's attention.

Optional (not C2C; for when a frozen draft cannot read what the projectors give it): a draft
adapter (`c2c.adapter`, LoRA or a full weight change) trained jointly with the projectors, saved
beside the fuser; or, with fusion off, the adapter alone (the "draft fine-tuned alone" arm of the
upper-bound study: the same data and steps, nothing from the target's cache).

Gates follow C2C: Gumbel-sigmoid with a temperature annealed from initial to final over
`anneal_steps` while training, hard gate (logit > 0) at inference and in the held-out figure.

This module knows nothing about argument parsing; `c2c.train_fuser` is its command line.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import cache as kv
from .adapter import KINDS, DraftAdapter
from .errors import UserInputError
from .fuser import C2CFuser, KVShape, load_fuser, save_fuser


SUFFIXES = ("all", "one")
GATE_NOISE = ("gumbel", "logistic", "none")


@dataclass(frozen=True)
class TrainConfig:
    draft_model: str
    target_model: str
    data: str
    output_dir: str
    steps: int = 1000
    batch_size: int = 8
    seq_len: int = 128
    gamma: int = 4
    min_prefix: int = 8
    objective: str = "kl"  # "kl" or "ce"
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 50
    grad_clip: float = 1.0
    hidden_dim: int = 1024
    intermediate_dim: int = 1024
    num_layers: int = 3
    dropout: float = 0.1
    anneal_steps: int | None = None  # default: steps
    initial_gate_logit: float = 0.0
    zero_init: bool = False  # start with zero projections (fusion starts as the identity)
    heldout_fraction: float = 0.05
    eval_every: int = 100
    eval_tokens: int = 2048  # held-out suffix tokens per evaluation (paired fused/unfused, won/lost counted)
    save_every: int = 200
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    save_dtype: str = "auto"  # auto: bfloat16 when the models run in bf16 (as released fusers), else float32
    generate_from_target: int = 0  # >0: texts are prompts; the target answers each (at most this many tokens)
    enable_thinking: bool = False  # Qwen3's chat-template thinking switch, as in the demo
    threads: int = 0  # CPU threads for torch; 0: one per physical core (a guess: half the logical CPUs)
    draft_adapter: str = "none"  # none (C2C: frozen draft), lora or full: trained jointly with the projectors
    adapter_rank: int = 8
    adapter_lr: float = 0.0  # 0: the same as lr
    fusion: bool = True  # False (with an adapter): the draft adapter alone, no projectors (the study's control arm)
    suffixes: str = "all"  # all: every supervised position in blocks of gamma+1; one: one split per batch (earlier)
    gate_noise: str = "gumbel"  # training noise of the gates: gumbel (C2C's), logistic (the shipped presets'), none
    keep_checkpoints: int = 2  # checkpoints kept in output_dir/checkpoints (older ones are deleted)

    def __post_init__(self):
        if self.suffixes not in SUFFIXES:
            raise UserInputError(f"--suffixes must be {' or '.join(SUFFIXES)}, got {self.suffixes!r}")
        if self.gate_noise not in GATE_NOISE:
            raise UserInputError(f"--gate_noise must be {', '.join(GATE_NOISE)}, got {self.gate_noise!r}")
        for name in ("lr", "adapter_lr", "weight_decay", "grad_clip", "dropout", "initial_gate_logit", "heldout_fraction"):
            if not math.isfinite(getattr(self, name)):
                raise UserInputError(f"--{name} must be a finite number, got {getattr(self, name)}")
        if self.lr <= 0 or self.adapter_lr < 0:
            raise UserInputError(f"--lr must be > 0 and --adapter_lr >= 0 (0: the same as --lr), got {self.lr} and {self.adapter_lr}")
        if not 0 < self.heldout_fraction < 1:
            raise UserInputError(f"--heldout_fraction must be between 0 and 1, got {self.heldout_fraction}")
        if self.keep_checkpoints < 1:
            raise UserInputError(f"--keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        if self.draft_adapter not in ("none", *KINDS):
            raise UserInputError(f"--draft_adapter must be none, {' or '.join(KINDS)}, got {self.draft_adapter!r}")
        if not self.fusion and self.draft_adapter == "none":
            raise UserInputError("--no-fusion trains the draft adapter alone: also pass --draft_adapter lora or full")
        if self.objective not in ("kl", "ce"):
            raise UserInputError(f"--objective must be kl or ce, got {self.objective!r}")
        if self.threads < 0:
            raise UserInputError(f"--threads must be >= 0 (0: one per physical core), got {self.threads}")
        if self.seq_len < self.min_prefix + self.gamma + 1:
            raise UserInputError(f"--seq_len {self.seq_len} is too short for min_prefix {self.min_prefix} + gamma+1")
        for name in ("steps", "batch_size", "gamma", "eval_every", "save_every", "eval_tokens"):
            if getattr(self, name) < 1:
                raise UserInputError(f"--{name} must be >= 1, got {getattr(self, name)}")


# ---------------------------------------------------------------- data


@torch.no_grad()
def greedy_batch(model, prompts: list[list[int]], max_new_tokens: int, eos_ids: set[int], batch_size: int = 64) -> list[list[int]]:
    """Greedy continuations of many prompts, batched with left padding (prompts sorted by length, so
    a batch pads little; the padding is masked out and positions count real tokens only).

    Each continuation ends at its first end-of-sequence token (included) or after max_new_tokens.
    The reference for single prompts is `engine.standard_generate`; a test checks they agree.
    """
    from .engine import model_device

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
    from .prompts import encode_prompt

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


@dataclass
class Group:
    """Sequences of one length (k, L) whose prefix/suffix split obeys m_min <= m and m + s <= m_end."""

    tokens: torch.Tensor  # (k, L)
    m_min: int
    m_end: int


class SplitData:
    """Where the training and held-out suffixes come from.

    Plain text: fixed windows, any split after `min_prefix` tokens. Problems (prompt + the
    target's answer): the prefix covers the whole prompt and the suffix lies inside the answer,
    where drafting happens (the first answer token comes from the target's prefill, so the
    draft's first guess is made at the first answer position, position n0).
    """

    def __init__(self, groups: list[Group], gamma: int):
        self.groups = [g for g in groups if g.m_end - g.m_min >= 1 and len(g.tokens)]
        if not self.groups:
            raise UserInputError("training data hold no sequence long enough for a prefix and a suffix")
        self.gamma = gamma
        self.rows = sum(len(g.tokens) for g in self.groups)

    @classmethod
    def from_windows(cls, windows: torch.Tensor, min_prefix: int, gamma: int) -> "SplitData":
        return cls([Group(windows, min_prefix, windows.shape[1])], gamma)

    @classmethod
    def from_answers(cls, items: list[tuple[list[int], int]], gamma: int) -> "SplitData":
        """items: (prompt + answer ids, prompt length n0); grouped by (length, n0) so batches need no padding."""
        by_shape: dict[tuple[int, int], list[list[int]]] = {}
        for ids, n0 in items:
            by_shape.setdefault((len(ids), n0), []).append(ids)
        return cls([Group(torch.tensor(rows), n0, length - 1) for (length, n0), rows in sorted(by_shape.items())], gamma)

    def _split(self, group: Group, rng: random.Random) -> tuple[int, int]:
        s = rng.randint(1, min(self.gamma + 1, group.m_end - group.m_min))
        return rng.randint(group.m_min, group.m_end - s), s

    def sample(self, rng: random.Random, batch_size: int) -> tuple[torch.Tensor, int, int]:
        """A training batch x (B, L) and its split (m, s); groups drawn in proportion to their size."""
        group = rng.choices(self.groups, weights=[len(g.tokens) for g in self.groups])[0]
        rows = [rng.randrange(len(group.tokens)) for _ in range(batch_size)]
        m, s = self._split(group, rng)
        return group.tokens[rows], m, s

    def sample_blocks(self, rng: random.Random, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A batch for the all-position objective: x (B, L), each position's block start (B, L) and
        which positions are supervised (B, L); rows and block offsets come from `rng` alone (so every
        process of a data-parallel run draws the same global batch)."""
        group = rng.choices(self.groups, weights=[len(g.tokens) for g in self.groups])[0]
        rows = [rng.randrange(len(group.tokens)) for _ in range(batch_size)]
        offsets = [rng.randrange(self.gamma + 1) for _ in rows]
        starts, supervised = block_layout(group.tokens.shape[1], group.m_min, group.m_end, self.gamma + 1, offsets)
        return group.tokens[rows], starts, supervised

    def evaluation(self, tokens: int, batch_size: int, seed: int = 12345):
        """Fixed held-out batches (x, m, s), the same at every evaluation, until `tokens` suffix
        tokens are covered (rows are reused with new splits when there are too few)."""
        rng, covered = random.Random(seed), 0
        while covered < tokens:
            for group in self.groups:
                for first in range(0, len(group.tokens), batch_size):
                    x = group.tokens[first : first + batch_size]
                    m, s = self._split(group, rng)
                    yield x, m, s
                    covered += len(x) * s
                    if covered >= tokens:
                        return


def block_layout(length: int, m_min: int, m_end: int, width: int, offsets: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Block starts (B, length) and the supervised positions (B, length) for sequences whose
    supervised span is [m_min, m_end): blocks of `width` positions begin at m_min + offset + k*width
    (and at m_min itself: a first, shorter block when the offset is not 0), each no longer than
    width, so a block starting at m with s positions is a split (m, s) of the one-split objective.
    Positions before m_min are their own block start (the draft alone, no loss)."""
    pos = torch.arange(length)
    starts = pos.repeat(len(offsets), 1)  # unsupervised prefix: plain causal attention
    for row, offset in enumerate(offsets):
        span = pos[m_min:]
        since = span - (m_min + offset)  # blocks from m_min + offset on; before that the first block
        starts[row, m_min:] = torch.where(since >= 0, m_min + offset + since.div(width, rounding_mode="floor") * width,
                                          torch.full_like(span, m_min))
    supervised = ((pos >= m_min) & (pos < m_end)).repeat(len(offsets), 1)
    return starts, supervised


def block_mask(starts: torch.Tensor) -> torch.Tensor:
    """(B, 1, L, 2L) boolean attention mask for pass 2 of the all-position objective: query p may
    attend the fused keys of positions before its block start and its own pass-2 keys from the
    block start up to p. The first L keys are the cache (fused), the last L the new ones."""
    L = starts.shape[1]
    pos = torch.arange(L, device=starts.device)
    start = starts.unsqueeze(-1)  # (B, L, 1)
    fused = pos.view(1, 1, L) < start
    own = (pos.view(1, 1, L) >= start) & (pos.view(1, 1, L) <= pos.view(1, L, 1))
    return torch.cat([fused, own], dim=-1).unsqueeze(1)


def split_heldout(items: list, fraction: float) -> tuple[list, list]:
    """The last `fraction` of the items (at least one) is held out: training never sees it."""
    n_held = max(1, int(len(items) * fraction))
    if len(items) - n_held < 1:
        raise UserInputError(f"training data too small: {len(items)} sequences leave none after the held-out share")
    return items[:-n_held], items[-n_held:]


# ---------------------------------------------------------------- the objective


def fused_suffix_logits(fuser, target, draft, x: torch.Tensor, m: int, s: int, fuse: bool = True, draft_grad: bool = False):
    """Target and draft logits for the s suffix tokens after a (fused) prefix of m tokens.

    x (B, L) token ids on the models' device. Returns (target_logits, draft_logits), each (B, s, V):
    position j predicts token m+j+1. `draft_grad`: the draft is being trained (an adapter), so its
    prefix runs with gradients too (its K/V there are what the projectors fuse into).
    """
    with torch.no_grad():
        tcache, dcache = kv.new_cache(target), kv.new_cache(draft)
        target_logits = kv.forward(target, x[:, : m + s], tcache, 0)[:, m:]  # (B, s, V)
    with torch.set_grad_enabled(draft_grad and torch.is_grad_enabled()):
        kv.forward(draft, x[:, :m], dcache, 0, logits_to_keep=1)
    if fuse:
        fuse_cache(fuser, tcache, dcache, m)
    draft_logits = kv.forward(draft, x[:, m : m + s], dcache, m)  # (B, s, V), through the fused cache
    return target_logits, draft_logits


def fuse_cache(fuser, tcache, dcache, length: int) -> None:
    """Replace the draft cache's K/V at positions [0, length) of every mapped layer by the fused
    ones, per layer (training: the projectors' gate noise and dropout act per projector, and the
    autograd graph is kept; inference uses the batched path)."""
    for layer in range(kv.num_layers(dcache)):
        if layer not in fuser.layer_map:
            continue
        target_layer, _ = fuser.layer_map[layer]
        fused = fuser.fuse_layer(layer, kv.read_kv(tcache, target_layer, 0, length), kv.read_kv(dcache, layer, 0, length))
        kv.replace_kv(dcache, layer, *fused)


def all_position_logits(fuser, target, draft, x: torch.Tensor, starts: torch.Tensor, fuse: bool = True,
                        draft_grad: bool = False):
    """Target and draft logits at every position, each (B, L, V): the draft's at position p as it
    guesses after a fused prefix of starts[p] tokens (see block_layout). One target forward and two
    draft passes; without fusion, one draft pass (its own cache is what the draft decodes with)."""
    B, L = x.shape
    with torch.no_grad():
        tcache = kv.new_cache(target)
        target_logits = kv.forward(target, x, tcache, 0)  # (B, L, V)
    dcache = kv.new_cache(draft)
    with torch.set_grad_enabled(draft_grad and torch.is_grad_enabled()):
        plain = kv.forward(draft, x, dcache, 0, logits_to_keep=0 if not fuse else 1)  # pass 1
    if not fuse:
        return target_logits, plain
    fuse_cache(fuser, tcache, dcache, L)
    positions = torch.arange(L, device=x.device).expand(B, L)
    draft_logits = kv.forward_masked(draft, x, dcache, positions, block_mask(starts.to(x.device)))  # pass 2
    return target_logits, draft_logits


def token_losses(target_logits: torch.Tensor, draft_logits: torch.Tensor, objective: str) -> torch.Tensor:
    """Per-position loss (...,): KL(p_target || q_draft) or cross-entropy on the target's greedy token."""
    log_q = draft_logits.float().log_softmax(-1)
    if objective == "ce":
        return -log_q.gather(-1, target_logits.argmax(-1, keepdim=True)).squeeze(-1)
    log_p = target_logits.float().log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def loss_fn(target_logits: torch.Tensor, draft_logits: torch.Tensor, objective: str) -> torch.Tensor:
    """The mean of token_losses over every position given."""
    return token_losses(target_logits, draft_logits, objective).mean()


@torch.no_grad()
def paired_agreement(fuser, target, draft, heldout: SplitData, tokens: int, batch_size: int, objective: str = "kl",
                     device=None, adapter=None, fuse: bool = True) -> dict:
    """Held-out top-1 agreement of draft and target on the same suffix tokens, fused (as the fuser
    is: hard gates in eval mode) and unfused, with the paired counts: won = right only when fused,
    lost = right only unfused. At least `tokens` suffix tokens.

    With a draft adapter, "fused" is the draft as the fused modes run it (adapter on, fusion on unless
    `fuse` is False), "unfused" the plain draft (adapter off, no fusion: the baseline a user compares
    with), and "adapter_only" the adapted draft without fusion (how much the adapter does alone).
    """
    counts = {"fused": 0, "unfused": 0, "won": 0, "lost": 0, "adapter_only": 0}
    total, loss, batches = 0, 0.0, 0
    for x, m, s in heldout.evaluation(tokens, batch_size):
        x = x.to(device)
        t_logits, fused = fused_suffix_logits(fuser, target, draft, x, m, s, fuse=fuse)
        want = t_logits.argmax(-1)  # (B, s)
        if adapter is None:
            _, unfused = fused_suffix_logits(fuser, target, draft, x, m, s, fuse=False)
        else:
            alone = fused_suffix_logits(fuser, target, draft, x, m, s, fuse=False)[1] if fuse else fused
            counts["adapter_only"] += int((alone.argmax(-1) == want).sum())
            with adapter.disabled():
                _, unfused = fused_suffix_logits(fuser, target, draft, x, m, s, fuse=False)  # the plain draft
        right_f, right_u = fused.argmax(-1) == want, unfused.argmax(-1) == want
        counts["fused"] += int(right_f.sum())
        counts["unfused"] += int(right_u.sum())
        counts["won"] += int((right_f & ~right_u).sum())
        counts["lost"] += int((right_u & ~right_f).sum())
        loss += loss_fn(t_logits, fused, objective).item()
        total, batches = total + want.numel(), batches + 1
    open_gates, gates = fuser.open_gates() if fuser is not None else (0, 0)
    figures = {
        "heldout_loss": loss / batches, "heldout_tokens": total,
        "agreement_fused": counts["fused"] / total, "agreement_unfused": counts["unfused"] / total,
        "won": counts["won"], "lost": counts["lost"], "open_gates": open_gates, "gates": gates,
    }
    if adapter is not None:
        figures["agreement_adapter_only"] = counts["adapter_only"] / total
    return figures


# ---------------------------------------------------------------- the trainer


@dataclass(frozen=True)
class Processes:
    """This process's place in a data-parallel run (`accelerate launch`): rank 0 of 1 when alone."""

    rank: int = 0
    count: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.count > 1:
            torch.distributed.barrier()

    def sum_gradients(self, params: list[torch.Tensor]) -> None:
        """Every process's gradients summed in place (one all-reduce over a flat buffer)."""
        if self.count == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat)
        offset = 0
        for p, g in zip(params, grads):
            p.grad = flat[offset : offset + g.numel()].view_as(g).clone()
            offset += g.numel()


def peak_memory_gb(device) -> float:
    """Peak memory of this process: the GPU's allocator on CUDA, the resident set size on CPU."""
    if getattr(device, "type", str(device)) == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux


class FuserTrainer:
    """Owns the fuser, optimizer, schedule and RNG state; `train()` runs to cfg.steps, resumable.

    Data-parallel across `processes`: every process draws the same global batch from the same RNG
    and trains on its share of the rows; gradients are summed, so one command trains the same thing
    on 1 or N processes (up to float rounding). Only the main process evaluates and writes."""

    def __init__(self, cfg: TrainConfig, target, draft, data: SplitData, heldout: SplitData, device,
                 processes: Processes = Processes()):
        self.cfg, self.target, self.draft, self.device = cfg, target, draft, device
        self.data, self.heldout, self.processes = data, heldout, processes
        if cfg.batch_size < processes.count:
            raise UserInputError(f"--batch_size {cfg.batch_size} is the global batch: it must be at least the "
                                 f"number of processes ({processes.count})")
        torch.manual_seed(cfg.seed)
        draft_shape, target_shape = KVShape.of(draft.config), KVShape.of(target.config)
        self.fuser = C2CFuser.create(
            draft_shape, target_shape, hidden_dim=cfg.hidden_dim, intermediate_dim=cfg.intermediate_dim,
            num_layers=cfg.num_layers, dropout=cfg.dropout, anneal_steps=cfg.anneal_steps or cfg.steps,
            dtype=torch.float32, zero_init=cfg.zero_init,
        ).to(device)
        for p in self.fuser.projectors:
            p.key_gate_logit.data.fill_(cfg.initial_gate_logit)
            p.value_gate_logit.data.fill_(cfg.initial_gate_logit)
            p.gate_noise = cfg.gate_noise
        self.adapter = None
        groups = [{"params": list(self.fuser.parameters())}] if cfg.fusion else []
        if cfg.draft_adapter != "none":
            draft.requires_grad_(False)
            self.adapter = DraftAdapter.create(draft, cfg.draft_adapter, cfg.adapter_rank).to(device)
            self.adapter.attach(draft)
            groups.append({"params": list(self.adapter.parameters()), "lr": cfg.adapter_lr or cfg.lr})
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.rng = random.Random(cfg.seed)  # batch order and split points
        self.step = 0
        self.history: list[dict] = []
        self.target_tokens = 0  # tokens the target has read so far, all processes
        self.supervised_tokens = 0  # positions a loss was taken on so far, all processes
        self.trained = [p for g in self.optimizer.param_groups for p in g["params"]]

    def _lr_factor(self, step: int) -> float:
        warm = self.cfg.warmup_steps
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, self.cfg.steps - warm)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    def train_step(self) -> float:
        cfg = self.cfg
        self.fuser.train()
        for p in self.fuser.projectors:
            p.set_anneal_step(self.step)
        share = slice(self.processes.rank, None, self.processes.count)  # this process's rows of the global batch
        grad = self.adapter is not None
        if cfg.suffixes == "all":
            x, starts, supervised = self.data.sample_blocks(self.rng, cfg.batch_size)
            total = int(supervised.sum())
            target_logits, draft_logits = all_position_logits(self.fuser, self.target, self.draft, x[share].to(self.device),
                                                              starts[share], fuse=cfg.fusion, draft_grad=grad)
            mask = supervised[share].to(self.device)
            loss = token_losses(target_logits[mask], draft_logits[mask], cfg.objective).sum() / total
            target_read = x.numel()
        else:
            x, m, s = self.data.sample(self.rng, cfg.batch_size)
            target_logits, draft_logits = fused_suffix_logits(self.fuser, self.target, self.draft, x[share].to(self.device),
                                                              m, s, fuse=cfg.fusion, draft_grad=grad)
            loss = loss_fn(target_logits, draft_logits, cfg.objective)  # the mean over this process's rows
            if self.processes.count > 1:
                loss = loss * (len(x[share]) / len(x))
            total, target_read = len(x) * s, len(x) * (m + s)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.processes.sum_gradients(self.trained)
        torch.nn.utils.clip_grad_norm_(self.trained, cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        self.target_tokens += target_read
        self.supervised_tokens += total
        return loss.item()  # sync: logged once per step (this process's share of the loss)

    @torch.no_grad()
    def evaluate(self) -> dict:
        self.fuser.eval()
        figures = paired_agreement(self.fuser, self.target, self.draft, self.heldout, self.cfg.eval_tokens,
                                   self.cfg.batch_size, self.cfg.objective, self.device, self.adapter, self.cfg.fusion)
        return {"step": self.step, **figures, "target_tokens": self.target_tokens,
                "supervised_tokens": self.supervised_tokens}

    def metrics_line(self, figures: dict) -> dict:
        """One line of metrics.jsonl."""
        return {
            "step": figures["step"], "heldout_agreement_fused": figures["agreement_fused"],
            "heldout_agreement_unfused": figures["agreement_unfused"], "won": figures["won"], "lost": figures["lost"],
            "heldout_tokens": figures["heldout_tokens"], "target_tokens": self.target_tokens,
            "supervised_tokens": self.supervised_tokens, "processes": self.processes.count,
            "lr": self.scheduler.get_last_lr()[0], "open_gates": figures["open_gates"], "gates": figures["gates"],
        }

    # ------------------------------------------------------------ checkpoints

    def save_checkpoint(self, folder: Path) -> None:
        save_fuser(self.fuser, folder, dtype=torch.float32)  # full precision for resuming
        torch.save(
            {
                "step": self.step,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "rng": self.rng.getstate(),
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "history": self.history,
                "adapter": self.adapter.state_dict() if self.adapter is not None else None,
                "tokens": [self.target_tokens, self.supervised_tokens],
            },
            folder / "trainer_state.pt",
        )
        prune_checkpoints(folder.parent, self.cfg.keep_checkpoints)

    def load_checkpoint(self, folder: Path) -> None:
        loaded = load_fuser(folder, KVShape.of(self.draft.config), KVShape.of(self.target.config), device=self.device, dtype=torch.float32)
        self.fuser.load_state_dict(loaded.state_dict())
        state = torch.load(folder / "trainer_state.pt", weights_only=True)
        self.step = state["step"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.rng.setstate(state["rng"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.history = state["history"]
        self.target_tokens, self.supervised_tokens = state.get("tokens", (0, 0))
        if self.adapter is not None:
            if state.get("adapter") is None:
                raise UserInputError(f"{folder} was saved without a draft adapter: resume without --draft_adapter")
            self.adapter.load_state_dict(state["adapter"])

    # ------------------------------------------------------------ the loop

    def train(self, progress: bool = True) -> dict:
        from tqdm import tqdm

        cfg, out, main = self.cfg, Path(self.cfg.output_dir), self.processes.main
        bar = tqdm(total=cfg.steps, initial=self.step, desc="fuser", unit="step", disable=not (progress and main))
        postfix: dict = {}
        started, first = time.perf_counter(), (self.step, self.target_tokens, self.supervised_tokens)
        metrics_file = out / "metrics.jsonl"
        while self.step < cfg.steps:
            postfix["loss"] = f"{self.train_step():.4f}"
            seconds = max(time.perf_counter() - started, 1e-9)
            postfix["sup tok/s"] = f"{(self.supervised_tokens - first[2]) / seconds:,.0f}"
            postfix["target tok/s"] = f"{(self.target_tokens - first[1]) / seconds:,.0f}"
            postfix["peak"] = f"{peak_memory_gb(self.device):.1f}GB"
            if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                if main:
                    figures = self.evaluate()
                    self.history.append(figures)
                    out.mkdir(parents=True, exist_ok=True)
                    with metrics_file.open("a", encoding="utf-8") as f:
                        f.write(json.dumps(self.metrics_line(figures)) + "\n")
                    postfix["agree"] = f"{figures['agreement_fused']:.3f}/{figures['agreement_unfused']:.3f}"
                    postfix["won/lost"] = f"{figures['won']}/{figures['lost']}"
                self.processes.barrier()
            if self.step % cfg.save_every == 0 and self.step < cfg.steps:
                if main:
                    self.save_checkpoint(out / "checkpoints" / f"step_{self.step:06d}")
                self.processes.barrier()
            bar.set_postfix(postfix, refresh=False)
            bar.update(1)
        bar.close()
        return {"seconds": time.perf_counter() - started, "history": self.history,
                "target_tokens": self.target_tokens, "supervised_tokens": self.supervised_tokens}


def prune_checkpoints(folder: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints under `folder` (checkpoints/step_N)."""
    import shutil

    done = sorted(f for f in folder.glob("step_*") if (f / "trainer_state.pt").is_file())
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def find_trained(output_dir: str | Path) -> Path | None:
    """The trained fuser (or adapter-alone config) an output folder already holds, if any."""
    out = Path(output_dir)
    for candidate in (out / "final" / "projector_0.json", out / "config.json"):
        if candidate.is_file():
            return candidate
    return None


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    folders = sorted((Path(output_dir) / "checkpoints").glob("step_*"))
    folders = [f for f in folders if (f / "trainer_state.pt").is_file()]
    return folders[-1] if folders else None


def run_config(cfg: TrainConfig, extra: dict) -> dict:
    """config.json of a trained fuser: C2C's `model.base_model/teacher_model` plus our recipe."""
    return {
        "model": {"base_model": cfg.draft_model, "teacher_model": cfg.target_model},
        "training": asdict(cfg),
        **extra,
    }
