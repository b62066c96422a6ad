"""The fuser trainer's loop: configuration, steps across processes, held-out figures, checkpoints.

Both language models stay frozen; only the C2C projectors learn (and, optionally, a draft adapter,
`c2c.core.adapter`: not C2C, for when a frozen draft cannot read what the projectors give it; with fusion
off, the adapter alone, the "draft fine-tuned alone" arm of the upper-bound study).

The data (sequences, spans, right-padded batches of distinct rows) live in `c2c.tools.train_data`; the
objective (the fused draft's logits at every supervised position, with the K/V decoding gives the
fuser, and the losses) in `c2c.tools.train_objective`. Objective, `suffixes="all"` (the default): every
position of every sequence's supervised span, in blocks of gamma+1; `suffixes="one"`: one split per
row (the earlier objective). The loss makes the fused draft's next-token distribution match the
target's: KL(p_target || q_draft) or cross-entropy on the target's greedy tokens.

Gates follow C2C: Gumbel-sigmoid with a temperature annealed from initial to final over
`anneal_steps` while training, hard gate (logit > 0) at inference and in the held-out figures. The
gate noise and dropout are drawn per global row from a generator seeded by (seed, step, row)
(`fuser.StepNoise`), so 1 and N processes train the same fuser and a resume repeats the run.

This module knows nothing about argument parsing; `c2c.tools.train_fuser` is its command line.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..core.adapter import KINDS, DraftAdapter
from ..errors import UserInputError
from ..core.effect import projector_effects
from ..core.fuser import C2CFuser, KVShape, StepNoise, count_parameters, load_fuser, save_fuser
from . import engine_eval, train_parallel
from .run_folder import latest_checkpoint, prune_checkpoints, save_run_record  # noqa: F401 (latest_checkpoint re-exported)
from .train_data import SplitData
from .train_objective import DRAFT_KV, all_position_logits, paired_agreement, token_losses
from .train_parallel import MaskEmbedding


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
    draft_kv: str = "decode"  # decode: the fuser gets the draft K/V decoding gives it; plain: a plain pass's (earlier)
    eval_prompts: int = 1000  # held-out prompts the engine decodes at each evaluation, at most (0: no engine figure)
    eval_new_tokens: int = 64  # at most this many new tokens per held-out prompt in the engine figure
    eval_seconds: float = 60.0  # the first evaluation decodes as many prompts as this allows; later ones the same
    length_pool: int = 16  # batches' worth of rows drawn and sorted by length, one of them trained on (1: no bucketing)
    parallel_drafts: int = 0  # K > 0: train parallel drafting of K drafts (a mask embedding, c2c.tools.train_parallel)
    mask_id: int = -1  # parallel drafting's mask id (-1: an id the tokenizer never makes, train_parallel.default_mask_id)
    cod_rate: float = 0.7  # parallel drafting: PARD's conditional drop-token, block j keeps max(rate**j, floor) of its queries (0: off)
    cod_floor: float = 0.2  # the smallest share COD keeps of a mask block

    def __post_init__(self):
        if self.suffixes not in SUFFIXES:
            raise UserInputError(f"--suffixes must be {' or '.join(SUFFIXES)}, got {self.suffixes!r}")
        if self.draft_kv not in DRAFT_KV:
            raise UserInputError(f"--draft_kv must be {' or '.join(DRAFT_KV)}, got {self.draft_kv!r}")
        if self.eval_prompts < 0 or self.eval_new_tokens < 1:
            raise UserInputError(f"--eval_prompts must be >= 0 and --eval_new_tokens >= 1, got {self.eval_prompts} "
                                 f"and {self.eval_new_tokens}")
        if self.gate_noise not in GATE_NOISE:
            raise UserInputError(f"--gate_noise must be {', '.join(GATE_NOISE)}, got {self.gate_noise!r}")
        for name in ("lr", "adapter_lr", "weight_decay", "grad_clip", "dropout", "initial_gate_logit", "heldout_fraction",
                     "eval_seconds"):
            if not math.isfinite(getattr(self, name)):
                raise UserInputError(f"--{name} must be a finite number, got {getattr(self, name)}")
        if self.lr <= 0 or self.adapter_lr < 0:
            raise UserInputError(f"--lr must be > 0 and --adapter_lr >= 0 (0: the same as --lr), got {self.lr} and {self.adapter_lr}")
        if self.eval_seconds <= 0:
            raise UserInputError(f"--eval_seconds must be > 0, got {self.eval_seconds}")
        if not 0 < self.heldout_fraction < 1:
            raise UserInputError(f"--heldout_fraction must be between 0 and 1, got {self.heldout_fraction}")
        if self.keep_checkpoints < 1:
            raise UserInputError(f"--keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        if self.draft_adapter not in ("none", *KINDS):
            raise UserInputError(f"--draft_adapter must be none, {' or '.join(KINDS)}, got {self.draft_adapter!r}")
        if self.mask_id != -1 and not self.parallel_drafts:
            raise UserInputError(f"--mask_id {self.mask_id} is parallel drafting's mask: pass --parallel_drafts K too, "
                                 "or leave --mask_id out")
        if self.parallel_drafts and self.draft_adapter == "none":
            raise UserInputError("--parallel_drafts trains the draft to read masks: also pass --draft_adapter lora (or full); "
                                 "the mask embedding is saved beside it")
        if not self.fusion and self.draft_adapter == "none":
            raise UserInputError("--no-fusion trains the draft adapter alone: also pass --draft_adapter lora or full")
        if self.objective not in ("kl", "ce"):
            raise UserInputError(f"--objective must be kl or ce, got {self.objective!r}")
        if self.threads < 0:
            raise UserInputError(f"--threads must be >= 0 (0: one per physical core), got {self.threads}")
        if self.seq_len < self.min_prefix + self.gamma + 1:
            raise UserInputError(f"--seq_len {self.seq_len} is too short for min_prefix {self.min_prefix} + gamma+1")
        if self.parallel_drafts < 0 or (self.parallel_drafts and self.suffixes != "all"):
            raise UserInputError(f"--parallel_drafts must be >= 0 (0: off) and trains every position (--suffixes all), "
                                 f"got {self.parallel_drafts} with --suffixes {self.suffixes}")
        if not (0 <= self.cod_rate < 1 and 0 < self.cod_floor <= 1):
            raise UserInputError(f"--cod_rate must be in [0, 1) (0: off) and --cod_floor in (0, 1]; got --cod_rate "
                                 f"{self.cod_rate}, --cod_floor {self.cod_floor}")
        if self.parallel_drafts and self.gamma != self.parallel_drafts:
            raise UserInputError(f"--parallel_drafts {self.parallel_drafts} drafts rounds of that many tokens: leave "
                                 f"--gamma out (it follows) or set it to the same value, got --gamma {self.gamma}")
        for name in ("steps", "batch_size", "gamma", "eval_every", "save_every", "eval_tokens", "length_pool"):
            if getattr(self, name) < 1:
                raise UserInputError(f"--{name} must be >= 1, got {getattr(self, name)}")


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

    def total(self, value: torch.Tensor) -> torch.Tensor:
        """`value` summed over the processes (itself when alone)."""
        if self.count > 1:
            value = value.clone()
            torch.distributed.all_reduce(value)
        return value

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
    """Owns the fuser, optimizer, schedule and data order; `train()` runs to cfg.steps, resumable.

    Data-parallel across `processes`: every process draws the same global batch from the same RNG
    and trains on its share of the rows, with the same noise for each row (`StepNoise`); gradients
    are summed, so one command trains the same thing on 1 or N processes (up to float rounding).
    Only the main process evaluates and writes."""

    def __init__(self, cfg: TrainConfig, target, draft, data: SplitData, heldout: SplitData, device,
                 processes: Processes = Processes(), eos_ids: set[int] | None = None, mask_id: int | None = None):
        self.cfg, self.target, self.draft, self.device = cfg, target, draft, device
        self.data, self.heldout, self.processes = data, heldout, processes
        self.batch_rows = min(cfg.batch_size, len(data))  # a batch larger than the data would only repeat rows
        if self.batch_rows < processes.count:
            raise UserInputError(f"--batch_size {cfg.batch_size} is the global batch ({len(data)} training sequences): "
                                 f"it must be at least the number of processes ({processes.count})")
        eos = target.config.eos_token_id
        self.eos_ids = set(eos_ids) if eos_ids is not None else set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
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
        self.noise = StepNoise(cfg.seed, device)
        self.fuser.set_noise(self.noise)
        self.adapter = None
        groups = [{"params": list(self.fuser.parameters())}] if cfg.fusion else []
        if cfg.draft_adapter != "none":
            draft.requires_grad_(False)
            self.adapter = DraftAdapter.create(draft, cfg.draft_adapter, cfg.adapter_rank).to(device)
            self.adapter.attach(draft)
            groups.append({"params": list(self.adapter.parameters()), "lr": cfg.adapter_lr or cfg.lr})
        self.tokenizer = None  # set by the command line: saved beside an exported parallel draft
        self.mask = None  # parallel drafting: the trained mask embedding (c2c.tools.train_parallel)
        if cfg.parallel_drafts:
            draft.requires_grad_(False)
            self.mask = MaskEmbedding(draft, cfg.mask_id if mask_id is None else mask_id).to(device)
            groups.append({"params": list(self.mask.parameters()), "lr": cfg.adapter_lr or cfg.lr, "weight_decay": 0.0})
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.rng = random.Random(cfg.seed)  # batch rows, block offsets and split points
        self.step = 0
        self.history: list[dict] = []
        self.target_tokens = 0  # positions the target has read so far (padding included), all processes
        self.padding_tokens = 0  # of which padding
        self.supervised_tokens = 0  # positions a loss was taken on so far, all processes
        self.batches: list[tuple[int, int]] = []  # (distinct rows, rows) of each step since the last evaluation
        self.engine_plain: engine_eval.Counts | None = None  # the plain draft's per-prompt counts, measured once
        self.trained = [p for g in self.optimizer.param_groups for p in g["params"]]

    def _lr_factor(self, step: int) -> float:
        warm = self.cfg.warmup_steps
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, self.cfg.steps - warm)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    def warnings(self) -> list[str]:
        """What about this configuration will waste the run, each with its fix (printed before step 1)."""
        cfg, out = self.cfg, []
        if self.batch_rows < cfg.batch_size:
            out.append(f"--batch_size {cfg.batch_size} is larger than the {len(self.data)} training sequences: each batch "
                       f"holds all {self.batch_rows} of them (capped); give more data for varied batches")
        held = self.heldout.supervised_positions
        if held < cfg.eval_tokens:
            out.append(f"the held-out sequences hold {held:,} supervised positions, fewer than --eval_tokens "
                       f"{cfg.eval_tokens:,}: the held-out figure scores them all, once; for a steadier figure raise "
                       f"--heldout_fraction or give more data")
        if cfg.warmup_steps >= cfg.steps:
            out.append(f"--warmup_steps {cfg.warmup_steps} is not shorter than --steps {cfg.steps}: the learning rate "
                       f"never reaches --lr (it peaks at {cfg.lr * cfg.steps / cfg.warmup_steps:.2g}); lower "
                       f"--warmup_steps (about a tenth of --steps) or train longer")
        return out

    def train_step(self) -> float:
        cfg = self.cfg
        self.fuser.train()
        for p in self.fuser.projectors:
            p.set_anneal_step(self.step)
        grad = self.adapter is not None
        draw = self.data.sample_blocks if cfg.suffixes == "all" else self.data.sample
        batch = draw(self.rng, self.batch_rows, cfg.length_pool)
        mine = batch.share(self.processes.rank, self.processes.count)
        self.noise.begin(self.step, list(range(len(batch.rows)))[self.processes.rank :: self.processes.count], mine.lengths)
        total = int(batch.supervised.sum())  # every process's rows: the loss is a mean over the global batch
        if self.mask is not None:  # parallel drafting: every offset of every supervised anchor (COD: a thinned share)
            queries = train_parallel.cod_queries(batch.x.shape[1], cfg.parallel_drafts, cfg.cod_rate, cfg.cod_floor,
                                                 (cfg.seed, self.step))
            keep = train_parallel.supervised_blocks(batch.supervised, cfg.parallel_drafts)
            total = int((keep if queries is None else keep[:, queries]).sum())
            queries = train_parallel.narrowed(queries, batch.x.shape[1], mine.x.shape[1])  # this process's share
            loss = train_parallel.step_loss(self, mine, total, queries)
        else:
            target_logits, draft_logits = all_position_logits(self.fuser, self.target, self.draft, mine.x.to(self.device),
                                                              mine.starts, fuse=cfg.fusion, draft_grad=grad, draft_kv=cfg.draft_kv)
            mask = mine.supervised.to(self.device)
            loss = token_losses(target_logits[mask], draft_logits[mask], cfg.objective).sum() / total
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.processes.sum_gradients(self.trained)
        torch.nn.utils.clip_grad_norm_(self.trained, cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        self.target_tokens += batch.x.numel()
        self.padding_tokens += batch.padding
        self.supervised_tokens += total
        self.batches.append((batch.distinct, len(batch.rows)))
        # each process holds its share of the global batch's mean: the whole loss is their sum
        return self.processes.total(loss.detach()).item()  # sync: logged once per step

    @torch.no_grad()
    def evaluate(self) -> dict:
        cfg = self.cfg
        self.fuser.eval()
        # the main process evaluates alone: batches of one process's share, so it holds what a step holds
        rows = max(1, self.batch_rows // self.processes.count)
        figures = paired_agreement(self.fuser, self.target, self.draft, self.heldout, cfg.eval_tokens, rows,
                                   cfg.objective, self.device, self.adapter, cfg.fusion, cfg.draft_kv)
        if cfg.fusion:
            figures["projector_effects"] = self.effects()
        if cfg.eval_prompts and cfg.fusion:
            figures |= self.engine()
        if self.mask is not None:  # per offset, and the parallel round in the engine (the chain figure's prompts)
            figures |= train_parallel.offset_agreement(self, self.heldout.evaluation(cfg.eval_tokens, rows))
            if cfg.eval_prompts:
                count = len(self.engine_plain) if self.engine_plain is not None else min(cfg.eval_prompts, 16)
                figures |= train_parallel.engine_figures(self, self.heldout.prompts(count))
        return {"step": self.step, **figures, "target_tokens": self.target_tokens,
                "supervised_tokens": self.supervised_tokens}

    def effects(self) -> list[float]:
        """How much each projector changes the draft's K/V (relative, hard gates) on the first held-out sequence."""
        ids = self.heldout.rows[0][:256].view(1, -1).to(self.device)  # (1, N)
        return projector_effects(self.fuser, self.target, self.draft, ids)

    def engine(self) -> dict:
        """The engine figures (engine_eval): the first call decodes as many held-out prompts as
        --eval_seconds allow, fused and plain; later calls the same prompts, fused (the plain draft's
        counts never change while only the fuser trains)."""
        cfg = self.cfg
        args = (self.target, self.draft)
        if self.engine_plain is None:
            prompts = self.heldout.prompts(cfg.eval_prompts)
            fused, self.engine_plain = engine_eval.first_counts(self.fuser, *args, prompts, cfg.gamma, cfg.eval_new_tokens,
                                                                self.eos_ids, cfg.eval_seconds, self.adapter)
        else:
            prompts = self.heldout.prompts(len(self.engine_plain))
            fused = engine_eval.decode_counts(self.fuser, *args, prompts, cfg.gamma, cfg.eval_new_tokens, self.eos_ids,
                                              self.adapter)
        return engine_eval.figures(fused, self.engine_plain)

    def checkpoint_bytes(self) -> int:
        """Disk a checkpoint takes (float32 weights and AdamW's two moments of every trained parameter,
        the fuser saved once more in float32 as the final fuser, at most), to check the space before step 1."""
        trained = sum(p.numel() for p in self.trained)
        return 4 * (3 * trained + count_parameters(self.fuser)) + (1 << 20)  # + 1 MB of small files

    def metrics_line(self, figures: dict) -> dict:
        """One line of metrics.jsonl; the batch figures cover the steps since the previous line."""
        distinct = [d for d, _ in self.batches] or [0]
        return {
            "step": figures["step"], "heldout_agreement_fused": figures["agreement_fused"],
            "heldout_agreement_unfused": figures["agreement_unfused"], "won": figures["won"], "lost": figures["lost"],
            "heldout_tokens": figures["heldout_tokens"], "heldout_sequences": figures["heldout_sequences"],
            "tokens_per_call_fused": figures.get("tokens_per_call_fused"),
            "tokens_per_call_unfused": figures.get("tokens_per_call_unfused"),
            "engine_prompts": figures.get("engine_prompts", 0),
            **{k: figures.get(k) for k in ("engine_wins", "engine_losses", "engine_ratio", "engine_ratio_low",
                                           "engine_ratio_high")},
            "projector_effects": figures.get("projector_effects"),
            "target_tokens": self.target_tokens, "supervised_tokens": self.supervised_tokens,
            "padding_share": self.padding_tokens / self.target_tokens if self.target_tokens else 0.0,
            "distinct_rows_min": min(distinct), "distinct_rows_mean": sum(distinct) / len(distinct),
            "batch_rows": self.cfg.batch_size, "processes": self.processes.count,
            "lr": self.scheduler.get_last_lr()[0], "open_gates": figures["open_gates"], "gates": figures["gates"],
        } | {k: v for k, v in figures.items() if k.startswith("parallel_")}

    # ------------------------------------------------------------ checkpoints

    def save_checkpoint(self, folder: Path) -> None:
        """Everything a resumed run needs to continue exactly (the noise is a function of seed and step)."""
        save_fuser(self.fuser, folder, dtype=torch.float32)  # full precision for resuming
        torch.save(
            {
                "step": self.step,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "rng": self.rng.getstate(),
                "history": self.history,
                "adapter": self.adapter.state_dict() if self.adapter is not None else None,
                "mask": self.mask.state_dict() if self.mask is not None else None,
                "tokens": [self.target_tokens, self.supervised_tokens, self.padding_tokens],
            },
            folder / "trainer_state.pt",
        )
        save_run_record(folder, self.cfg, self.step)  # last: a checkpoint without it is not found complete
        prune_checkpoints(folder.parent, self.cfg.keep_checkpoints)

    def load_checkpoint(self, folder: Path) -> None:
        loaded = load_fuser(folder, KVShape.of(self.draft.config), KVShape.of(self.target.config), device=self.device, dtype=torch.float32)
        self.fuser.load_state_dict(loaded.state_dict())
        state = torch.load(folder / "trainer_state.pt", weights_only=True)
        self.step = state["step"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.rng.setstate(state["rng"])
        self.history = state["history"]
        tokens = list(state.get("tokens", ())) + [0, 0, 0]
        self.target_tokens, self.supervised_tokens, self.padding_tokens = tokens[:3]
        if self.adapter is not None:
            if state.get("adapter") is None:
                raise UserInputError(f"{folder} was saved without a draft adapter: resume without --draft_adapter")
            self.adapter.load_state_dict(state["adapter"])
        if self.mask is not None:
            if state.get("mask") is None:
                raise UserInputError(f"{folder} was saved without parallel drafting: resume without --parallel_drafts")
            self.mask.load_state_dict(state["mask"])

    # ------------------------------------------------------------ the loop

    def train(self, progress: bool = True) -> dict:
        from tqdm import tqdm

        cfg, out, main = self.cfg, Path(self.cfg.output_dir), self.processes.main
        bar = tqdm(total=cfg.steps, initial=self.step, desc="fuser", unit="step", disable=not (progress and main))
        postfix: dict = {}
        started, first = time.perf_counter(), (self.step, self.target_tokens, self.supervised_tokens)
        if main:
            keep_metrics(out / "metrics.jsonl", self.step)  # a resumed run writes each later step once
        while self.step < cfg.steps:
            postfix["loss"] = f"{self.train_step():.4f}"
            seconds = max(time.perf_counter() - started, 1e-9)
            postfix["sup tok/s"] = f"{(self.supervised_tokens - first[2]) / seconds:,.0f}"
            postfix["target tok/s"] = f"{(self.target_tokens - first[1]) / seconds:,.0f}"
            postfix["rows"] = f"{self.batches[-1][0]}/{self.batches[-1][1]}"
            postfix["pad"] = f"{self.padding_tokens / max(self.target_tokens, 1):.0%}"
            postfix["peak"] = f"{peak_memory_gb(self.device):.1f}GB"
            if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                if main:
                    figures = self.evaluate()
                    self.history.append(figures)
                    out.mkdir(parents=True, exist_ok=True)
                    with (out / "metrics.jsonl").open("a", encoding="utf-8") as f:
                        f.write(json.dumps(self.metrics_line(figures)) + "\n")
                    postfix["agree"] = f"{figures['agreement_fused']:.3f}/{figures['agreement_unfused']:.3f}"
                    postfix["won/lost"] = f"{figures['won']}/{figures['lost']}"
                    if figures.get("parallel_agreement_fused"):
                        postfix["par"] = "/".join(f"{a:.2f}" for a in figures["parallel_agreement_fused"] if a is not None)
                    if "tokens_per_call_fused" in figures:
                        postfix["tok/call"] = f"{figures['tokens_per_call_fused']:.2f}/{figures['tokens_per_call_unfused']:.2f}"
                self.batches.clear()
                self.processes.barrier()
            if self.step % cfg.save_every == 0 or self.step == cfg.steps:  # the last step too: a run extends from its end
                if main:
                    self.save_checkpoint(out / "checkpoints" / f"step_{self.step:06d}")
                self.processes.barrier()
            bar.set_postfix(postfix, refresh=False)
            bar.update(1)
        bar.close()
        return {"seconds": time.perf_counter() - started, "history": self.history,
                "target_tokens": self.target_tokens, "supervised_tokens": self.supervised_tokens,
                "padding_tokens": self.padding_tokens}


def keep_metrics(path: Path, step: int) -> None:
    """Drop the lines of metrics.jsonl after `step` (written after the checkpoint a run resumes from;
    all of them for a run from step 0), and any line a killed process left half-written."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    if len(kept) != len(lines):
        path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def run_config(cfg: TrainConfig, extra: dict) -> dict:
    """config.json of a trained fuser: C2C's `model.base_model/teacher_model` plus our recipe."""
    return {
        "model": {"base_model": cfg.draft_model, "teacher_model": cfg.target_model},
        "training": asdict(cfg),
        **extra,
    }
