"""Fusion batched across layers: the projectors stacked per parameter (K and V paths as one batch)
give the per-layer C2C path's numbers, hold the weights once, and a fusion call's matrix products do
not grow with the draft's layers."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from c2c.core import cache as kv
from c2c.core import engine
from c2c.app.api import SpeculativePipeline
from c2c.core.fuser import C2CFuser, KVShape, StackedProjectors, load_fuser, save_fuser
from tests import tiny

MATMULS = {"mm", "bmm", "addmm", "baddbmm", "matmul", "linear", "addbmm"}


class MatmulCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in MATMULS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def random_fuser(dtype, draft=KVShape(3, 2, 16), target=KVShape(5, 3, 24), num_layers=4, seed=0) -> C2CFuser:
    """A fuser with a layer-map offset (draft 3 layers <- target layers 2..4), unequal head counts and
    head dims, two residual blocks on the projection path, one projector's K gate closed."""
    torch.manual_seed(seed)
    fuser = C2CFuser.create(draft, target, hidden_dim=48, intermediate_dim=40, num_layers=num_layers, dtype=dtype)
    for i, p in enumerate(fuser.projectors):
        for name, q in p.named_parameters():
            if q.dim():
                torch.nn.init.normal_(q, std=0.2)
            else:
                q.data.fill_(-1.0 if (i, name) == (1, "key_gate_logit") else 1.0)
    return fuser.to(dtype).eval().requires_grad_(False)


def kv_inputs(fuser: C2CFuser, dtype, n_tokens=7, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    p = fuser.projectors[0]
    n = len(fuser.draft_layers)
    src = [torch.randn(n, batch, p.source_num_heads, n_tokens, p.source_dim, generator=g).to(dtype) for _ in range(2)]
    dst = [torch.randn(n, batch, p.target_num_heads, n_tokens, p.target_dim, generator=g).to(dtype) for _ in range(2)]
    return (*src, *dst)


def test_bf16_is_bit_identical_to_the_per_layer_path():
    fuser = random_fuser(torch.bfloat16)
    assert fuser.target_layers == (2, 3, 4)
    inputs = kv_inputs(fuser, torch.bfloat16)
    ref_k, ref_v = fuser.fuse_layers(*inputs)  # per layer, before stacking
    pack = fuser.batched()
    assert isinstance(pack, StackedProjectors)
    k, v = pack.fuse_layers(*inputs)
    assert k.dtype == v.dtype == torch.bfloat16
    assert torch.equal(k, ref_k) and torch.equal(v, ref_v)
    closed = inputs[2][1]  # draft layer 1's K path has its gate closed: its K passes through unchanged
    assert torch.equal(k[1], closed) and not torch.equal(v[1], inputs[3][1])


def test_float32_is_within_1e_6_of_the_per_layer_path():
    fuser = random_fuser(torch.float32)
    inputs = kv_inputs(fuser, torch.float32)
    ref_k, ref_v = fuser.fuse_layers(*inputs)
    k, v = fuser.batched().fuse_layers(*inputs)
    assert (k - ref_k).abs().max() <= 1e-6 and (v - ref_v).abs().max() <= 1e-6
    assert not torch.equal(k, inputs[2])  # fusion changed something


def test_each_layer_matches_c2c_projector_forward():
    """The batched path against the projector module itself, layer by layer (the C2C numerics)."""
    fuser = random_fuser(torch.bfloat16, num_layers=3)
    tk, tv, dk, dv = kv_inputs(fuser, torch.bfloat16)
    k, v = fuser.batched().fuse_layers(tk, tv, dk, dv)
    for i, (_, idx) in enumerate(fuser.layer_map.values()):
        rk, rv = fuser.projectors[idx](tk[i], tv[i], dk[i], dv[i])
        assert torch.equal(k[i], rk) and torch.equal(v[i], rv)


def test_weights_are_held_once_and_saved_in_the_official_layout(tmp_path):
    fuser = random_fuser(torch.bfloat16)
    before = {i: {k: t.clone() for k, t in p.state_dict().items()} for i, p in enumerate(fuser.projectors)}
    save_fuser(fuser, tmp_path / "before")
    pack = fuser.batched()
    stack_bytes = sum(s.untyped_storage().nbytes() for s in pack.stacks.values())
    param_bytes = sum(q.numel() * q.element_size() for q in fuser.parameters())
    assert stack_bytes == param_bytes  # every parameter lives in a stack, nothing twice
    storages = {q.untyped_storage().data_ptr() for q in fuser.parameters()}
    assert storages == {s.untyped_storage().data_ptr() for s in pack.stacks.values()}
    save_fuser(fuser, tmp_path / "after")
    for i in range(3):
        a = (tmp_path / "before" / "final" / f"projector_{i}.pt").stat().st_size
        b = (tmp_path / "after" / "final" / f"projector_{i}.pt").stat().st_size
        assert abs(a - b) < 64  # the slice is saved, not the whole stack behind it
    loaded = load_fuser(tmp_path / "after", KVShape(3, 2, 16), KVShape(5, 3, 24))
    for i, p in enumerate(loaded.projectors):
        state = p.state_dict()
        assert all(torch.equal(state[k], t) for k, t in before[i].items())
    # a change to a projector's parameter in place is seen by the stacks (they are the same memory)
    with torch.no_grad():
        fuser.projectors[1].key_gate_logit.fill_(2.0)
    assert pack.stacks["gate_logit"][1] == 2.0


def test_batched_falls_back_to_per_layer_where_stacking_does_not_apply():
    fuser = random_fuser(torch.float32)
    assert fuser.train().batched() is fuser  # training keeps the per-layer path
    fuser.eval()
    fuser.projectors[0].key_in.weight.requires_grad_(True)
    assert fuser.batched() is fuser
    fuser.requires_grad_(False)
    shared = C2CFuser(list(fuser.projectors), {0: (2, 0), 1: (3, 0), 2: (4, 2)}).eval()  # one projector, two layers
    assert shared.batched() is shared
    first = fuser.batched()
    assert isinstance(first, StackedProjectors) and fuser.batched() is first
    fuser.to(torch.float64)  # parameters re-allocated: the stacks are stale and are rebuilt
    second = fuser.batched()
    assert second is not first and second.stacks["in.weight"].dtype == torch.float64


def save_pair(root, draft_layers: int):
    """The tiny target and a draft of `draft_layers` layers on disk, with a fuser for them."""
    target, _ = tiny.build_pair()
    g = torch.Generator().manual_seed(5)
    shared = (target.model.embed_tokens.weight.clone(), target.lm_head.weight.clone())
    draft = tiny._build(tiny.tiny_config(draft_layers, 2, 1, 32), 7 + draft_layers, shared, damping=4.0)
    del g
    tok = tiny.build_tokenizer()
    for name, model in (("target", target), ("draft", draft)):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    save_fuser(tiny.open_fuser(target, draft), root / "fuser")
    return root


@pytest.mark.parametrize("draft_layers", [2, 12])
def test_matrix_products_per_fusion_call_do_not_grow_with_draft_layers(tmp_path, monkeypatch, draft_layers):
    """Through the public API with eager models: every fusion call (prompt and decode) runs the same
    few matrix products for a 2-layer and a 12-layer draft (9 with C2C's num_layers 3), and the
    output still equals the target's."""
    root = save_pair(tmp_path, draft_layers)
    counts = []
    real = engine.fuse_positions

    def counted(*args, **kwargs):
        with MatmulCounter() as counter:
            result = real(*args, **kwargs)
        counts.append(counter.count)
        return result

    monkeypatch.setattr(engine, "fuse_positions", counted)
    pipe = SpeculativePipeline.load(str(root / "draft"), str(root / "target"), fuser=str(root / "fuser"),
                                    device="cpu", dtype="float32")
    out = pipe.generate("The quick brown fox", max_new_tokens=24, gamma=3, compare=True)
    assert out.comparison["outputs_match"]
    assert len(counts) >= 3 and set(counts) == {9}


def test_pooled_static_cache_reads_and_writes_every_layer_in_one_op(target):
    cache = kv.new_cache(target, 32)
    pool = cache._c2c_pool
    assert pool.keys.shape[0] == 4 and all(layer.keys.data_ptr() == pool.keys[i].data_ptr() for i, layer in enumerate(cache.layers))
    with torch.inference_mode():
        kv.forward(target, torch.tensor([[5, 6, 7, 8, 9]]), cache, 0)
        assert kv.length(cache) == 5
        kv.crop(cache, 3)
        assert [int(layer.cumulative_length) for layer in cache.layers] == [3] * 4
        keys, values = kv.read_layers_at(cache, (1, 2, 3), torch.tensor([0, 2]))
        assert torch.equal(keys[1], cache.layers[2].keys[:, :, [0, 2]])
        kv.write_layers_at(cache, (1, 2, 3), torch.tensor([0, 2]), keys * 0 + 1, values)
        assert bool((cache.layers[3].keys[:, :, 2] == 1).all()) and not bool((cache.layers[0].keys[:, :, 2] == 1).all())
        kv.reset(cache)
        assert kv.length(cache) == 0 and not pool.keys.any()
