"""C2C Fuser: projectors that write the target's K/V into the draft's KV cache.

Compatible with the officially released Cache-to-Cache checkpoints (arXiv 2510.03215, Hub repo
`nics-efc/C2C_Fuser`). C2C's words appear only at this checkpoint boundary: its "receiver" is our
draft, its "sharer" is our target. One `C2CProjector` per draft layer; projector i writes draft
layer i from the target layer given by the layer map.

Checkpoint layout of a fuser folder (`<pair>/final/`):
  projector_{i}.pt      torch.save of the projector's state dict
  projector_{i}.json    {"class": "C2CProjector", "init_args": {...}}
  projector_config.json {"0": {"1": {"<draft_layer>": [[<target_layer>, <projector_idx>]]}}}

This module knows nothing about models or generation: it maps K/V tensors to K/V tensors.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserInputError, clip
from .cache import kv_heads_and_dim, text_config

PROJECTOR_CLASS = "C2CProjector"


class FuserError(UserInputError):
    """A fuser checkpoint that is missing, malformed or does not fit the models."""


class ResidualBlock(nn.Module):
    """Pre-norm residual MLP: z + w2(GELU(w1(RMSNorm(z))))."""

    def __init__(self, dim: int, inner: int, dropout: float):
        super().__init__()
        self.norm = nn.RMSNorm(dim, eps=1e-6)  # torch's own, as C2C: in bf16 it rounds once
        self.w1 = nn.Linear(dim, inner, bias=False)
        self.w2 = nn.Linear(inner, dim, bias=False)
        self.dropout = nn.Dropout(dropout)

    noise = None  # a StepNoise while the trainer runs (dropout drawn per global row); None: torch's own dropout

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        y = self.w2(F.gelu(self.w1(self.norm(z))))  # (B, N, dim)
        p = self.dropout.p
        if self.training and self.noise is not None and p > 0:
            return z + y * (self.noise.rand(y.shape, seq_dim=1) >= p) / (1 - p)
        return z + self.dropout(y)


class ResidualMLP(nn.Module):
    def __init__(self, dim: int, inner: int, depth: int, dropout: float):
        super().__init__()
        self.blocks = nn.ModuleList(ResidualBlock(dim, inner, dropout) for _ in range(depth))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            z = block(z)
        return z


def _dtype_from_json(value) -> torch.dtype:
    if isinstance(value, dict):
        value = value.get("value")
    if isinstance(value, str):
        name = value.removeprefix("torch.")
        dtype = getattr(torch, name, None)
        if isinstance(dtype, torch.dtype):
            return dtype
    raise FuserError(f"unknown dtype {value!r} in projector init_args")


class C2CProjector(nn.Module):
    """Projects target K (or V) into the draft's head layout and adds it, gated, to the draft's own.

    Parameter names and shapes follow the released checkpoints exactly (33 entries when
    num_layers=3): `key_*` and `value_*` are two fully separate copies of the same path.
    """

    def __init__(
        self,
        source_dim: int,
        target_dim: int,
        source_num_heads: int = 1,
        target_num_heads: int = 1,
        hidden_dim: int = 1024,
        intermediate_dim: int = 1024,
        num_layers: int = 3,
        dropout: float = 0.1,
        initial_temperature: float = 1.0,
        final_temperature: float = 0.001,
        anneal_steps: int = 1929,
        dtype: torch.dtype | dict | str = torch.float32,
        zero_init: bool = False,
    ):
        """Defaults as C2C's: a checkpoint json without `dtype` means float32, without head counts 1;
        an argument C2C does not know is an error (TypeError, reported by `load_fuser`)."""
        super().__init__()
        if num_layers < 3:
            raise FuserError(f"C2CProjector needs num_layers >= 3, got {num_layers}")
        self.init_args = dict(
            source_dim=source_dim, target_dim=target_dim, source_num_heads=source_num_heads,
            target_num_heads=target_num_heads, hidden_dim=hidden_dim, intermediate_dim=intermediate_dim,
            num_layers=num_layers, dropout=dropout, initial_temperature=initial_temperature,
            final_temperature=final_temperature, anneal_steps=anneal_steps,
            dtype=dtype if isinstance(dtype, torch.dtype) else _dtype_from_json(dtype), zero_init=zero_init,
        )
        self.source_dim, self.target_dim = source_dim, target_dim
        self.source_num_heads, self.target_num_heads = source_num_heads, target_num_heads
        self.initial_temperature, self.final_temperature = initial_temperature, final_temperature
        self.anneal_steps = anneal_steps
        a, b = source_num_heads * source_dim, target_num_heads * target_dim
        for kind in ("key", "value"):
            setattr(self, f"{kind}_gate_logit", nn.Parameter(torch.zeros(())))
            setattr(self, f"{kind}_in", nn.Linear(a + b, hidden_dim))
            setattr(self, f"{kind}_mlp1", ResidualMLP(hidden_dim, intermediate_dim, 1, dropout))
            setattr(self, f"{kind}_scalar_mlp2", ResidualMLP(hidden_dim, hidden_dim, 1, dropout))
            setattr(self, f"{kind}_scalar_head", nn.Linear(hidden_dim, target_num_heads))
            setattr(self, f"{kind}_proj_mlp2", ResidualMLP(hidden_dim, intermediate_dim, num_layers - 2, dropout))
            setattr(self, f"{kind}_proj_out", nn.Linear(hidden_dim, b))
            if zero_init:
                nn.init.zeros_(getattr(self, f"{kind}_proj_out").weight)
                nn.init.zeros_(getattr(self, f"{kind}_proj_out").bias)
        self.register_buffer("gate_temperature", torch.tensor(float(initial_temperature)), persistent=True)

    gate_noise = "gumbel"  # training noise of the gates: "gumbel" (C2C's), "logistic" or "none"; not saved
    noise = None  # a StepNoise while the trainer runs (gate noise drawn per global row); None: torch's generator

    def gate(self, kind: str, shape: torch.Size | tuple = ()) -> torch.Tensor:
        """Hard gate at inference (1 if logit > 0, a scalar); in training a Gumbel-sigmoid with the
        current temperature, its noise drawn per element of `shape` (batch, head, token, 1) as C2C does.

        Noise: "gumbel" adds one Gumbel(0, 1) sample, -log(-log u), as C2C's code does; "logistic"
        adds the difference of two (a logistic sample, symmetric around 0: what our shipped presets
        were trained with); "none" adds nothing (deterministic, for tests across process counts)."""
        logit = getattr(self, f"{kind}_gate_logit")
        if not self.training:  # float32 and 4-d as C2C's: g * alpha * P is then computed in float32
            return (logit > 0).float().view(1, 1, 1, 1)
        if self.gate_noise == "none":
            return torch.sigmoid(logit / self.gate_temperature).expand(shape)
        if self.noise is not None:  # shape (B, H, N, 1): the sequence on dim 2
            u = self.noise.rand(shape, seq_dim=2).to(logit.dtype).clamp(1e-6, 1 - 1e-6)
        else:
            u = torch.rand(shape, device=logit.device, dtype=logit.dtype).clamp(1e-6, 1 - 1e-6)
        noise = -torch.log(-torch.log(u)) if self.gate_noise == "gumbel" else torch.log(u) - torch.log1p(-u)
        return torch.sigmoid((logit + noise) / self.gate_temperature)

    def set_anneal_step(self, step: int) -> None:
        """Exponential anneal of the Gumbel temperature from initial to final over anneal_steps."""
        frac = min(step / max(self.anneal_steps, 1), 1.0)
        t = self.initial_temperature * (self.final_temperature / self.initial_temperature) ** frac
        self.gate_temperature.fill_(t)

    def _project(self, kind: str, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """source (B, Hs, N, Ds), target (B, Ht, N, Dt) -> fused target (B, Ht, N, Dt)."""
        B, Ht, N, Dt = target.shape
        dtype = getattr(self, f"{kind}_in").weight.dtype
        # 1-2. flatten heads head-major and concatenate, sharer (target model) first
        s = source.permute(0, 2, 1, 3).reshape(B, N, -1)  # (B, N, a)
        t = target.permute(0, 2, 1, 3).reshape(B, N, -1)  # (B, N, b)
        x = torch.cat([s, t], dim=-1).to(dtype)  # (B, N, a+b)
        # 3. shared trunk
        h = getattr(self, f"{kind}_mlp1")(getattr(self, f"{kind}_in")(x))  # (B, N, H)
        # 4. projection
        p = getattr(self, f"{kind}_proj_out")(getattr(self, f"{kind}_proj_mlp2")(h))  # (B, N, b)
        p = p.view(B, N, Ht, Dt).permute(0, 2, 1, 3)  # (B, Ht, N, Dt)
        # 5. per (token, head) weight
        w = torch.sigmoid(getattr(self, f"{kind}_scalar_head")(getattr(self, f"{kind}_scalar_mlp2")(h)))  # (B, N, Ht)
        w = w.permute(0, 2, 1).unsqueeze(-1)  # (B, Ht, N, 1)
        # 6-7. gated residual, summed in float32
        g = self.gate(kind, w.shape)  # (1, 1, 1, 1) float32 at inference, (B, Ht, N, 1) in training
        return target + g * w * p  # float32 when g is: the sum is rounded once, by the caller

    def forward(self, source_k, source_v, target_k, target_v) -> tuple[torch.Tensor, torch.Tensor]:
        k = self._project("key", source_k, target_k).to(target_k.dtype)
        v = self._project("value", source_v, target_v).to(target_v.dtype)
        return k, v


class StepNoise:
    """The trainer's randomness in the projectors (gate noise, dropout), the same numbers however a
    global batch is shared out: each row's noise comes from a generator seeded by (seed, step, the
    row's place in the global batch, the draw's number in the step), over the row's own length, so
    every process draws only its own rows and 1 and N processes train the same fuser with noise on;
    a resumed run needs no random-generator state."""

    def __init__(self, seed: int, device):
        self.seed, self.device = seed, torch.device(device)
        self.generator = torch.Generator(device=self.device)
        self.rows: list[int] | None = None
        self.lengths: list[int] = []
        self.step = self.draws = 0

    def begin(self, step: int, rows: list[int], lengths: list[int]) -> None:
        """Before a step: this process holds rows `rows` (places in the global batch) of `lengths` tokens."""
        self.step, self.rows, self.lengths, self.draws = step, list(rows), list(lengths), 0

    def rand(self, shape: torch.Size | tuple, seq_dim: int) -> torch.Tensor:
        """Uniform [0, 1) noise of `shape` (rows first, the sequence on `seq_dim`), float32; 0 past each
        row's length (padding). Torch's own generator outside a step (`begin` not called yet)."""
        if self.rows is None:
            return torch.rand(shape, device=self.device)
        self.draws += 1
        out = torch.zeros(shape, device=self.device)
        for b, (row, length) in enumerate(zip(self.rows, self.lengths)):
            seed = (((self.seed * 1_000_003 + self.step) * 1_000_033 + row) * 1_009 + self.draws) % 2**63
            self.generator.manual_seed(seed)
            part = list(shape[1:])
            part[seq_dim - 1] = min(length, shape[seq_dim])
            out[b].narrow(seq_dim - 1, 0, part[seq_dim - 1]).copy_(torch.rand(part, generator=self.generator, device=self.device))
        return out


@dataclass(frozen=True)
class KVShape:
    """The KV layout of one model: what a fuser must fit."""

    num_layers: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, config) -> "KVShape":
        heads, head_dim = kv_heads_and_dim(config)  # the attention's shape as the cache reads it, any architecture
        return cls(text_config(config).num_hidden_layers, heads, head_dim)

    def describe(self) -> str:
        return f"{self.num_layers} layers x {self.num_kv_heads} KV heads x head_dim {self.head_dim}"


def last_aligned_map(draft_layers: int, target_layers: int) -> dict[int, int]:
    """C2C's "last_aligned" map: draft layer t reads target layer clamp(S - T + t, 0, S - 1)."""
    S, T = target_layers, draft_layers
    return {t: min(max(S - T + t, 0), S - 1) for t in range(T)}


class C2CFuser(nn.Module):
    """All projectors of one draft/target pair plus the layer map (draft layer -> (target layer, projector))."""

    def __init__(self, projectors: list[C2CProjector], layer_map: dict[int, tuple[int, int]]):
        super().__init__()
        self.projectors = nn.ModuleList(projectors)
        self.layer_map = dict(sorted(layer_map.items()))

    @classmethod
    def create(cls, draft: KVShape, target: KVShape, **projector_args) -> "C2CFuser":
        """A new, randomly initialised fuser for a pair, one projector per draft layer, last-aligned map."""
        projectors = [
            C2CProjector(target.head_dim, draft.head_dim, target.num_kv_heads, draft.num_kv_heads, **projector_args)
            for _ in range(draft.num_layers)
        ]
        layer_map = {t: (s, t) for t, s in last_aligned_map(draft.num_layers, target.num_layers).items()}
        return cls(projectors, layer_map)

    def check_fits(self, draft: KVShape, target: KVShape) -> None:
        """Raise FuserError naming both shapes when this fuser cannot serve the pair."""
        problems = []
        for t, (s, idx) in self.layer_map.items():
            if not 0 <= t < draft.num_layers:
                problems.append(f"maps draft layer {t} but the draft has {draft.num_layers} layers")
            if not 0 <= s < target.num_layers:
                problems.append(f"reads target layer {s} but the target has {target.num_layers} layers")
            if not 0 <= idx < len(self.projectors):
                problems.append(f"uses projector {idx} but only {len(self.projectors)} exist")
        for i, p in enumerate(self.projectors):
            want = (target.num_kv_heads, target.head_dim, draft.num_kv_heads, draft.head_dim)
            got = (p.source_num_heads, p.source_dim, p.target_num_heads, p.target_dim)
            if got != want:
                problems.append(
                    f"projector {i} maps {got[0]} heads x {got[1]} -> {got[2]} heads x {got[3]}, "
                    f"the models need {want[0]} x {want[1]} -> {want[2]} x {want[3]}"
                )
                break
        if problems:
            raise FuserError(
                f"fuser does not fit the models (draft: {draft.describe()}; target: {target.describe()}): "
                + "; ".join(problems[:3])
                + ". Use a fuser trained for this draft/target pair, or --fuser_checkpoint none."
            )

    def set_noise(self, noise: StepNoise | None) -> None:
        """Where the projectors' training noise comes from (None: torch's default generator)."""
        for module in self.modules():
            if isinstance(module, (C2CProjector, ResidualBlock)):
                module.noise = noise

    def open_gates(self) -> tuple[int, int]:
        """(open, total) hard gates, K and V of every projector the map uses: an untrained or badly
        trained fuser has none open and changes nothing (C2C's gate opens only above logit 0)."""
        used = {idx for _, idx in self.layer_map.values()}
        logits = [g for i in sorted(used) for g in (self.projectors[i].key_gate_logit, self.projectors[i].value_gate_logit)]
        return sum(int(g > 0) for g in logits), len(logits)

    def fuse_layer(self, draft_layer: int, target_kv, draft_kv) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Fused (K, V) for one draft layer, or None when the map leaves that layer alone."""
        if draft_layer not in self.layer_map:
            return None
        _, idx = self.layer_map[draft_layer]
        proj = self.projectors[idx]
        device = proj.key_in.weight.device
        sk, sv = (x.to(device, non_blocking=True) for x in target_kv)
        return proj(sk, sv, *draft_kv)

    # The fusion interface the engine uses, served by this class (per layer: the reference, and what
    # training uses) and by StackedProjectors (every layer at once).

    @property
    def draft_layers(self) -> tuple[int, ...]:
        return tuple(self.layer_map)

    @property
    def target_layers(self) -> tuple[int, ...]:
        return tuple(s for s, _ in self.layer_map.values())

    def fuse_layers(self, target_k, target_v, draft_k, draft_v) -> tuple[torch.Tensor, torch.Tensor]:
        """Fused K and V of every mapped draft layer, layer by layer. Inputs are stacked over the map's
        layers in `draft_layers` order: target K/V (n, B, Hs, N, Ds) and the draft's own (n, B, Hd, N, Dd)."""
        fused = [self.fuse_layer(t, (target_k[i], target_v[i]), (draft_k[i], draft_v[i]))
                 for i, t in enumerate(self.draft_layers)]
        return torch.stack([k for k, _ in fused]), torch.stack([v for _, v in fused])

    def batched(self) -> "C2CFuser | StackedProjectors":
        """What inference should fuse with: the projectors stacked across layers (StackedProjectors,
        built once; the projectors' parameters become views of the stacks, so the weights stay in
        memory once) when they can be, else this fuser itself (per layer).

        They can be when the fuser is in eval mode without gradients (training keeps the per-layer
        path: its gate noise, dropout and optimizer work per projector), every projector has the same
        shapes, and each mapped draft layer has its own projector (C2C's layout)."""
        if self.training or any(p.requires_grad for p in self.parameters()):
            return self
        pack = self.__dict__.get("_stacked")
        if pack is not None and pack.is_current(self):
            return pack
        if not StackedProjectors.can_stack(self):
            return self
        pack = StackedProjectors(self)
        self.__dict__["_stacked"] = pack  # not a submodule: state_dict, .to() and parameter counts unchanged
        return pack


def _owner(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The submodule holding parameter `name` ("key_in.weight") and its attribute name."""
    path, _, attr = name.rpartition(".")
    return (module.get_submodule(path) if path else module), attr


class StackedProjectors:
    """The mapped projectors' weights stacked per parameter across layers, K and V paths as one batch:
    entry j < n is the key path of draft layer `draft_layers[j]`, entry n + j its value path.

    A fusion call of any number of layers then runs 7 + 2 (num_layers - 2) batched matrix products
    (9 for C2C's num_layers 3) instead of 18 per layer. Each stack keeps nn.Linear's (out, in)
    storage and is used through a transposed view; the projectors' own parameters are re-pointed at
    slices of the stacks, so the fuser's weights are held once and `save_fuser` writes the same files.
    Numerics follow C2CProjector step by step: bf16 results equal the per-layer path's bit for bit
    on CPU (tested), float32 within rounding of the reduction order (1e-6)."""

    def __init__(self, fuser: C2CFuser):
        self.draft_layers = fuser.draft_layers
        self.target_layers = fuser.target_layers
        projectors = [fuser.projectors[idx] for _, idx in fuser.layer_map.values()]
        first = projectors[0]
        self.depth = first.init_args["num_layers"] - 2  # residual blocks of the projection path
        self.eps = first.key_mlp1.blocks[0].norm.eps
        self.target_heads, self.target_dim = first.target_num_heads, first.target_dim
        self.stacks: dict[str, torch.Tensor] = {}
        names = [n.removeprefix("key_") for n, _ in first.named_parameters() if n.startswith("key_")]
        # (module, attribute, address): where each parameter lives now, looked up again by is_current
        self._views: list[tuple[nn.Module, str, int]] = []
        for name in names:
            owners = [_owner(p, f"{kind}_{name}") for kind in ("key", "value") for p in projectors]
            params = [getattr(module, attr) for module, attr in owners]
            with torch.no_grad():
                stack = torch.stack([q.detach() for q in params])
            if not torch.compiler.is_compiling():
                torch._dynamo.mark_static_address(stack)  # fixed addresses: CUDA graphs read them in place
            for i, (q, (module, attr)) in enumerate(zip(params, owners)):
                q.data = stack[i]
                self._views.append((module, attr, stack[i].data_ptr()))
            self.stacks[name] = stack

    @staticmethod
    def can_stack(fuser: C2CFuser) -> bool:
        used = [idx for _, idx in fuser.layer_map.values()]
        if not used or len(set(used)) != len(used):
            return False
        shapes = {tuple((n, tuple(q.shape), q.dtype, q.device) for n, q in fuser.projectors[i].named_parameters()) for i in used}
        return len(shapes) == 1

    def is_current(self, fuser: C2CFuser) -> bool:
        """False when a parameter the fuser holds now no longer points into the stacks: moved (`.to`),
        converted, replaced by a new Parameter or loaded with `load_state_dict(..., assign=True)`."""
        return (self.draft_layers == fuser.draft_layers and self.target_layers == fuser.target_layers
                and all(getattr(module, attr).data_ptr() == ptr for module, attr, ptr in self._views))

    def _linear(self, name: str, x: torch.Tensor, bias: bool = True) -> torch.Tensor:
        weight = self.stacks[f"{name}.weight"].transpose(1, 2)  # (P, in, out), a view
        if bias:
            return torch.baddbmm(self.stacks[f"{name}.bias"].unsqueeze(1), x, weight)
        return torch.bmm(x, weight)

    def _block(self, name: str, z: torch.Tensor) -> torch.Tensor:
        """z + w2(GELU(w1(RMSNorm(z)))) for every entry at once. The norm in float32 with one rounding,
        as torch's fused RMSNorm computes it (so bf16 matches it bit for bit)."""
        zf = z.float()
        normed = zf * torch.rsqrt(zf.pow(2).mean(-1, keepdim=True) + self.eps)
        normed = (normed * self.stacks[f"{name}.norm.weight"].float().unsqueeze(1)).to(z.dtype)
        return z + self._linear(f"{name}.w2", F.gelu(self._linear(f"{name}.w1", normed, bias=False)), bias=False)

    def fuse_layers(self, target_k, target_v, draft_k, draft_v) -> tuple[torch.Tensor, torch.Tensor]:
        """As C2CFuser.fuse_layers: target K/V (n, B, Hs, N, Ds), the draft's (n, B, Hd, N, Dd) ->
        fused draft K and V (n, B, Hd, N, Dd), every layer and both paths in one batch."""
        n, B, _, N, _ = target_k.shape
        dtype = self.stacks["in.weight"].dtype
        device = self.stacks["in.weight"].device
        src = torch.cat([target_k, target_v]).to(device, non_blocking=True)  # (P, B, Hs, N, Ds)
        dst = torch.cat([draft_k, draft_v])  # (P, B, Hd, N, Dd)
        P = 2 * n
        s = src.permute(0, 1, 3, 2, 4).reshape(P, B * N, -1)  # heads flattened head-major
        t = dst.permute(0, 1, 3, 2, 4).reshape(P, B * N, -1)
        x = torch.cat([s, t], dim=-1).to(dtype)  # (P, M, a+b), sharer first
        h = self._block("mlp1.blocks.0", self._linear("in", x))  # (P, M, H)
        w = self._block("scalar_mlp2.blocks.0", h)
        w = torch.sigmoid(self._linear("scalar_head", w))  # (P, M, Ht)
        p = h
        for j in range(self.depth):
            p = self._block(f"proj_mlp2.blocks.{j}", p)
        p = self._linear("proj_out", p)  # (P, M, b)
        p = p.view(P, B, N, self.target_heads, self.target_dim).permute(0, 1, 3, 2, 4)  # (P, B, Hd, N, Dd)
        w = w.view(P, B, N, self.target_heads).permute(0, 1, 3, 2).unsqueeze(-1)  # (P, B, Hd, N, 1)
        g = (self.stacks["gate_logit"] > 0).float().view(P, 1, 1, 1, 1)  # the hard gates, float32 as C2C's
        out = (dst + g * w * p).to(dst.dtype)  # summed in float32, rounded once
        return out[:n], out[n:]


# ---------------------------------------------------------------- official layout on disk


def _projector_json(p: C2CProjector, dtype: torch.dtype) -> dict:
    args = dict(p.init_args)
    args["dtype"] = {"__type__": "torch.dtype", "value": str(dtype).removeprefix("torch.")}
    return {"class": PROJECTOR_CLASS, "init_args": args}


def save_fuser(
    fuser: C2CFuser, folder: str | os.PathLike, config: dict | None = None, dtype: torch.dtype | None = None
) -> Path:
    """Write `folder/final/` in the official layout (and `folder/config.json` when given).

    Tensors are stored in `dtype` (default: each projector's own init dtype; released fusers use bf16).
    """
    final = Path(folder) / "final"
    final.mkdir(parents=True, exist_ok=True)
    for i, p in enumerate(fuser.projectors):
        save_dtype = dtype or p.init_args["dtype"]
        state = {k: v.detach().to("cpu", save_dtype).clone() for k, v in p.state_dict().items()}
        torch.save(state, final / f"projector_{i}.pt")
        (final / f"projector_{i}.json").write_text(json.dumps(_projector_json(p, save_dtype), indent=2))
    layer_map = {"0": {"1": {str(t): [[s, idx]] for t, (s, idx) in fuser.layer_map.items()}}}
    (final / "projector_config.json").write_text(json.dumps(layer_map, indent=2))
    if config is not None:
        (Path(folder) / "config.json").write_text(json.dumps(config, indent=2, default=str))
    return final


def find_final_dir(folder: str | os.PathLike) -> Path | None:
    """The folder holding projector files: `folder/final/` or `folder` itself; None if neither."""
    folder = Path(folder)
    for candidate in (folder / "final", folder):
        if (candidate / "projector_0.json").is_file():
            return candidate
    return None


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FuserError(f"{path} is not valid JSON ({e}): the file is damaged; download or train the fuser again") from None


def _read_layer_map(final: Path, num_projectors: int) -> dict[int, tuple[int, int]] | None:
    path = final / "projector_config.json"
    if not path.is_file():
        return None
    raw = _read_json(path)
    try:
        pairs = raw["0"]["1"]
        return {int(t): (int(v[0][0]), int(v[0][1])) for t, v in pairs.items()}
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise FuserError(f"{path}: expected {{'0': {{'1': {{'<draft_layer>': [[target_layer, projector]]}}}}}}, got {raw!r:.200}") from e


def load_fuser(folder: str | os.PathLike, draft: KVShape, target: KVShape, device=None, dtype=None) -> C2CFuser:
    """Load a fuser folder in the official layout, strictly, and check that it fits the models.

    Without `projector_config.json` the map is computed ("last_aligned", projector i for draft layer i).
    """
    final = find_final_dir(folder)
    if final is None:
        raise FuserError(f"{folder}: no projector_0.json in it or in its final/ subfolder (not a C2C fuser folder)")
    projectors = []
    i = 0
    while (final / f"projector_{i}.json").is_file():
        meta = _read_json(final / f"projector_{i}.json")
        if not isinstance(meta, dict) or meta.get("class", PROJECTOR_CLASS) != PROJECTOR_CLASS:
            raise FuserError(f"{final}/projector_{i}.json: expected {{\"class\": \"{PROJECTOR_CLASS}\", \"init_args\": {{...}}}}")
        try:
            with torch.device("meta"):
                proj = C2CProjector(**meta.get("init_args", {}))
        except TypeError as e:  # an unknown or missing constructor argument
            raise FuserError(f"{final}/projector_{i}.json: init_args do not fit C2CProjector ({e})") from None
        weights = final / f"projector_{i}.pt"
        if not weights.is_file():
            raise FuserError(f"{weights} is missing (every projector_{{i}}.json needs its .pt)")
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises several types for a damaged file; all mean the same to the user
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise FuserError(f"{weights} cannot be read ({clip(first)}): the file is damaged; download or train the fuser again") from e
        try:
            proj.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as e:
            raise FuserError(f"{weights}: state dict does not match C2CProjector{meta.get('init_args')}: {e}") from e
        projectors.append(proj)
        i += 1
    layer_map = _read_layer_map(final, len(projectors))
    if layer_map is None:
        layer_map = {t: (s, t) for t, s in last_aligned_map(draft.num_layers, target.num_layers).items()}
    fuser = C2CFuser(projectors, layer_map)
    fuser.check_fits(draft, target)
    fuser.to(device=device, dtype=dtype or projectors[0].init_args["dtype"])
    return fuser.eval().requires_grad_(False)


def count_parameters(module: nn.Module) -> int:
    return sum(math.prod(p.shape) for p in module.parameters())
