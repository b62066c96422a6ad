"""The only module that touches the transformers cache object.

transformers 5.x moves fast: the forward keyword went from `past_key_values` to `cache` (5.2x),
and `DynamicCache.crop` changed its meaning (absolute length -> tokens to remove). Everything the
engine and the fuser need from a cache goes through the few functions here, so an API change is a
one-file fix. The functions rely only on `DynamicCache(config=...)`, `StaticCache(config=..., max_cache_len=...)`,
`cache.layers[i].keys/values` (tensors shaped (B, H_kv, T, D)), `get_seq_length()` and, for static
caches, each layer's `cumulative_length` tensor (the next write position), which 5.17 to 5.24 share.

Static caches are preallocated and indexed by position: rolling back only moves the write
position (on the device, no sync); the stale entries beyond it are masked by causality and
overwritten by the next round. They keep tensor addresses fixed, which CUDA graphs need.
"""

from __future__ import annotations

import inspect
from functools import lru_cache

import torch
from transformers import DynamicCache, StaticCache


def new_cache(model, max_length: int | None = None) -> DynamicCache | StaticCache:
    """A fresh, empty cache for `model` (never reuse one across prompts or repeats).

    With `max_length`, a static cache of that many positions; otherwise a dynamic one.
    """
    if max_length is not None:
        return StaticCache(config=model.config, max_cache_len=max_length)
    return DynamicCache(config=model.config)


def is_static(cache) -> bool:
    return isinstance(cache, StaticCache)


@lru_cache(maxsize=None)
def _cache_keyword(forward_cls: type) -> str:
    params = inspect.signature(forward_cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def forward(model, input_ids: torch.Tensor, cache, start: int, logits_to_keep: int = 0, call=None):
    """Run `model` on `input_ids` (1, N) at positions start..start+N-1, appending to `cache`.

    Returns logits (1, N or logits_to_keep, V). The caller passes `start` (the cache length it
    tracks on the host) so no device value is read here. `call` replaces `model(...)` (a compiled
    version of it).
    """
    n = input_ids.shape[-1]
    position_ids = torch.arange(start, start + n, device=input_ids.device).unsqueeze(0)  # (1, N)
    kwargs = {_cache_keyword(type(model)): cache}
    out = (model if call is None else call)(
        input_ids=input_ids,
        position_ids=position_ids,
        use_cache=True,
        logits_to_keep=logits_to_keep,
        **kwargs,
    )
    return out.logits


def length(cache) -> int:
    """Number of positions held (the same in every layer). Reads the device for static caches: tests only."""
    return int(cache.get_seq_length())


def num_layers(cache: DynamicCache) -> int:
    return len(cache.layers)


def crop(cache, new_length: int) -> None:
    """Roll the cache back to its first `new_length` positions (no recomputation).

    Dynamic caches: slices the layer tensors directly instead of calling `DynamicCache.crop`, whose
    argument changed meaning inside 5.x (the slice is a view; the next append copies it anyway).
    Static caches: moves the write position back, in place on the device.
    """
    if is_static(cache):
        for layer in cache.layers:
            if layer.is_initialized:
                layer.cumulative_length.fill_(new_length)
        return
    for layer in cache.layers:
        if layer.keys is not None and layer.keys.shape[-2] > new_length:
            layer.keys = layer.keys[:, :, :new_length, :]
            layer.values = layer.values[:, :, :new_length, :]


def read_kv(cache: DynamicCache, layer: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of one layer at positions [start, end), each (B, H_kv, end-start, D)."""
    entry = cache.layers[layer]
    return entry.keys[:, :, start:end, :], entry.values[:, :, start:end, :]


def write_kv(cache: DynamicCache, layer: int, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Overwrite one layer's K and V in place at positions [start, start + keys.shape[-2])."""
    entry = cache.layers[layer]
    end = start + keys.shape[-2]
    entry.keys[:, :, start:end, :] = keys.to(entry.keys.dtype)
    entry.values[:, :, start:end, :] = values.to(entry.values.dtype)


def replace_kv(cache: DynamicCache, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Swap one layer's whole K and V for new tensors (training: keeps the autograd graph, no in-place write)."""
    entry = cache.layers[layer]
    entry.keys, entry.values = keys, values


def read_kv_at(cache, layer: int, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of one layer at the given positions (W,) of a static cache, each (B, H_kv, W, D).

    Positions come as a device tensor, so a compiled caller keeps fixed shapes whatever they are.
    """
    entry = cache.layers[layer]
    return entry.keys.index_select(2, positions), entry.values.index_select(2, positions)


def write_kv_at(cache, layer: int, positions: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Overwrite one layer's K and V in place at the given positions (W,) of a static cache."""
    entry = cache.layers[layer]
    entry.keys.index_copy_(2, positions, keys.to(entry.keys.dtype))
    entry.values.index_copy_(2, positions, values.to(entry.values.dtype))
