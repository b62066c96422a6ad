"""The shipped tiny preset: loads through the same code as Hub models and runs the demo offline."""

import json
from pathlib import Path

import torch

import qwen3_14b_speculative_demo as demo
from c2c.core.fuser import KVShape
from c2c.app.loading import eos_token_ids, load_config, load_model, load_tokenizer, resolve_fuser
from c2c.app.presets import PRESET_ROOT, PRESETS

TINY = PRESET_ROOT / "tiny"


def test_shipped_files_are_small_and_complete():
    files = [p for p in TINY.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 25 * 2**20
    for name in ("target", "draft"):
        assert (TINY / name / "config.json").is_file() and (TINY / name / "model.safetensors").is_file()
        assert (TINY / name / "tokenizer.json").is_file()
    assert (TINY / "fuser" / "final" / "projector_config.json").is_file()
    assert (TINY / "heldout.txt").is_file() and (TINY / "prompts.txt").is_file()


def test_shipped_models_load_like_hub_models_and_fit_the_fuser():
    preset = PRESETS["tiny"]
    target_cfg, draft_cfg = load_config(preset["teacher_model"], "target"), load_config(preset["base_model"], "draft")
    assert target_cfg.model_type == draft_cfg.model_type == "qwen3"
    target = load_model(preset["teacher_model"], "target", torch.float32, torch.device("cpu"))
    tok = load_tokenizer(preset["teacher_model"])
    assert tok.chat_template and len(eos_token_ids(target, tok)) == 2
    assert sum(p.numel() for p in target.parameters()) > 1_000_000
    draft = load_model(preset["base_model"], "draft", torch.float32, torch.device("cpu"))
    assert sum(p.numel() for p in draft.parameters()) < 1_000_000
    assert KVShape.of(draft_cfg) != KVShape.of(target_cfg)
    assert resolve_fuser(preset["fuser_checkpoint"], explicit=True).path == Path(preset["fuser_checkpoint"])


def test_heldout_plays_never_reach_the_training_split_and_prompts_come_from_them(tmp_path):
    """The build's split, on a stand-in corpus (the real one is not shipped): every speech of a held-out
    play lands in the held-out list and none in training; the shipped prompts are held-out lines."""
    import sys

    sys.path.insert(0, str(PRESET_ROOT))
    import build_tiny

    speech = "FIRST LINE OF A SPEECH SPOKEN BY {who}\nand then a second line that is long enough to keep it whole"
    for play in (*build_tiny.HELDOUT_PLAYS, "macbeth", "othello"):
        (tmp_path / f"{play}_gut.txt").write_text("\n\n".join(speech.format(who=f"{play} {i}") for i in range(3)))
    train, held = build_tiny.load_splits(tmp_path)
    assert len(held) == 3 * len(build_tiny.HELDOUT_PLAYS) and len(train) == 6
    assert all(any(p in b for p in build_tiny.HELDOUT_PLAYS) for b in held)
    assert not any(any(p in b for p in build_tiny.HELDOUT_PLAYS) for b in train)
    prompts = [line for line in (TINY / "prompts.txt").read_text(encoding="utf-8").splitlines() if line and not line.startswith("#")]
    heldout_lines = set((TINY / "heldout.txt").read_text(encoding="utf-8").splitlines())
    assert len(prompts) == 7 and all(p in heldout_lines for p in prompts)
    assert json.loads((TINY / "build_info.json").read_text())["tokens"]["heldout"] > 0


def test_demo_preset_tiny_runs_offline_with_fusion(tmp_path):
    out = tmp_path / "out"
    assert demo.main(["--preset", "tiny", "--max_new_tokens", "24", "--save_results", "--output_dir", str(out), "--lang", "en"]) == 0
    data = json.loads(next(out.glob("results_*.json")).read_text(encoding="utf-8"))
    assert data["config"]["fusion"]["enabled"] is True and data["config"]["device"] == "cpu"
    assert data["config"]["dtype"] == "float32" and len(data["prompts"]) == 7
    assert all(p["comparison"]["outputs_match"] for p in data["prompts"])
