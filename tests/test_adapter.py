"""The optional draft adapter (trained jointly with the projectors): hooks vs merged weights, files,
the trainer (gradients through the draft's prefix, the adapter-alone arm) and the runner (fused runs
use the adapted draft, unfused runs the plain one, every output still the target's)."""

import json
import shutil

import pytest
import torch

from c2c.app import runner

from c2c.tools import train_fuser, train_objective, training
from c2c.core.adapter import DraftAdapter, adapted_linears, find_adapter, load_adapter
from c2c.errors import UserInputError
from tests.test_training import config, new_trainer


def randomize(adapter: DraftAdapter, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_hooks_merged_weights_and_identity_start_agree(draft, kind):
    ids = [3, 17, 29, 5, 88, 41]
    plain = logits(draft, ids)
    adapter = DraftAdapter.create(draft, kind, rank=4)
    assert set(adapter.names) == set(adapted_linears(draft)) and any("self_attn.q_proj" in n for n in adapter.names)
    adapter.attach(draft)
    try:
        assert torch.allclose(logits(draft, ids), plain, atol=1e-6)  # starts as the identity
        randomize(adapter)
        hooked = logits(draft, ids)
        assert not torch.allclose(hooked, plain, atol=1e-3)
        adapter.enabled = False
        assert torch.equal(logits(draft, ids), plain)
        adapter.enabled = True
    finally:
        adapter.detach()
    assert torch.equal(logits(draft, ids), plain)  # detached: the draft is untouched
    merged = adapter.merged_copy(draft)
    assert torch.allclose(logits(merged, ids), hooked, atol=1e-5)
    assert torch.equal(logits(draft, ids), plain)  # merging copies


def test_files_round_trip_and_bad_files_name_the_fix(draft, tmp_path):
    adapter = DraftAdapter.create(draft, "lora", rank=3)
    randomize(adapter, 1)
    adapter.save(tmp_path / "fz" / "draft_adapter")
    assert find_adapter(tmp_path / "fz") == tmp_path / "fz" / "draft_adapter"
    assert find_adapter(tmp_path / "fz" / "final") == tmp_path / "fz" / "draft_adapter"
    assert find_adapter(tmp_path) is None and find_adapter(None) is None
    loaded = load_adapter(tmp_path / "fz" / "draft_adapter", draft)
    assert loaded.kind == "lora" and loaded.rank == 3
    for name in adapter.names:
        assert torch.allclose(loaded.delta(name), adapter.delta(name))
    meta = json.loads((tmp_path / "fz" / "draft_adapter" / "adapter.json").read_text())
    meta["modules"] = ["model.layers.9.self_attn.q_proj"]
    (tmp_path / "fz" / "draft_adapter" / "adapter.json").write_text(json.dumps(meta))
    with pytest.raises(UserInputError, match="another draft"):
        load_adapter(tmp_path / "fz" / "draft_adapter", draft)
    (tmp_path / "fz" / "draft_adapter" / "adapter.safetensors").write_bytes(b"not a file")
    meta["modules"] = adapter.names
    (tmp_path / "fz" / "draft_adapter" / "adapter.json").write_text(json.dumps(meta))
    with pytest.raises(UserInputError, match="cannot be read"):
        load_adapter(tmp_path / "fz" / "draft_adapter", draft)


def test_the_draft_prefix_carries_gradients_when_the_draft_trains(tmp_path, target, draft, windows):
    trainer = new_trainer(config(tmp_path, draft_adapter="full"), target, draft, windows)
    try:
        x, m, s = windows[:2], 12, 3
        grads = {}
        for draft_grad in (False, True):
            trainer.optimizer.zero_grad(set_to_none=True)
            t, d = train_objective.fused_suffix_logits(trainer.fuser, target, draft, x, m, s, draft_grad=draft_grad)
            train_objective.loss_fn(t, d, "kl").backward()
            grads[draft_grad] = torch.cat([p.grad.flatten() for p in trainer.adapter.parameters()])
        # with the prefix in the graph, the adapter also learns from what it writes into the fused positions
        assert not torch.allclose(grads[True], grads[False])
        assert all(p.grad is None for p in draft.parameters())  # the draft's own weights stay frozen
    finally:
        trainer.adapter.detach()


def test_joint_training_moves_adapter_and_projectors_and_alone_arm_only_the_adapter(tmp_path, target, draft, windows):
    for fusion in (True, False):
        trainer = new_trainer(config(tmp_path, draft_adapter="lora", adapter_rank=4, fusion=fusion), target, draft, windows)
        try:
            proj = [p.detach().clone() for p in trainer.fuser.parameters()]
            adapt = [p.detach().clone() for p in trainer.adapter.parameters()]
            before = trainer.evaluate()
            for _ in range(5):
                trainer.train_step()
            after = trainer.evaluate()
            moved = any(not torch.equal(a, b) for a, b in zip(proj, trainer.fuser.parameters()))
            assert moved == fusion
            assert any(not torch.equal(a, b) for a, b in zip(adapt, trainer.adapter.parameters()))
            assert "agreement_adapter_only" in after
            assert after["agreement_unfused"] == before["agreement_unfused"]  # the baseline is the plain draft
            if not fusion:
                assert after["agreement_fused"] == after["agreement_adapter_only"]
        finally:
            trainer.adapter.detach()


def test_no_fusion_without_an_adapter_is_refused():
    with pytest.raises(UserInputError, match="--draft_adapter"):
        training.TrainConfig("d", "t", "x", "o", fusion=False)
    with pytest.raises(UserInputError, match="none, lora or full"):
        training.TrainConfig("d", "t", "x", "o", draft_adapter="big")


@pytest.fixture(scope="module")
def adapted_fuser(saved_models, tmp_path_factory):
    """A fuser folder with a draft adapter, written by the trainer's command line."""
    root = tmp_path_factory.mktemp("adapted")
    data = root / "data.txt"
    data.write_text(" ".join(["the quick brown fox jumps over the lazy dog"] * 200), encoding="utf-8")
    out = root / "fuser"
    code = train_fuser.main([
        "--base_model", str(saved_models / "draft"), "--teacher_model", str(saved_models / "target"), "--data", str(data),
        "--output_dir", str(out), "--batch_size", "2", "--seq_len", "24", "--hidden_dim", "16", "--intermediate_dim", "16",
        "--eval_every", "3", "--save_every", "100", "--steps", "3", "--device", "cpu", "--no_progress",
        "--draft_adapter", "lora", "--adapter_rank", "2", "--adapter_lr", "0.05",
    ])
    assert code == 0
    return out


def test_command_line_writes_the_adapter_beside_the_official_layout(adapted_fuser, saved_models, tmp_path):
    assert (adapted_fuser / "final" / "projector_0.pt").is_file()
    meta = json.loads((adapted_fuser / "draft_adapter" / "adapter.json").read_text())
    assert meta["kind"] == "lora" and meta["rank"] == 2 and meta["trained_with_fusion"] is True
    assert not (adapted_fuser / "final" / "adapter.json").exists()  # C2C's folder holds only its own files


def test_fused_runs_use_the_adapted_draft_and_stay_lossless(adapted_fuser, saved_models):
    cfg = runner.RunConfig(draft_model=str(saved_models / "draft"), target_model=str(saved_models / "target"),
                           fuser_checkpoint=str(adapted_fuser), fuser_explicit=True, device="cpu", dtype="float32",
                           max_new_tokens=24, gamma=3)
    session = runner.prepare(cfg, log=lambda *_: None)
    assert session.fused_draft is not None and session.fusion["draft_adapter"]["kind"] == "lora"
    assert runner.decoder(session).draft is session.fused_draft
    unfused = cfg.spec.__class__(3, 24, False, False)
    assert runner.decoder(session, unfused).draft is session.draft
    changed = [n for n, m in adapted_linears(session.draft).items()
               if not torch.equal(m.weight, adapted_linears(session.fused_draft)[n].weight)]
    assert changed  # the trained adapter really changes the fused runs' draft
    for prompt in ("hello there", "What is 1 + 1?"):
        entry = runner.run_prompt(session, prompt, run_standard=True)
        assert entry["speculative"]["output_ids"] == entry["standard"]["output_ids"]


def test_adapter_alone_arm_writes_no_fuser(saved_models, tmp_path, capsys):
    data = tmp_path / "data.txt"
    data.write_text(" ".join(["a b c d e f g"] * 200), encoding="utf-8")
    common = ["--base_model", str(saved_models / "draft"), "--teacher_model", str(saved_models / "target"),
              "--data", str(data), "--output_dir", str(tmp_path / "o"), "--batch_size", "2", "--seq_len", "24",
              "--eval_every", "2", "--steps", "2", "--device", "cpu", "--no_progress", "--no-fusion"]
    assert train_fuser.main(common) == 2 and "--draft_adapter" in capsys.readouterr().err
    assert train_fuser.main(common + ["--draft_adapter", "full"]) == 0
    assert (tmp_path / "o" / "draft_adapter" / "adapter.safetensors").is_file()
    assert not (tmp_path / "o" / "final").exists()
    shutil.rmtree(tmp_path / "o")


def test_compiled_steps_serve_the_plain_and_the_adapted_draft_side_by_side(target, draft, fuser):
    """The benchmark alternates unfused (plain draft) and fused (adapted copy) modes on one CompiledSteps:
    each draft gets its own pooled cache and both stay lossless."""
    from c2c.core.engine import CompiledSteps, SpecConfig, SpeculativeDecoder, standard_generate
    from c2c.core.sampling import SamplingConfig

    adapter = DraftAdapter.create(draft, "lora", rank=4)
    randomize(adapter, 3)
    adapted = adapter.merged_copy(draft)
    compiled, prompt = CompiledSteps(backend="eager"), [5, 9, 33, 100, 7, 61, 2, 44, 3]
    with torch.inference_mode():
        reference = standard_generate(target, prompt, 30, SamplingConfig(), set()).output_ids
        runs = [SpeculativeDecoder(target, d, SpecConfig(3, 30), SamplingConfig(), set(), fuser=f, compiled=compiled)
                .generate(prompt) for d, f in ((draft, None), (adapted, fuser), (draft, None), (adapted, fuser))]
    assert all(r.output_ids == reference for r in runs)
    assert runs[0].counters.total_accepted == runs[2].counters.total_accepted
    assert runs[1].counters.total_accepted == runs[3].counters.total_accepted
    drafts = {model for model, _ in compiled._caches.values() if model is draft or model is adapted}
    assert len(drafts) == 2  # one pooled cache per draft


def test_an_adapter_loads_only_onto_the_draft_it_was_trained_on(draft, tmp_path):
    """adapter.json records the base draft's fingerprint: the same draft (also cast to bfloat16 and back)
    loads; a draft of the same shapes with other weights (a retrained or merged copy) is an error
    naming the draft it was trained on; adapters saved before fingerprints load as before."""
    import copy

    adapter = DraftAdapter.create(draft, "lora", rank=3)
    randomize(adapter, 2)
    folder = adapter.save(tmp_path / "draft_adapter", extra={"draft_model": "the/base-draft"}, base=draft)
    assert len(json.loads((folder / "adapter.json").read_text())["base_fingerprint"]) == len(adapter.names)
    load_adapter(folder, draft)
    load_adapter(folder, copy.deepcopy(draft).to(torch.bfloat16).float())  # rounding is not another draft
    other = adapter.merged_copy(draft)  # e.g. a PARD export of this adapter: same shapes, other weights
    with pytest.raises(UserInputError, match="trained on the/base-draft, and this draft's weights differ"):
        load_adapter(folder, other)
    meta = json.loads((folder / "adapter.json").read_text())
    del meta["base_fingerprint"]
    (folder / "adapter.json").write_text(json.dumps(meta))
    load_adapter(folder, other)  # no record: no check


def test_the_fingerprint_samples_exact_evenly_spaced_entries():
    """Indices by integer arithmetic (a float32 linspace rounds differently past 65,536 entries, and may
    differ between devices): the number is the hand-computed one for a large layer and a one-weight one."""
    from c2c.core.adapter import FINGERPRINT_SAMPLES, fingerprint

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([torch.nn.Linear(1000, 300, bias=False), torch.nn.Linear(1, 1, bias=False)])

    torch.manual_seed(0)
    model = Model()
    for name, linear in (("layers.0", model.layers[0]), ("layers.1", model.layers[1])):
        flat = linear.weight.detach().reshape(-1)
        count = min(flat.numel(), FINGERPRINT_SAMPLES)
        index = [i * (flat.numel() - 1) // max(count - 1, 1) for i in range(count)]
        sample = flat[index]
        signs = torch.randint(0, 2, sample.shape, generator=torch.Generator().manual_seed(0)).float() * 2 - 1
        assert fingerprint(model, [name]) == [round(float((sample * signs).sum() / sample.norm()), 6)], name


def test_a_damaged_fingerprint_record_is_one_error(draft, tmp_path):
    adapter = DraftAdapter.create(draft, "lora", rank=2)
    folder = adapter.save(tmp_path / "draft_adapter", base=draft)
    meta = json.loads((folder / "adapter.json").read_text())
    meta["base_fingerprint"] = meta["base_fingerprint"][:1]
    (folder / "adapter.json").write_text(json.dumps(meta))
    with pytest.raises(UserInputError, match="base_fingerprint has 1 numbers"):
        load_adapter(folder, draft)
