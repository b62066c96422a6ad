"""An optional draft adapter, trained jointly with the projectors (`train_fuser --draft_adapter`).

C2C keeps both models frozen; a frozen draft may not know how to read what the projectors write
into its cache. The adapter adds a trainable change to the draft's linear layers (those inside its
decoder layers: attention q/k/v/o and the MLP):

  lora: W + (alpha / rank) * B @ A, A (rank, in) and B (out, rank), B starting at zero
  full: W + D, D (out, in) starting at zero (every weight free: the study's upper bound)

Both start as the identity. Training runs the change as a forward hook (the draft's weights stay
untouched and can be switched back, `enabled`); inference merges it into a copy of the draft
(`merged_copy`), so the engine and its compiled fast path see an ordinary model.

Files, beside the fuser's official `final/` folder (which C2C's own code keeps reading as before):
`<fuser folder>/draft_adapter/adapter.safetensors` and `adapter.json` (kind, rank, alpha, modules, and
`base_fingerprint`: numbers of the draft it was trained on, checked at load so that an adapter is never
merged into another draft of the same shapes, e.g. a PARD export of it).
"""

from __future__ import annotations

import copy
import json
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ..errors import UserInputError

ADAPTER_DIR = "draft_adapter"
MASK_FILE = "mask_embedding.safetensors"  # a parallel-drafting adapter's mask vector (train_fuser --parallel_drafts)
KINDS = ("lora", "full")
FINGERPRINT_SAMPLES = 65536  # weights sampled per layer (evenly spaced) for the base draft's fingerprint
FINGERPRINT_TOLERANCE = 0.02  # bf16 rounding moves a layer's number by ~0.004; a different draft by ~0.05-1


def adapted_linears(model) -> dict[str, nn.Linear]:
    """The draft's linear layers an adapter may change: every nn.Linear inside its decoder layers."""
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in f".{name}"}


def fingerprint(model, names: list[str]) -> list[float]:
    """One number per adapted layer of `model`: its weight sampled at evenly spaced entries, projected on a
    fixed pseudo-random sign pattern and divided by the sample's norm (about N(0, 1) across layers; the
    same draft in float32 or bfloat16 within ~0.004; a retrained or merged one off by far more)."""
    linears, out = adapted_linears(model), []
    for name in names:
        flat = linears[name].weight.detach().reshape(-1)
        count = min(flat.numel(), FINGERPRINT_SAMPLES)  # evenly spaced entries, in integers: the same on every device
        index = (torch.arange(count, dtype=torch.long) * (flat.numel() - 1)).div(max(count - 1, 1), rounding_mode="floor")
        index = index.to(flat.device)
        sample = flat.index_select(0, index).float().cpu()
        signs = torch.randint(0, 2, sample.shape, generator=torch.Generator().manual_seed(0)).float() * 2 - 1
        out.append(round(float((sample * signs).sum() / sample.norm().clamp_min(1e-12)), 6))
    return out


def check_base(meta: dict, model, folder) -> None:
    """An error when the adapter's recorded fingerprint (adapter.json) is not this draft's: the adapter
    was trained on another draft of the same shapes. Adapters saved before fingerprints pass."""
    saved = meta.get("base_fingerprint")
    if not saved:
        return
    now = fingerprint(model, list(meta["modules"]))
    if len(saved) != len(now):
        raise UserInputError(f"draft adapter {folder}: adapter.json's base_fingerprint has {len(saved)} numbers for "
                             f"{len(now)} modules: the file was edited or is damaged (save the fuser again)")
    worst = max(range(len(now)), key=lambda i: abs(now[i] - saved[i]))
    if abs(now[worst] - saved[worst]) > FINGERPRINT_TOLERANCE:
        trained_on = meta.get("draft_model", "another draft")
        raise UserInputError(
            f"draft adapter {folder} was trained on {trained_on}, and this draft's weights differ from that one's "
            f"({meta['modules'][worst]}: fingerprint {now[worst]:.3f} vs {saved[worst]:.3f}): run it with the draft it was "
            "trained on (--base_model), or train the fuser again with this draft")


class DraftAdapter(nn.Module):
    def __init__(self, kind: str, shapes: dict[str, tuple[int, int]], rank: int = 8, alpha: float | None = None):
        super().__init__()
        if kind not in KINDS:
            raise UserInputError(f"draft adapter kind must be one of {', '.join(KINDS)}, got {kind!r}")
        if kind == "lora" and rank < 1:
            raise UserInputError(f"--adapter_rank must be >= 1, got {rank}")
        self.kind, self.rank = kind, rank
        self.alpha = float(alpha if alpha is not None else rank)
        self.names = sorted(shapes)
        self.enabled = True
        self._hooks: list = []
        self.a, self.b, self.d = nn.ParameterDict(), nn.ParameterDict(), nn.ParameterDict()
        for name in self.names:
            out_f, in_f = shapes[name]
            key = self._key(name)
            if kind == "lora":
                self.a[key] = nn.Parameter(torch.randn(rank, in_f) / in_f**0.5)
                self.b[key] = nn.Parameter(torch.zeros(out_f, rank))
            else:
                self.d[key] = nn.Parameter(torch.zeros(out_f, in_f))

    @staticmethod
    def _key(name: str) -> str:
        return name.replace(".", "__")  # ParameterDict keys cannot hold dots

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def file_keys(self) -> dict[str, str]:
        """{state_dict key: key in adapter.safetensors}: the one naming both save and load use."""
        keys = {}
        for name in self.names:
            key = self._key(name)
            if self.kind == "lora":
                keys[f"a.{key}"], keys[f"b.{key}"] = f"{name}.lora_A", f"{name}.lora_B"
            else:
                keys[f"d.{key}"] = f"{name}.delta"
        return keys

    @classmethod
    def create(cls, model, kind: str, rank: int = 8, alpha: float | None = None) -> "DraftAdapter":
        linears = adapted_linears(model)
        if not linears:
            raise UserInputError("the draft has no linear layers inside decoder layers to adapt")
        return cls(kind, {n: tuple(m.weight.shape) for n, m in linears.items()}, rank, alpha)

    def delta(self, name: str) -> torch.Tensor:
        """The change to `name`'s weight, (out, in)."""
        key = self._key(name)
        if self.kind == "lora":
            return self.scale * self.b[key] @ self.a[key]
        return self.d[key]

    # ------------------------------------------------------------ training: hooks

    def attach(self, model) -> None:
        """Add the change to the model's outputs (x @ delta^T) while `enabled`; weights untouched."""
        self.detach()
        linears = adapted_linears(model)
        for name in self.names:
            module = linears.get(name)
            if module is None:
                raise UserInputError(f"the draft has no layer {name} for the adapter")
            self._hooks.append(module.register_forward_hook(self._hook(name)))

    def _hook(self, name: str):
        key = self._key(name)

        def hook(module, inputs, output):
            if not self.enabled:
                return output
            x = inputs[0]
            if self.kind == "lora":  # two thin products, never the (out, in) matrix
                return output + (x @ self.a[key].t().to(x.dtype)) @ self.b[key].t().to(x.dtype) * self.scale
            return output + x @ self.d[key].t().to(x.dtype)

        return hook

    def detach(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    @contextmanager
    def disabled(self):
        """The plain draft for the duration (hooks attached but inactive), switched back on after."""
        self.enabled = False
        try:
            yield
        finally:
            self.enabled = True

    # ------------------------------------------------------------ inference: merged weights

    @torch.no_grad()
    def merged_copy(self, model):
        """A copy of the model with the change merged into its weights (computed in float32)."""
        merged = copy.deepcopy(model)
        linears = adapted_linears(merged)
        for name in self.names:
            w = linears[name].weight
            w.copy_((w.float() + self.delta(name).float().to(w.device)).to(w.dtype))
        return merged

    # ------------------------------------------------------------ files

    def save(self, folder: str | Path, dtype: torch.dtype = torch.float32, extra: dict | None = None, base=None) -> Path:
        """The adapter's files; `base`: the draft it was trained on (its fingerprint is recorded)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = self.state_dict()
        tensors = {file_key: state[k].detach().to("cpu", dtype).contiguous() for k, file_key in self.file_keys().items()}
        save_file(tensors, str(folder / "adapter.safetensors"))
        meta = {"kind": self.kind, "rank": self.rank, "alpha": self.alpha, "modules": self.names,
                "parameters": sum(t.numel() for t in tensors.values()), **(extra or {})}
        if base is not None:
            meta["base_fingerprint"] = fingerprint(base, self.names)
        (folder / "adapter.json").write_text(json.dumps(meta, indent=2))
        return folder


def find_adapter(fuser_path: str | Path | None) -> Path | None:
    """`<fuser folder>/draft_adapter` when it exists (the fuser path may name the folder or its final/)."""
    if fuser_path is None:
        return None
    path = Path(fuser_path)
    for folder in (path, path.parent) if path.name == "final" else (path,):
        if (folder / ADAPTER_DIR / "adapter.json").is_file():
            return folder / ADAPTER_DIR
    return None


def load_adapter(folder: str | Path, model) -> DraftAdapter:
    """Read an adapter folder strictly and check it fits `model` (names and shapes)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    fix = "train the fuser again with this draft (python -m c2c.tools.train_fuser --draft_adapter ...) or remove the folder"
    try:
        meta = json.loads((folder / "adapter.json").read_text(encoding="utf-8"))
        kind, rank, alpha, names = meta["kind"], int(meta.get("rank", 8)), meta.get("alpha"), list(meta["modules"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise UserInputError(f"{folder}/adapter.json cannot be read ({e}): {fix}") from None
    try:
        tensors = load_file(str(folder / "adapter.safetensors"))
    except (OSError, SafetensorError) as e:
        raise UserInputError(f"{folder}/adapter.safetensors cannot be read ({e}): {fix}") from None
    linears = adapted_linears(model)
    missing = [n for n in names if n not in linears]
    if missing:
        raise UserInputError(f"draft adapter {folder} was trained for another draft (no layer {missing[0]}): {fix}")
    check_base(meta, model, folder)
    adapter = DraftAdapter(kind, {n: tuple(linears[n].weight.shape) for n in names}, rank, alpha)
    state = {k: tensors.get(file_key) for k, file_key in adapter.file_keys().items()}
    expected = adapter.state_dict()
    for k, v in state.items():
        if v is None or v.shape != expected[k].shape:
            raise UserInputError(f"draft adapter {folder}: tensor for {k} is missing or has the wrong shape "
                                 f"(expected {tuple(expected[k].shape)}): {fix}")
    adapter.load_state_dict({k: v.float() for k, v in state.items()})
    return adapter.requires_grad_(False)


def adapter_mask_id(folder: str | Path | None) -> int | None:
    """The mask id a parallel-drafting adapter was trained with (adapter.json `mask_id`), None for
    another adapter or none; reads the JSON only (before any model loads)."""
    if folder is None:
        return None
    try:
        meta = json.loads((Path(folder) / "adapter.json").read_text(encoding="utf-8"))
        return int(meta["mask_id"]) if "mask_id" in meta else None
    except (OSError, json.JSONDecodeError, TypeError, ValueError) as e:
        raise UserInputError(f"{folder}/adapter.json cannot be read ({e}): train the fuser again or remove the folder") from None


def load_mask(folder: str | Path, draft) -> int | None:
    """A parallel-drafting adapter's mask vector written into the draft's row `mask_id` (the draft: the
    adapted copy inference runs, so the engine reads the id); returns the id, or None without one."""
    from safetensors.torch import load_file

    mask_id = adapter_mask_id(folder)
    if mask_id is None:
        return None
    weight = draft.get_input_embeddings().weight
    try:
        vector = load_file(str(Path(folder) / MASK_FILE))["mask"]
    except Exception as e:  # noqa: BLE001 -- safetensors raises its own types; re-raised as one clear error
        raise UserInputError(f"{folder}/{MASK_FILE} cannot be read ({e}): train the parallel adapter again") from None
    if not 0 <= mask_id < weight.shape[0] or vector.shape != weight[0].shape:
        raise UserInputError(f"{folder}: mask id {mask_id} or its vector {tuple(vector.shape)} does not fit this draft "
                             f"({weight.shape[0]} embeddings of {weight.shape[1]}): train it again for this draft")
    with torch.no_grad():
        weight[mask_id] = vector.to(weight.dtype)
    return mask_id
