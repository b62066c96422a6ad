"""The only module that touches the transformers cache object.

transformers 5.x moves fast: the forward keyword went from `past_key_values` to `cache` (5.2x),
and `DynamicCache.crop` changed its meaning (absolute length -> tokens to remove). Everything the
engine and the fuser need from a cache goes through the few functions here, so an API change is a
one-file fix. The functions rely only on `DynamicCache()`, `StaticCache(config=..., max_cache_len=...)`
and `StaticLayer(max_cache_len=...)`, `cache.layers[i].keys/values` (tensors shaped (B, H_kv, T, D)),
`get_seq_length()` and, for static caches, each layer's `cumulative_length` tensor (the next write
position), which 5.17 to 5.2x share.

Architectures differ here and nowhere else: the KV shape (`kv_heads_and_dim`, the rule transformers'
own cache code reads), sliding-window and hybrid layers (every cache layer holds every position, so a
rollback is a crop; the windows live in the masks: the model's own, and `tree_mask` for tree rounds),
and what a tree or a rollback can't serve (`tree_unsupported`, `check_rollback`), decided from configs.

Static caches are preallocated and indexed by position: rolling back only moves the write
position (on the device, no sync); the stale entries beyond it are masked by causality and
overwritten by the next round. They keep tensor addresses fixed, which CUDA graphs need.
"""

from __future__ import annotations

import inspect
from functools import lru_cache

import torch
from transformers import DynamicCache, StaticCache
from transformers.cache_utils import StaticLayer

from ..errors import UserInputError


def new_cache(model, max_length: int | None = None) -> DynamicCache | StaticCache:
    """A fresh, empty cache for `model` (never reuse one across prompts or repeats).

    With `max_length`, a static cache of that many positions, its layers pooled when they can be
    (see `_pool`); otherwise a dynamic one.

    Every layer holds every position, sliding-window layers too: transformers' sliding layers keep
    only the last window of keys (a rolling buffer), which a rollback can't undo; a full layer with
    the model's own sliding mask (built from the config's window) attends to exactly the same keys.
    """
    if max_length is not None:
        cache = StaticCache(config=model.config, max_cache_len=max_length)
        cache.layers[:] = [layer if type(layer) is StaticLayer else StaticLayer(max_cache_len=max_length) for layer in cache.layers]
        _pool(cache, model)
        return cache
    return DynamicCache()  # no config: every layer a full one, made as the model first writes it


class _Pool:
    """One tensor each for every layer's keys, values and write position of a static cache; the
    layers hold views of them. Fusion then reads and writes many layers in one op each, and a
    rollback is one fill instead of one per layer."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor):
        self.keys, self.values, self.lengths = keys, values, lengths  # (L, B, H, T, D), (L,)


def _pool(cache: StaticCache, model) -> None:
    """Allocate the static cache's layers up front as views of one pooled tensor each (keys,
    values, write positions), when the model sits on one device and every layer is a plain static
    layer of the same shape; otherwise leave the cache as transformers builds it (lazily, per layer)."""
    devices = set(getattr(model, "hf_device_map", {}).values())
    layers = cache.layers
    if len(devices) > 1 or not layers or any(type(layer) is not StaticLayer for layer in layers):
        return
    heads, head_dim = kv_heads_and_dim(model.config)
    capacity = layers[0].max_cache_len
    if any(layer.max_cache_len != capacity for layer in layers):
        return
    weight = model.get_input_embeddings().weight
    dtype, device = weight.dtype, weight.device
    shape = (len(layers), 1, heads, capacity, head_dim)
    pool = _Pool(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device),
                 torch.zeros(len(layers), dtype=torch.long, device=device))
    probe = torch.zeros((1, heads, 1, head_dim), dtype=dtype, device=device)
    for i, layer in enumerate(layers):
        layer.lazy_initialization(probe, probe)  # sets the layer's own fields, as transformers would
        layer.keys, layer.values, layer.cumulative_length = pool.keys[i], pool.values[i], pool.lengths[i]
        for tensor in (layer.keys, layer.values, layer.cumulative_length):
            torch._dynamo.mark_static_address(tensor)
    cache._c2c_pool = pool


def _pooled(cache) -> _Pool | None:
    return getattr(cache, "_c2c_pool", None)


def reset(cache) -> None:
    """Empty a static cache in place (same tensors: compiled graphs keep replaying on them)."""
    pool = _pooled(cache)
    if pool is None:
        cache.reset()
        return
    pool.keys.zero_()
    pool.values.zero_()
    pool.lengths.zero_()


def is_static(cache) -> bool:
    return isinstance(cache, StaticCache)


@lru_cache(maxsize=None)
def _cache_keyword(forward_cls: type) -> str:
    params = inspect.signature(forward_cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_keyword(model) -> str:
    """The forward keyword that takes the cache: `cache` in newer transformers, `past_key_values` before."""
    return _cache_keyword(type(model))


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


MASKABLE = ("eager", "sdpa")  # attention implementations that honour a custom additive 4-D mask


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask (True = may attend) as the additive one `forward_masked` passes: 0 where allowed,
    dtype's min elsewhere. Additive, because eager attention adds whatever mask it gets (a boolean
    one would be added as 0/1, silently wrong); SDPA takes the same float mask."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def text_config(config):
    """The decoder's config (a multimodal config's text part; a text model's config itself)."""
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def kv_heads_and_dim(config) -> tuple[int, int]:
    """(KV heads, head dim) of a model's attention, as transformers' own cache code reads them
    (`configuration_utils.get_head_shapes` where this transformers has it): `num_key_value_heads`, or
    the attention heads for multi-head models without that field (GPT-2, OPT, GPT-NeoX, BLOOM, ...);
    `head_dim`, or hidden size / heads. Configs map their own names (n_head, n_embd, num_kv_heads)
    to these through their attribute_map. Layers of different shapes: a UserInputError (not served)."""
    config = text_config(config)
    try:
        from transformers.configuration_utils import get_head_shapes
    except ImportError:  # transformers before get_head_shapes: the same rule, read here
        get_head_shapes = None
    if get_head_shapes is not None and hasattr(config, "per_layer_config"):
        heads, head_dim = get_head_shapes(config)
    else:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    if isinstance(heads, list) or isinstance(head_dim, list):
        raise UserInputError(f"{type(config).__name__}: layers of different KV shapes ({heads} heads, head dims "
                             f"{head_dim}) are not served: use a model whose layers share one attention shape")
    return int(heads), int(head_dim)


ROLLBACK_LAYERS = ("full_attention", "sliding_attention")  # layer types whose cache a rollback can crop


def check_rollback(config, name: str) -> None:
    """A UserInputError unless every layer of the model keeps a plain K/V cache: speculative decoding
    rolls the caches back after a rejection, which a recurrent state (linear attention, Mamba
    layers, ...) or a chunked / shared-KV layer can't do. Decided from the config, before loading."""
    config = text_config(config)
    types = getattr(config, "layer_types", None) or []
    other = sorted({t for t in types if t not in ROLLBACK_LAYERS})
    if other or getattr(config, "kv_sharing_modes", None) is not None:
        raise UserInputError(
            f"{name} ({type(config).__name__}) has {', '.join(other) or 'shared-KV'} layers: speculative decoding rolls the "
            "caches back after a rejected draft, which these layers' state can't do; use a model whose layers are all "
            "full or sliding-window attention")


def sliding_windows(model) -> dict[str, int | None]:
    """Layer type -> the window its keys are limited to (None: every earlier key), as the model's own
    masks limit them: `config.sliding_window` on "sliding_attention" layers, or on every layer
    when the config has no `layer_types` (Mistral, Starcoder2, Phi-3 with a window)."""
    config = text_config(model.config)
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types is None:
        return {"full_attention": window}
    return {t: (window if t == "sliding_attention" else None) for t in sorted(set(types))}


ALIBI_MODELS = ("bloom", "mpt")  # position bias from a key's cache slot, not from position_ids


def tree_unsupported(config) -> str | None:
    """Why tree rounds can't serve this architecture (None: they can), from its config alone:
    positions must come from position_ids; ALiBi models (BLOOM, MPT, Falcon with alibi) bias each
    key by its cache slot, and a tree's nodes do not sit at their positions' slots."""
    config = text_config(config)
    if getattr(config, "model_type", None) in ALIBI_MODELS or getattr(config, "alibi", False) is True:
        return "its ALiBi position bias follows each key's cache slot, not a tree node's position"
    return None


def check_tree_support(model, role: str) -> None:
    """A UserInputError unless tree rounds can run on `model`: `tree_unsupported`, and attention that
    takes a custom additive mask (eager or SDPA)."""
    reason = tree_unsupported(model.config)
    if reason:
        raise UserInputError(f"tree rounds can't run on {type(model).__name__} (the {role}): {reason}; use chain "
                             "rounds (--tree_budget 0)")
    check_custom_masks(model, role, "tree rounds need attention that takes a tree mask",
                       "load it with attn_implementation='sdpa', or use chain rounds (--tree_budget 0)")


def tree_mask(model, allowed: torch.Tensor, query_positions: torch.Tensor, key_positions: torch.Tensor):
    """The attention mask `forward_masked` passes for a tree's block: `allowed` (Q, K) as an additive
    (1, 1, Q, K) mask, sliding-window layers limited as `layer_masks` says. query_positions (Q,),
    key_positions (K,): positions, not cache slots (a tree's nodes sit after the committed sequence at
    their depth's position)."""
    return layer_masks(model, allowed.unsqueeze(0), query_positions.view(1, -1), key_positions.view(1, -1))


def layer_masks(model, allowed: torch.Tensor, query_positions: torch.Tensor, key_positions: torch.Tensor):
    """`allowed` (B, Q, K) bool as the additive (B, 1, Q, K) mask `forward_masked` passes, each
    sliding-window layer type's further limited to keys whose position is within its window of the
    query's (q - k < window, as transformers' sliding mask). query_positions (B or 1, Q) and
    key_positions (B or 1, K): positions, not key slots (tree rounds, the trainer's block layouts). One
    tensor when every layer sees the same, else a dict by layer type (the form hybrid models such as
    Gemma 2/3 take)."""
    dtype = model.get_input_embeddings().weight.dtype
    windows = sliding_windows(model)
    masks = {}
    for window in dict.fromkeys(windows.values()):  # each distinct window once
        seen = allowed if window is None else allowed & (query_positions.unsqueeze(-1) - key_positions.unsqueeze(-2) < window)
        masks[window] = additive_mask(seen, dtype).unsqueeze(1)
    if len(masks) == 1:  # every layer sees the same keys
        return next(iter(masks.values()))
    return {kind: masks[window] for kind, window in windows.items()}


def check_custom_masks(model, role: str, needs: str, fix: str) -> None:
    """A UserInputError unless `model`'s attention honours custom masks (eager or SDPA; flash and flex
    attention ignore or reject them). `needs`: who needs them; `fix`: what to do otherwise."""
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    if impl not in MASKABLE:
        raise UserInputError(f"{needs} ({' or '.join(MASKABLE)}); the {role} runs {impl!r}: {fix}")


def forward_masked(model, input_ids: torch.Tensor, cache, position_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                   logits_to_keep: int = 0, keyword: str | None = None):
    """Run `model` on `input_ids` (B, N) at `position_ids` (B, N) with an attention mask: a custom 4-D
    additive one (B, 1, N, held + N; see `additive_mask`) over the keys `cache` holds followed by the
    new ones (the trainer's objective, tree rounds; a dict of them by layer type, see `layer_masks`), or a 2-D padding mask (B, held + N; 1 = a real
    token) that the model combines with causality (batched generation with left padding); None: the
    model's own causal mask. Returns logits (B, N or logits_to_keep, V). `keyword`: `cache_keyword(model)`,
    passed by compiled callers (the lookup inspects the model's signature)."""
    out = model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, use_cache=True,
                logits_to_keep=logits_to_keep, **{keyword or _cache_keyword(type(model)): cache})
    return out.logits


def forward_embeds(model, embeds: torch.Tensor, cache, position_ids: torch.Tensor, attention_mask: torch.Tensor | None):
    """`forward_masked` from input embeddings (B, N, H) instead of ids (the trainer's mask vector).
    Returns logits (B, N, V)."""
    return model(inputs_embeds=embeds, position_ids=position_ids, attention_mask=attention_mask, use_cache=True,
                 **{_cache_keyword(type(model)): cache}).logits


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
        set_length(cache, new_length)
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


# ---------------------------------------------------------------- many layers at once (fusion)


def _span(layers: tuple[int, ...]) -> slice | None:
    """The slice covering `layers` when they are consecutive and ascending (C2C's maps are)."""
    if layers and list(layers) == list(range(layers[0], layers[0] + len(layers))):
        return slice(layers[0], layers[0] + len(layers))
    return None


def read_layers(cache, layers: tuple[int, ...], start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of `layers` at positions [start, end), each (n, B, H_kv, end-start, D)."""
    pool, span = _pooled(cache), _span(layers)
    if pool is not None and span is not None:
        return pool.keys[span, :, :, start:end], pool.values[span, :, :, start:end]
    return (torch.stack([cache.layers[i].keys[:, :, start:end] for i in layers]),
            torch.stack([cache.layers[i].values[:, :, start:end] for i in layers]))


def write_layers(cache, layers: tuple[int, ...], start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Overwrite `layers`' K and V in place at positions [start, start + keys.shape[-2])."""
    pool, span = _pooled(cache), _span(layers)
    end = start + keys.shape[-2]
    if pool is not None and span is not None:
        pool.keys[span, :, :, start:end] = keys.to(pool.keys.dtype)
        pool.values[span, :, :, start:end] = values.to(pool.values.dtype)
        return
    for j, i in enumerate(layers):
        write_kv(cache, i, start, keys[j], values[j])


def read_layers_at(cache, layers: tuple[int, ...], positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of `layers` at the given positions (W,) of a static cache, each (n, B, H_kv, W, D):
    one gather each when the cache is pooled."""
    pool, span = _pooled(cache), _span(layers)
    if pool is not None and span is not None:
        return pool.keys[span].index_select(3, positions), pool.values[span].index_select(3, positions)
    pairs = [read_kv_at(cache, i, positions) for i in layers]
    return torch.stack([k for k, _ in pairs]), torch.stack([v for _, v in pairs])


def write_layers_at(cache, layers: tuple[int, ...], positions: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Overwrite `layers`' K and V in place at the given positions (W,): one scatter each when pooled."""
    pool, span = _pooled(cache), _span(layers)
    if pool is not None and span is not None:
        pool.keys[span].index_copy_(3, positions, keys.to(pool.keys.dtype))
        pool.values[span].index_copy_(3, positions, values.to(pool.values.dtype))
        return
    for j, i in enumerate(layers):
        write_kv_at(cache, i, positions, keys[j], values[j])


# ---------------------------------------------------------------- training: fusion inside one draft pass


class _FusingCache(DynamicCache):
    """A cache that stores nothing: each layer's `update` hands attention the keys (and values)
    [fuse(layer, K, V), K] over the same positions: the first half what the draft's cache holds at
    those positions after fusion, the second its own K/V of this pass (the trainer's block mask
    chooses per query which half it sees)."""

    def __init__(self, config, fuse):
        super().__init__(config=config)
        self._fuse = fuse

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):  # 5.17 passes cache_kwargs, 5.2x kwargs=
        fused_k, fused_v = self._fuse(layer_idx, key_states, value_states)
        return torch.cat([fused_k, key_states], dim=2), torch.cat([fused_v, value_states], dim=2)


def fusing_cache(model, fuse) -> DynamicCache:
    """For `forward_masked` over a whole sequence: keys (B, H, 2L, D) per layer, [fused, own], where
    `fuse(layer, keys, values) -> (keys, values)` gets this pass's own K/V of that layer (B, H, L, D)."""
    return _FusingCache(model.config, fuse)


# ---------------------------------------------------------------- tree rounds: device-side lengths and moves


def write_position(cache) -> torch.Tensor:
    """A static cache's length as a 0-d device tensor (its next write position): a compiled tree round
    builds its masks and positions from it, so no round's length is baked into a graph."""
    pool = _pooled(cache)
    return pool.lengths[0] if pool is not None else cache.layers[0].cumulative_length


def capacity(cache) -> int:
    """A static cache's positions (its fixed size)."""
    return cache.layers[0].max_cache_len


def set_length(cache, length: int | torch.Tensor) -> None:
    """Move a static cache's write position to `length` (a host integer, or a 0-d device tensor: no
    host read), in place: one fill for a pooled cache's every layer, else one per layer."""
    pool = _pooled(cache)
    held = [pool.lengths] if pool is not None else [layer.cumulative_length for layer in cache.layers if layer.is_initialized]
    for tensor in held:
        tensor.fill_(length.to(tensor.device) if isinstance(length, torch.Tensor) else length)


def move_positions(cache, source: torch.Tensor, dest: torch.Tensor) -> None:
    """Copy every layer's K/V at positions `source` (S,) to positions `dest` (S,) of a static cache
    (a tree round's accepted path, from where its nodes were written to contiguous positions): one
    gather and one copy per pooled tensor (per layer tensor otherwise). The gather comes first, so
    overlapping positions are read before they are written."""
    pool = _pooled(cache)
    if pool is not None:
        source, dest = source.to(pool.keys.device), dest.to(pool.keys.device)
        for tensor in (pool.keys, pool.values):
            tensor.index_copy_(3, dest, tensor.index_select(3, source))
        return
    for layer in cache.layers:
        if not layer.is_initialized:
            continue
        src, dst = source.to(layer.keys.device), dest.to(layer.keys.device)  # layers split over devices
        for tensor in (layer.keys, layer.values):
            tensor.index_copy_(2, dst, tensor.index_select(2, src))
