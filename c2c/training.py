"""Training C2C projectors for speculative decoding; both language models stay frozen.

Objective (made for how the demo uses the fuser): a window of text is split into a prefix of m
tokens and a suffix of s tokens, s uniform in 1..gamma+1. The target runs over prefix + suffix; the
draft runs over the prefix, its K/V at every prefix position are fused with the target's (as
prefill and decode fusion leave the cache at decode time), then the draft runs the suffix on its own
unfused K/V, exactly as it does while drafting a round. The loss makes the fused draft's next-token
distribution on the suffix match the target's: KL(p_target || q_draft) or cross-entropy on the
target's greedy tokens. Gradients reach only the projectors, through the draft's attention.

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
import torch.nn.functional as F

from . import cache as kv
from .errors import UserInputError
from .fuser import C2CFuser, KVShape, load_fuser, save_fuser


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
    eval_batches: int = 4
    save_every: int = 200
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    save_dtype: str = "auto"  # auto: bfloat16 when the models run in bf16 (as released fusers), else float32
    generate_from_target: int = 0  # >0: texts are prompts; the target writes this many tokens after each

    def __post_init__(self):
        if self.objective not in ("kl", "ce"):
            raise UserInputError(f"--objective must be kl or ce, got {self.objective!r}")
        if self.seq_len < self.min_prefix + self.gamma + 1:
            raise UserInputError(f"--seq_len {self.seq_len} is too short for min_prefix {self.min_prefix} + gamma+1")
        for name in ("steps", "batch_size", "gamma", "eval_every", "save_every"):
            if getattr(self, name) < 1:
                raise UserInputError(f"--{name} must be >= 1, got {getattr(self, name)}")


# ---------------------------------------------------------------- data


def read_texts(path: str | Path) -> list[str]:
    """Plain text (the whole file is one text) or JSONL with a "text" or "prompt" field per line."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"training data not found: {path}")
    raw = path.read_text(encoding="utf-8")
    if path.suffix != ".jsonl":
        return [raw]
    texts = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserInputError(f"{path}:{n}: not JSON ({e.msg})") from None
        text = record.get("text") or record.get("prompt") if isinstance(record, dict) else record
        if not isinstance(text, str):
            raise UserInputError(f"{path}:{n}: expected an object with a \"text\" or \"prompt\" string")
        texts.append(text)
    if not texts:
        raise UserInputError(f"{path} holds no texts")
    return texts


@torch.no_grad()
def target_generations(target, tokenizer, prompts: list[str], max_new_tokens: int, eos_ids: set[int]) -> list[str]:
    """Each prompt followed by the target's own greedy continuation (training on what the draft will see)."""
    from .engine import standard_generate
    from .prompts import encode_prompt
    from .sampling import SamplingConfig

    texts = []
    for prompt in prompts:
        ids = encode_prompt(tokenizer, prompt)
        out = standard_generate(target, ids, max_new_tokens, SamplingConfig(), eos_ids).output_ids
        texts.append(tokenizer.decode(ids + out))
    return texts


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


def split_heldout(windows: torch.Tensor, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The last `fraction` of the windows (at least one) is held out: training never sees it."""
    n_held = max(1, int(len(windows) * fraction))
    return windows[:-n_held], windows[-n_held:]


# ---------------------------------------------------------------- the objective


def fused_suffix_logits(fuser, target, draft, x: torch.Tensor, m: int, s: int, fuse: bool = True):
    """Target and draft logits for the s suffix tokens after a (fused) prefix of m tokens.

    x (B, L) token ids on the models' device. Returns (target_logits, draft_logits), each (B, s, V):
    position j predicts token m+j+1.
    """
    with torch.no_grad():
        tcache, dcache = kv.new_cache(target), kv.new_cache(draft)
        target_logits = kv.forward(target, x[:, : m + s], tcache, 0)[:, m:]  # (B, s, V)
        kv.forward(draft, x[:, :m], dcache, 0, logits_to_keep=1)
    if fuse:
        for layer in range(kv.num_layers(dcache)):
            if layer not in fuser.layer_map:
                continue
            target_layer, _ = fuser.layer_map[layer]
            fused = fuser.fuse_layer(layer, kv.read_kv(tcache, target_layer, 0, m), kv.read_kv(dcache, layer, 0, m))
            kv.replace_kv(dcache, layer, *fused)
    draft_logits = kv.forward(draft, x[:, m : m + s], dcache, m)  # (B, s, V), through the fused cache
    return target_logits, draft_logits


def loss_fn(target_logits: torch.Tensor, draft_logits: torch.Tensor, objective: str) -> torch.Tensor:
    log_q = draft_logits.float().log_softmax(-1)
    if objective == "ce":
        return F.nll_loss(log_q.flatten(0, 1), target_logits.argmax(-1).flatten())
    log_p = target_logits.float().log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


# ---------------------------------------------------------------- the trainer


class FuserTrainer:
    """Owns the fuser, optimizer, schedule and RNG state; `train()` runs to cfg.steps, resumable."""

    def __init__(self, cfg: TrainConfig, target, draft, windows: torch.Tensor, heldout: torch.Tensor, device):
        self.cfg, self.target, self.draft, self.device = cfg, target, draft, device
        self.windows, self.heldout = windows, heldout
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
        self.optimizer = torch.optim.AdamW(self.fuser.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.rng = random.Random(cfg.seed)  # batch order and split points
        self.step = 0
        self.history: list[dict] = []

    def _lr_factor(self, step: int) -> float:
        warm = self.cfg.warmup_steps
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, self.cfg.steps - warm)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    def _split(self, rng: random.Random) -> tuple[int, int]:
        s = rng.randint(1, self.cfg.gamma + 1)
        m = rng.randint(self.cfg.min_prefix, self.cfg.seq_len - s)
        return m, s

    def train_step(self) -> float:
        cfg = self.cfg
        self.fuser.train()
        for p in self.fuser.projectors:
            p.set_anneal_step(self.step)
        rows = [self.rng.randrange(len(self.windows)) for _ in range(cfg.batch_size)]
        x = self.windows[rows].to(self.device)  # (B, L)
        m, s = self._split(self.rng)
        target_logits, draft_logits = fused_suffix_logits(self.fuser, self.target, self.draft, x, m, s)
        loss = loss_fn(target_logits, draft_logits, cfg.objective)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.fuser.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return loss.item()  # sync: logged once per step

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out top-1 agreement of draft and target on suffix tokens, fused (hard gates) and unfused."""
        self.fuser.eval()
        rng = random.Random(12345)  # the same held-out splits at every evaluation
        agree = {"fused": 0, "unfused": 0}
        total, loss = 0, 0.0
        for i in range(self.cfg.eval_batches):
            rows = [(i * self.cfg.batch_size + j) % len(self.heldout) for j in range(self.cfg.batch_size)]
            x = self.heldout[rows].to(self.device)
            m, s = self._split(rng)
            for name, fuse in (("fused", True), ("unfused", False)):
                t_logits, d_logits = fused_suffix_logits(self.fuser, self.target, self.draft, x, m, s, fuse=fuse)
                agree[name] += (t_logits.argmax(-1) == d_logits.argmax(-1)).sum().item()
                if fuse:
                    loss += loss_fn(t_logits, d_logits, self.cfg.objective).item()
            total += x.shape[0] * s
        open_gates = sum(int(p.key_gate_logit > 0) + int(p.value_gate_logit > 0) for p in self.fuser.projectors)
        return {
            "step": self.step, "heldout_loss": loss / self.cfg.eval_batches,
            "agreement_fused": agree["fused"] / total, "agreement_unfused": agree["unfused"] / total,
            "open_gates": open_gates, "gates": 2 * len(self.fuser.projectors),
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
            },
            folder / "trainer_state.pt",
        )

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

    # ------------------------------------------------------------ the loop

    def train(self, progress: bool = True) -> dict:
        from tqdm import tqdm

        cfg, out = self.cfg, Path(self.cfg.output_dir)
        bar = tqdm(total=cfg.steps, initial=self.step, desc="fuser", unit="step", disable=not progress)
        postfix: dict = {}
        started = time.perf_counter()
        while self.step < cfg.steps:
            postfix["loss"] = f"{self.train_step():.4f}"
            if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                figures = self.evaluate()
                self.history.append(figures)
                postfix["agree"] = f"{figures['agreement_fused']:.3f}/{figures['agreement_unfused']:.3f}"
            if self.step % cfg.save_every == 0 and self.step < cfg.steps:
                self.save_checkpoint(out / "checkpoints" / f"step_{self.step:06d}")
            bar.set_postfix(postfix)
            bar.update(1)
        bar.close()
        return {"seconds": time.perf_counter() - started, "history": self.history}


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
