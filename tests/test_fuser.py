"""C2CProjector compatibility with the released checkpoints, the official layout, and fuser resolution."""

import json

import pytest
import torch

from c2c.core.fuser import C2CFuser, C2CProjector, FuserError, KVShape, count_parameters, last_aligned_map, load_fuser, save_fuser
from c2c.app.loading import resolve_fuser

QWEN3_0_6B = KVShape(28, 8, 128)
QWEN3_14B = KVShape(40, 8, 128)


def meta_projector(**kw) -> C2CProjector:
    with torch.device("meta"):
        return C2CProjector(**kw)


def test_projector_for_qwen3_0_6b_from_qwen3_14b_has_the_official_names_shapes_and_size():
    p = meta_projector(source_dim=128, target_dim=128, source_num_heads=8, target_num_heads=8)
    state = p.state_dict()
    assert len(state) == 33
    assert count_parameters(p) == 18_901_010
    H, a, b = 1024, 1024, 1024
    expected = {"gate_temperature": ()}
    for k in ("key", "value"):
        expected |= {
            f"{k}_gate_logit": (),
            f"{k}_in.weight": (H, a + b), f"{k}_in.bias": (H,),
            f"{k}_mlp1.blocks.0.norm.weight": (H,), f"{k}_mlp1.blocks.0.w1.weight": (1024, H), f"{k}_mlp1.blocks.0.w2.weight": (H, 1024),
            f"{k}_scalar_mlp2.blocks.0.norm.weight": (H,), f"{k}_scalar_mlp2.blocks.0.w1.weight": (H, H),
            f"{k}_scalar_mlp2.blocks.0.w2.weight": (H, H),
            f"{k}_scalar_head.weight": (8, H), f"{k}_scalar_head.bias": (8,),
            f"{k}_proj_mlp2.blocks.0.norm.weight": (H,), f"{k}_proj_mlp2.blocks.0.w1.weight": (1024, H),
            f"{k}_proj_mlp2.blocks.0.w2.weight": (H, 1024),
            f"{k}_proj_out.weight": (b, H), f"{k}_proj_out.bias": (b,),
        }
    assert {name: tuple(t.shape) for name, t in state.items()} == expected


def test_projector_for_qwen2_5_0_5b_sharer_matches_the_published_count():
    p = meta_projector(source_dim=64, target_dim=128, source_num_heads=2, target_num_heads=8)
    assert count_parameters(p) == 17_066_002


def test_last_aligned_layer_maps():
    assert last_aligned_map(28, 40) == {t: t + 12 for t in range(28)}
    assert last_aligned_map(28, 36) == {t: t + 8 for t in range(28)}
    assert last_aligned_map(4, 2) == {0: 0, 1: 0, 2: 0, 3: 1}


def small_projector(**kw) -> C2CProjector:
    torch.manual_seed(0)
    args = dict(source_dim=4, target_dim=8, source_num_heads=2, target_num_heads=1, hidden_dim=16, intermediate_dim=12, dtype=torch.float32)
    return C2CProjector(**(args | kw)).eval()


def test_inference_math_hard_gate_and_weighted_projection():
    p = small_projector()
    sk, sv = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)
    tk, tv = torch.randn(1, 1, 5, 8), torch.randn(1, 1, 5, 8)
    with torch.no_grad():
        p.key_gate_logit.fill_(-0.5)
        p.value_gate_logit.fill_(-0.5)
        k, v = p(sk, sv, tk, tv)
        assert torch.equal(k, tk) and torch.equal(v, tv)  # closed gate: the draft keeps its own K/V
        p.key_gate_logit.fill_(0.5)
        k, _ = p(sk, sv, tk, tv)
        x = torch.cat([sk.permute(0, 2, 1, 3).reshape(1, 5, 8), tk.permute(0, 2, 1, 3).reshape(1, 5, 8)], -1)
        h = p.key_mlp1(p.key_in(x))
        proj = p.key_proj_out(p.key_proj_mlp2(h)).view(1, 5, 1, 8).permute(0, 2, 1, 3)
        alpha = torch.sigmoid(p.key_scalar_head(p.key_scalar_mlp2(h))).permute(0, 2, 1).unsqueeze(-1)
        assert torch.allclose(k, tk + alpha * proj, atol=1e-6)


def test_zero_init_projection_is_the_identity_even_with_open_gates():
    p = small_projector(zero_init=True)
    with torch.no_grad():
        p.key_gate_logit.fill_(1.0)
        tk = torch.randn(1, 1, 3, 8)
        k, _ = p(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4), tk, tk)
    assert torch.equal(k, tk)


def test_official_layout_round_trip(tmp_path, draft, target, fuser):
    save_fuser(fuser, tmp_path / "pair", config={"model": {"base_model": "d", "teacher_model": "t"}})
    final = tmp_path / "pair" / "final"
    meta = json.loads((final / "projector_0.json").read_text())
    assert meta["class"] == "C2CProjector"
    assert meta["init_args"]["dtype"] == {"__type__": "torch.dtype", "value": "float32"}
    layer_map = json.loads((final / "projector_config.json").read_text())
    assert layer_map == {"0": {"1": {"0": [[2, 0]], "1": [[3, 1]]}}}
    raw = torch.load(final / "projector_1.pt", weights_only=True)
    assert set(raw) == set(fuser.projectors[1].state_dict())
    loaded = load_fuser(tmp_path / "pair", KVShape.of(draft.config), KVShape.of(target.config))
    assert loaded.layer_map == fuser.layer_map
    for a, b in zip(loaded.projectors, fuser.projectors):
        for (na, ta), (nb, tb) in zip(a.state_dict().items(), b.state_dict().items()):
            assert na == nb and torch.equal(ta, tb)


def test_fuser_for_other_models_is_a_clear_error_naming_both_shapes(tmp_path, draft, target, fuser):
    save_fuser(fuser, tmp_path / "pair")
    with pytest.raises(FuserError, match=r"draft: 28 layers x 8 KV heads x head_dim 128.*target: 40 layers") as e:
        load_fuser(tmp_path / "pair", QWEN3_0_6B, QWEN3_14B)
    assert "2 heads x 16 -> 1 heads x 32" in str(e.value) and "8 x 128 -> 8 x 128" in str(e.value)
    swapped = KVShape.of(draft.config), KVShape(1, 2, 16)  # target with too few layers for the map
    with pytest.raises(FuserError, match="reads target layer"):
        load_fuser(tmp_path / "pair", *swapped)


def test_strict_loading_rejects_a_tampered_state_dict(tmp_path, draft, target, fuser):
    final = save_fuser(fuser, tmp_path / "pair")
    state = torch.load(final / "projector_0.pt", weights_only=True)
    state["key_extra.weight"] = torch.zeros(1)
    torch.save(state, final / "projector_0.pt")
    with pytest.raises(FuserError, match="state dict does not match"):
        load_fuser(tmp_path / "pair", KVShape.of(draft.config), KVShape.of(target.config))


def test_folder_without_projectors_is_an_error(tmp_path):
    with pytest.raises(FuserError, match="not a C2C fuser folder"):
        load_fuser(tmp_path, QWEN3_0_6B, QWEN3_14B)


def test_create_uses_one_projector_per_draft_layer_and_the_last_aligned_map():
    with torch.device("meta"):
        f = C2CFuser.create(KVShape(3, 1, 8), KVShape(5, 2, 4), hidden_dim=16, intermediate_dim=16)
    assert len(f.projectors) == 3 and f.layer_map == {0: (2, 0), 1: (3, 1), 2: (4, 2)}


class TestResolution:
    def test_none_turns_fusion_off(self):
        choice = resolve_fuser("none", explicit=True)
        assert choice.path is None and "disabled" in choice.reason

    def test_existing_path_then_output_fusers(self, tmp_path, fuser):
        save_fuser(fuser, tmp_path / "fusers" / "my_pair")
        assert resolve_fuser(str(tmp_path / "fusers" / "my_pair"), True).path == tmp_path / "fusers" / "my_pair"
        assert resolve_fuser("my_pair", True, search_dir=tmp_path / "fusers").path == tmp_path / "fusers" / "my_pair"

    def test_default_not_found_warns_and_records_why(self, tmp_path):
        choice = resolve_fuser("qwen3_0.6b+qwen3_14b_Fuser", explicit=False, search_dir=tmp_path)
        assert choice.path is None
        assert "no public C2C fuser exists for Qwen3-14B" in choice.reason and "qwen3_0.6b+qwen3_4b_Fuser" in choice.reason

    def test_explicit_name_not_found_is_an_error(self, tmp_path):
        with pytest.raises(FuserError, match="not found"):
            resolve_fuser("no_such_pair_Fuser", explicit=True, search_dir=tmp_path)

    def test_existing_folder_without_projectors_is_an_error(self, tmp_path):
        (tmp_path / "empty").mkdir()
        with pytest.raises(FuserError, match="holds no projector files"):
            resolve_fuser(str(tmp_path / "empty"), explicit=True)


def c2c_reference(p: C2CProjector, kind: str, source: torch.Tensor, target: torch.Tensor, bf16_product: bool = False) -> torch.Tensor:
    """C2C's published inference math, written out: steps 1-5 in the projector dtype with
    torch.nn.RMSNorm, the hard gate a float32 (1, 1, 1, 1) tensor, so g * alpha * P and the sum are float32."""
    B, Ht, N, Dt = target.shape
    x = torch.cat([source.transpose(1, 2).reshape(B, N, -1), target.transpose(1, 2).reshape(B, N, -1)], dim=-1)

    def block(prefix: str, z: torch.Tensor) -> torch.Tensor:
        sd = p.state_dict()
        norm = torch.nn.functional.rms_norm(z, (z.shape[-1],), sd[f"{prefix}.norm.weight"], 1e-6)
        return z + torch.nn.functional.linear(torch.nn.functional.gelu(torch.nn.functional.linear(norm, sd[f"{prefix}.w1.weight"])), sd[f"{prefix}.w2.weight"])

    sd = p.state_dict()
    h = block(f"{kind}_mlp1.blocks.0", torch.nn.functional.linear(x, sd[f"{kind}_in.weight"], sd[f"{kind}_in.bias"]))
    z = h
    for j in range(p.init_args["num_layers"] - 2):
        z = block(f"{kind}_proj_mlp2.blocks.{j}", z)
    proj = torch.nn.functional.linear(z, sd[f"{kind}_proj_out.weight"], sd[f"{kind}_proj_out.bias"]).view(B, N, Ht, Dt).transpose(1, 2)
    scalar = torch.nn.functional.linear(block(f"{kind}_scalar_mlp2.blocks.0", h), sd[f"{kind}_scalar_head.weight"], sd[f"{kind}_scalar_head.bias"])
    weight = torch.sigmoid(scalar).permute(0, 2, 1).unsqueeze(-1)  # (B, Ht, N, 1)
    if bf16_product:  # our numerics before the fix: a 0-d bf16 gate keeps the product in bf16
        gate = (sd[f"{kind}_gate_logit"] > 0).to(target.dtype)
        return (target.float() + (gate * weight * proj).float()).to(target.dtype)
    gate = (sd[f"{kind}_gate_logit"].view(1, 1, 1, 1) > 0).float()
    return (target + gate * weight * proj).to(target.dtype)


def test_bf16_fused_kv_is_bit_identical_to_c2c_math():
    torch.manual_seed(1)
    p = C2CProjector(source_dim=16, target_dim=8, source_num_heads=2, target_num_heads=4, hidden_dim=64,
                     intermediate_dim=48, num_layers=4).to(torch.bfloat16).eval()
    p.key_gate_logit.data.fill_(1.0)
    p.value_gate_logit.data.fill_(1.0)
    sk, sv = torch.randn(2, 2, 9, 16).bfloat16(), torch.randn(2, 2, 9, 16).bfloat16()
    tk, tv = torch.randn(2, 4, 9, 8).bfloat16(), torch.randn(2, 4, 9, 8).bfloat16()
    with torch.no_grad():
        k, v = p(sk, sv, tk, tv)
        assert k.dtype == torch.bfloat16
        assert torch.equal(k, c2c_reference(p, "key", sk, tk)) and torch.equal(v, c2c_reference(p, "value", sv, tv))
        assert not torch.equal(k, c2c_reference(p, "key", sk, tk, bf16_product=True))  # the test tells the two apart


def test_projector_json_defaults_follow_c2c(tmp_path):
    args = {"source_dim": 4, "target_dim": 8, "hidden_dim": 16, "intermediate_dim": 12}
    with torch.device("meta"):
        p = C2CProjector(**args)
    assert p.init_args["dtype"] == torch.float32 and p.source_num_heads == 1 and p.target_num_heads == 1
    with pytest.raises(TypeError):
        C2CProjector(**args, surprise=1)
