"""Loading models, tokenizers and fusers; choosing device and dtype; checking the pair fits.

Hub ids and local paths both work (anything `from_pretrained` accepts). Every failure the user can
fix becomes a `UserInputError` naming the problem and the fix; checks that are cheap (configs,
device) run before any large download.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserInputError, clip
from ..core.cache import check_rollback, kv_heads_and_dim, text_config
from ..core.fuser import FuserError, find_final_dir

FUSER_HUB_REPO = "nics-efc/C2C_Fuser"
DEFAULT_FUSER = "qwen3_0.6b+qwen3_14b_Fuser"
LOCAL_FUSER_DIR = Path("output") / "fusers"
CPU_PARAM_LIMIT = 3e9  # above this, a CPU run needs an explicit --device cpu
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_device(name: str) -> torch.device:
    """auto -> cuda when available, else cpu; an explicit cuda without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserInputError("--device cuda was asked for but no CUDA GPU is visible (check nvidia-smi, or pass --device cpu)")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise UserInputError(f"--device must be auto, cuda, cuda:N or cpu, got {name!r}")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto -> bfloat16 on GPUs that support it (float16 otherwise), float32 on CPU."""
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if name not in DTYPES:
        raise UserInputError(f"--dtype must be one of auto, {', '.join(DTYPES)}; got {name!r}")
    return DTYPES[name]


_HUB_STATE: dict[str, bool] = {}


def hub_offline() -> bool:
    """True when the Hub is not to be asked: HF_HUB_OFFLINE is set, or (without a proxy configured) its
    host does not answer a TCP connection within 3 s (checked once per process). Loading then uses the local cache only,
    so an offline run fails in seconds with a clear error instead of ~30 s of download retries."""
    if "offline" not in _HUB_STATE:
        flag = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
        proxied = any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"))
        if not flag and not proxied:  # behind a proxy a direct connection says nothing: let the Hub client try
            import socket
            from urllib.parse import urlparse

            url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
            try:
                socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=3).close()
            except OSError:
                flag = True
        _HUB_STATE["offline"] = flag
    return _HUB_STATE["offline"]


def _cache_only(name: str) -> bool:
    """A Hub id (not a local folder) while the Hub can't be reached: only the local cache can serve it."""
    return not Path(name).expanduser().exists() and hub_offline()


def _hub_kwargs(name: str) -> dict:
    """from_pretrained's arguments for `name`: local folders as they are; Hub ids from the cache only when offline."""
    return {"local_files_only": True} if _cache_only(name) else {}


def _offline_hint(name: str) -> str:
    if not _cache_only(name):
        return ""
    return (f" (the Hugging Face Hub can't be reached and {name!r} is not in the local cache: download it once "
            "with network access, or pass a local folder)")


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def load_config(name: str, role: str):
    """The model's config (a few KB): fetched first so that mistakes surface before a large download."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name, **_hub_kwargs(name))
    except (OSError, ValueError) as e:
        hint = _offline_hint(name) or " (check the Hub id or local path, your network, and HF_TOKEN for gated models)"
        raise UserInputError(f"cannot load the {role} model {name!r}: {clip(_first_line(e), 200)}{hint}") from None


def estimate_parameters(config) -> float:
    """Rough parameter count from a decoder config (embeddings + attention + MLP per layer), any
    architecture: its KV shape as the cache reads it, its MLP width under whichever name it uses
    (intermediate_size, ffn_dim, n_inner; 4 x hidden when the config leaves it to the default)."""
    c = text_config(config)
    kv_heads, head_dim = kv_heads_and_dim(c)
    attn = c.hidden_size * head_dim * (2 * c.num_attention_heads + 2 * kv_heads)
    inner = next((v for v in (getattr(c, n, None) for n in ("intermediate_size", "ffn_dim", "n_inner")) if v), 4 * c.hidden_size)
    mlp = 3 * c.hidden_size * inner
    embeddings = c.vocab_size * c.hidden_size * (1 if getattr(c, "tie_word_embeddings", False) else 2)
    return embeddings + c.num_hidden_layers * (attn + mlp)


def check_device_fits(target_config, target_name: str, device: torch.device, device_arg: str) -> None:
    """A large target on CPU only when --device cpu was asked for explicitly."""
    params = estimate_parameters(target_config)
    if device.type == "cpu" and device_arg != "cpu" and params > CPU_PARAM_LIMIT:
        raise UserInputError(
            f"no CUDA GPU found, and the target {target_name} has ~{params / 1e9:.1f}B parameters "
            f"(~{params * 2 / 1e9:.0f} GB in bf16): run on a GPU machine, or pass --device cpu to force a very slow CPU run"
        )


def check_pair(draft_config, target_config, draft_name: str, target_name: str) -> None:
    """From the configs alone (before any download of weights): both models must keep a K/V cache a
    rollback can crop (c2c.core.cache.check_rollback)."""
    check_rollback(target_config, f"the target {target_name}")
    check_rollback(draft_config, f"the draft {draft_name}")


def check_tokenizers(draft_name: str, target_name: str, target_tokenizer, draft_config, target_config):
    """Draft and target must share one tokenizer (the acceptance rule compares token ids): the same
    vocabulary, token for token, and every id inside both models' embeddings. Embedding sizes may
    differ (Qwen2.5-0.5B pads to 151936 rows, 7B to 152064: one tokenizer; `align_vocab` then cuts the
    larger). Returns the draft's tokenizer."""
    draft_tokenizer = target_tokenizer if draft_name == target_name else load_tokenizer(draft_name)
    if draft_tokenizer.get_vocab() != target_tokenizer.get_vocab():
        a, b = len(draft_tokenizer), len(target_tokenizer)
        raise UserInputError(
            f"the draft {draft_name} and the target {target_name} have different tokenizers ({a:,} and {b:,} tokens, "
            "not the same ids): speculative decoding and fusion need a pair that shares one tokenizer (e.g. "
            "Qwen/Qwen2.5-0.5B-Instruct with Qwen/Qwen2.5-7B-Instruct, or meta-llama/Llama-3.2-1B-Instruct with "
            "meta-llama/Llama-3.1-8B-Instruct)")
    dv, tv = text_config(draft_config).vocab_size, text_config(target_config).vocab_size
    if len(target_tokenizer) > min(dv, tv):
        raise UserInputError(f"the tokenizer of {target_name} has {len(target_tokenizer):,} tokens, more than the "
                             f"{min(dv, tv):,} rows of the {'draft' if dv < tv else 'target'}'s embedding: the pair can't share it")
    return draft_tokenizer


def align_vocab(target, draft, log) -> None:
    """Models of one tokenizer whose embeddings differ in rows (padding past the tokenizer's tokens:
    Qwen2.5-0.5B 151936, 7B 152064) both run with the smaller count, so each can read every id the
    other emits and their distributions cover the same ids. The rows dropped are padding no text
    encodes to; the target-only run uses the same model, so the comparison stays like for like."""
    rows = {m: m.get_input_embeddings().weight.shape[0] for m in (target, draft)}
    keep = min(rows.values())
    for role, model in (("target", target), ("draft", draft)):
        if rows[model] > keep:
            model.resize_token_embeddings(keep)
            log(f"note: the {role}'s embedding has {rows[model]:,} rows, the other model's {keep:,}: both run with the first "
                f"{keep:,} (the rest are padding past the shared tokenizer's tokens)")


def load_model(name: str, role: str, dtype: torch.dtype, device: torch.device, device_map: str | None = None):
    """An eval-mode causal LM on `device` (or spread by accelerate's `device_map`)."""
    from transformers import AutoModelForCausalLM

    try:
        if device_map:
            model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, device_map=device_map, **_hub_kwargs(name))
        else:
            model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **_hub_kwargs(name)).to(device)
    except (OSError, ValueError) as e:
        raise UserInputError(f"cannot load the {role} model {name!r}: {clip(_first_line(e), 200)}{_offline_hint(name)}") from None
    return model.eval().requires_grad_(False)


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name, **_hub_kwargs(name))
    except (OSError, ValueError) as e:
        raise UserInputError(f"cannot load the tokenizer of {name!r}: {clip(_first_line(e), 200)}{_offline_hint(name)}") from None


def eos_token_ids(model, tokenizer) -> set[int]:
    """Every end-of-sequence id: generation_config's (an int or a list, as Qwen3's) and the tokenizer's."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


@dataclass(frozen=True)
class FuserChoice:
    """Where a fuser comes from, or why fusion is off."""

    path: Path | None
    reason: str | None  # None when a fuser was found


def resolve_fuser(name: str | None, explicit: bool, search_dir: Path = LOCAL_FUSER_DIR) -> FuserChoice:
    """Find a fuser folder: an existing path, then `output/fusers/<name>`, then the Hub (one pair only).

    `name` "none" turns fusion off. The default name not being found anywhere is a warning (fusion
    off, with the reason recorded); a name the user gave explicitly and that can't be found is an error.
    """
    if name is None or name.lower() == "none":
        return FuserChoice(None, "fusion disabled (--fuser_checkpoint none)")
    for candidate in (Path(name).expanduser(), search_dir / name):
        if candidate.exists():
            if find_final_dir(candidate) is None:
                raise FuserError(f"{candidate} exists but holds no projector files (expected final/projector_0.json)")
            return FuserChoice(candidate, None)
    hub_error = _download_from_hub(name)
    if isinstance(hub_error, Path):
        return FuserChoice(hub_error, None)
    if explicit:
        raise FuserError(
            f"fuser {name!r} not found: not a local path, not in {search_dir}/, and not on the Hub repo "
            f"{FUSER_HUB_REPO} ({hub_error}). Pass an existing fuser folder, or --fuser_checkpoint none"
        )
    return FuserChoice(
        None,
        f"no fuser {name!r} found locally or on {FUSER_HUB_REPO} ({hub_error}); no public C2C fuser exists "
        "for Qwen3-14B: train one with `python -m c2c.tools.train_fuser` into output/fusers/, or use "
        "--teacher_model Qwen/Qwen3-4B --fuser_checkpoint qwen3_0.6b+qwen3_4b_Fuser",
    )


def _download_from_hub(name: str) -> Path | str:
    """The local folder of one pair from the Hub repo, or a short reason it is not available."""
    if "/" in name or os.sep in name:
        return "a path, not a Hub pair name"
    from huggingface_hub import snapshot_download

    try:
        root = snapshot_download(repo_id=FUSER_HUB_REPO, allow_patterns=[f"{name}/*"], local_files_only=hub_offline())
    except (OSError, ValueError) as e:  # offline, no network, unknown repo: all OSError subclasses
        return f"Hub not reachable: {type(e).__name__}"
    folder = Path(root) / name
    return folder if find_final_dir(folder) is not None else "no such pair on the Hub"
