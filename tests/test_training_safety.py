"""The trainer loses nothing a user has, resumes only what it saved, and says how sure its engine
figure is (issue 27): every check before anything on disk changes, a folder cleared only when this
trainer wrote it, resume refused when a run-defining flag changed, per-prompt engine figures with a
paired bootstrap, whole conversations held out, varied batches on small data, and a fuser that
changes nothing skipped. Each test fails on the trainer as it was before."""

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from c2c.core import effect
from c2c.core.engine import SpecConfig, SpeculativeDecoder
from c2c.core.fuser import save_fuser
from c2c.core.sampling import SamplingConfig
from c2c.errors import UserInputError
from c2c.tools import chat_data, engine_eval, run_folder, train_data, train_fuser, training
from tests import test_training, test_training_scale, tiny


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes (folders as None)."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


@pytest.fixture
def no_step(monkeypatch):
    """A training step fails the test: the errors below must come before the first one."""
    def step(self):
        raise AssertionError("a training step ran")

    monkeypatch.setattr(training.FuserTrainer, "train_step", step)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A run of this trainer on the arith pair, 2 steps, as a user would have it (checkpoint at its end)."""
    out = tmp_path_factory.mktemp("runs") / "fuser"
    assert train_fuser.main(test_training_scale.arith_command(out, "--steps", "2", "--save_every", "2",
                                                              "--eval_every", "2")) == 0
    return out


def copy_of(folder: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "f"
    shutil.copytree(folder, dest)
    shutil.copy(folder.parent / "prompts.jsonl", tmp_path / "prompts.jsonl")  # the same data, moved: the same run
    return dest


def command(out: Path, *extra: str) -> list[str]:
    return test_training_scale.arith_command(out, *extra)


def refused(argv, capsys) -> str:
    rc = train_fuser.main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err
    return lines[0]


# ---------------------------------------------------------------- 1. validate, then touch


def test_a_mistyped_overwrite_run_keeps_every_byte(finished, tmp_path, capsys, no_step):
    out = copy_of(finished, tmp_path)
    before = snapshot(out)
    argv = test_training_scale.arith_command(out, "--overwrite")
    argv[argv.index("--data") + 1] += ".typo"
    assert "training data not found" in refused(argv, capsys)
    assert snapshot(out) == before


def test_overwrite_into_a_model_folder_is_refused(saved_models, tmp_path, capsys, no_step):
    model = tmp_path / "model"
    shutil.copytree(saved_models / "draft", model)
    before = snapshot(model)
    line = refused(test_training_scale.arith_command(model, "--overwrite"), capsys)
    assert "did not write" in line and run_folder.MARKER in line
    assert snapshot(model) == before


def test_overwrite_clears_only_what_the_trainer_wrote_after_every_check(finished, tmp_path, capsys):
    out = copy_of(finished, tmp_path)
    (out / "notes.txt").write_text("mine")
    assert train_fuser.main(command(out, "--overwrite", "--steps", "1")) == 0
    assert "removed the previous run's checkpoints/step_000002" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000001"]
    assert (out / "notes.txt").read_text() == "mine"  # not the trainer's: kept


@pytest.mark.parametrize("where", ["under_a_file", "final_is_a_file", "no_space"])
def test_an_output_folder_that_cannot_take_the_run_is_an_error_before_step_1(tmp_path, capsys, no_step, monkeypatch, where):
    argv, out = test_training_scale.arith_command(tmp_path / "f"), tmp_path / "f"
    if where == "under_a_file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "f"
        argv[argv.index("--output_dir") + 1] = str(out)
        expected = "is a file, not a folder"
    elif where == "final_is_a_file":
        out.mkdir()
        (out / run_folder.MARKER).write_text("{}")
        (out / "final").write_text("x")
        expected = "final is a file where the trainer writes a folder"
    else:
        monkeypatch.setattr(run_folder.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10, 10, 1000))
        expected = "GB free, a checkpoint and the final fuser need"
    before = snapshot(tmp_path)
    assert expected in refused(argv, capsys)
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------- 2. resume means resume


@pytest.mark.parametrize("flag, value, shown", [("--hidden_dim", "32", "--hidden_dim 16 in the checkpoint, 32 now"),
                                                ("--lr", "0.02", "--lr 0.01 in the checkpoint, 0.02 now"),
                                                ("--batch_size", "2", "--batch_size 4 in the checkpoint, 2 now")])
def test_resume_with_a_changed_run_flag_is_an_error_naming_both_values(finished, tmp_path, capsys, no_step, flag, value, shown):
    out = copy_of(finished, tmp_path)
    before = snapshot(out)
    line = refused(command(out, "--steps", "4", "--resume", flag, value), capsys)
    assert shown in line and "--steps" in line  # and which flags may change
    assert snapshot(out) == before


def test_resume_of_a_finished_run_is_an_error_and_extends_it_with_more_steps(finished, tmp_path, capsys):
    out = copy_of(finished, tmp_path)
    before = snapshot(out)
    assert "--steps 2 is not past the checkpoint's step 2" in refused(
        command(out, "--steps", "2", "--resume"), capsys)
    assert snapshot(out) == before
    # the last step was checkpointed: more steps continue from it (safe flags may change), not from step 0
    assert train_fuser.main(command(out, "--steps", "3", "--resume", "--eval_every", "1",
                                                              "--save_every", "5")) == 0
    assert "(step 2)" in capsys.readouterr().err
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [2, 3]


def test_resume_of_a_run_without_a_checkpoint_is_an_error(finished, tmp_path, capsys, no_step):
    out = copy_of(finished, tmp_path)
    shutil.rmtree(out / "checkpoints")
    before = snapshot(out)
    assert "holds no checkpoint to continue" in refused(command(out, "--steps", "4", "--resume"),
                                                        capsys)
    assert snapshot(out) == before


def test_overwrite_and_resume_together_is_an_error(tmp_path):
    with pytest.raises(UserInputError, match="pass one of them"):
        run_folder.check(training.TrainConfig("d", "t", "x", str(tmp_path / "f")), overwrite=True, resume=True)
    assert not (tmp_path / "f").exists()


def test_a_flag_added_later_defines_the_run_unless_named_resumable():
    cfg = training.TrainConfig("d", "t", "x", "o")
    flags = run_folder.run_flags(cfg)
    assert "hidden_dim" in flags and "lr" in flags and "data" in flags and "steps" not in flags
    assert run_folder.changed_flags(flags, cfg) == []
    del flags["length_pool"]  # a checkpoint written before the flag existed: taken at its default
    assert run_folder.changed_flags(flags, cfg) == []
    assert run_folder.changed_flags(flags, training.TrainConfig("d", "t", "x", "o", length_pool=3)) == [
        "--length_pool 16 in the checkpoint, 3 now"]


# ---------------------------------------------------------------- 3. the engine figure and its uncertainty


def counts(per_call: list[float], tokens: int = 60) -> engine_eval.Counts:
    return engine_eval.Counts(tuple([tokens] * len(per_call)), tuple(round(tokens / r) for r in per_call))


def test_the_verdict_warns_only_when_the_interval_excludes_1():
    rng = random.Random(0)
    plain = [rng.uniform(1.5, 2.5) for _ in range(40)]
    worse = engine_eval.figures(counts([r * rng.uniform(0.8, 0.9) for r in plain]), counts(plain))
    assert worse["engine_ratio_high"] < 1 and worse["engine_losses"] > 30
    assert "fusion lowers decoding" in engine_eval.verdict(worse)[0] and engine_eval.verdict(worse)[1]
    # a small difference, either way per prompt: 2.174 vs 2.280 is not a verdict
    noisy = engine_eval.figures(counts([r * rng.uniform(0.7, 1.3) for r in plain]), counts(plain))
    assert noisy["engine_ratio_low"] < 1 < noisy["engine_ratio_high"]
    said, warning = engine_eval.verdict(noisy)
    assert "cannot tell" in said and warning is None
    few = engine_eval.figures(counts([1.0, 1.0, 1.0]), counts([2.0, 2.0, 2.0]))
    said, warning = engine_eval.verdict(few)
    assert "too few held-out prompts (3" in said and warning is None


def test_the_summary_warns_on_a_difference_the_prompts_cannot_tell():
    cfg = training.TrainConfig("d", "t", "x", "o")
    last = {"agreement_fused": 0.68, "agreement_unfused": 0.66, "heldout_tokens": 2048, "heldout_sequences": 40,
            "won": 129, "lost": 87, "open_gates": 3, "gates": 4, "tokens_per_call_fused": 2.174,
            "tokens_per_call_unfused": 2.280, "engine_prompts": 16, "engine_wins": 6, "engine_losses": 8,
            "engine_ratio": 0.954, "engine_ratio_low": 0.90, "engine_ratio_high": 1.02}
    lines, warnings = train_fuser.summary(cfg, "out/final", last)
    assert "2.174 tokens per target call fused vs 2.280 unfused, better on 6 prompts, worse on 8" in lines[1]
    assert "cannot tell" in lines[1] and warnings == []
    lines, warnings = train_fuser.summary(cfg, "out/final", last | {"engine_ratio_high": 0.97})
    assert any("fusion lowers the engine's tokens per target call on 16 held-out prompts" in w for w in warnings)


def test_the_first_evaluation_decodes_as_many_prompts_as_the_time_allows(target, draft, fuser):
    prompts = [[5, 9, 33, 7, k] for k in range(6)]
    args = (fuser, target, draft, prompts, 3, 8, set())
    fused, plain = engine_eval.first_counts(*args, seconds=1e-9)
    assert len(fused) == len(plain) == 1  # at least one prompt
    fused, plain = engine_eval.first_counts(*args, seconds=1e9)
    assert len(fused) == 6 and fused == engine_eval.decode_counts(*args)
    assert plain == engine_eval.decode_counts(None, *args[1:])


# ---------------------------------------------------------------- 4. data


def conversations(count: int) -> list[dict]:
    """`count` one-exchange conversations, the last with two exchanges."""
    out = [{"messages": [{"role": "user", "content": f"the quick {k}"}, {"role": "assistant", "content": "brown fox " * (k + 2)}]}
           for k in range(count)]
    out[-1]["messages"] += [{"role": "user", "content": "over the"}, {"role": "assistant", "content": "lazy dog " * 3}]
    return out


def test_whole_conversations_are_held_out(saved_models, tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in conversations(20)), encoding="utf-8")
    cfg = training.TrainConfig(str(saved_models / "draft"), str(saved_models / "target"), str(path), str(tmp_path / "o"),
                               heldout_fraction=0.05, hidden_dim=16, intermediate_dim=16, device="cpu")
    trainer, _, sizes = train_fuser.build_trainer(cfg, chat_data.read_records(path), torch.device("cpu"),
                                                  training.Processes(), lambda *a: None)
    held, train = [r.tolist() for r in trainer.heldout.rows], [r.tolist() for r in trainer.data.rows]
    assert len(held) == 2 and len(train) == 19  # the last conversation's two answers, together
    assert not any(h[: len(t)] == t for h in held for t in train)  # no held-out answer continues a trained one
    assert "from 19 and 1 conversations" in sizes


def test_an_empty_assistant_turn_is_an_error_naming_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    empty = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]}
    path.write_text(json.dumps(good) + "\n" + json.dumps(empty) + "\n", encoding="utf-8")
    with pytest.raises(UserInputError, match=r"d.jsonl:2: an assistant turn is empty"):
        chat_data.read_records(path)


def test_the_length_pool_keeps_batches_varied_on_small_data():
    g = torch.Generator().manual_seed(0)
    data = train_data.SplitData.from_answers([(torch.randint(3, 300, (8 + k,), generator=g).tolist(), 5)
                                              for k in range(48)], gamma=3)
    rng = random.Random(0)
    batches = [data.sample_blocks(rng, 8, 16) for _ in range(500)]
    assert len({tuple(sorted(b.rows)) for b in batches}) > 400  # before: 6 compositions, over and over
    assert all(b.distinct == 8 for b in batches)


def test_a_batch_larger_than_the_data_is_capped_with_a_warning(tmp_path, target, draft, windows):
    cfg = test_training.config(tmp_path, batch_size=100_000)
    trainer = test_training.new_trainer(cfg, target, draft, windows)
    assert trainer.batch_rows == len(trainer.data) < 100_000
    assert any("--batch_size 100000 is larger than" in w and "capped" in w for w in trainer.warnings())
    trainer.train_step()
    assert trainer.batches[-1] == (len(trainer.data), len(trainer.data))  # every row once


# ---------------------------------------------------------------- 5. a fuser that changes nothing


def faint(fuser, scale: float = 1e-7):
    with torch.no_grad():
        for p in fuser.projectors:
            for kind in ("key", "value"):
                getattr(p, f"{kind}_proj_out").weight.mul_(scale)
                getattr(p, f"{kind}_proj_out").bias.mul_(scale)
    return fuser


def test_a_projector_that_changes_nothing_is_measured_and_closed(target, draft):
    ids = torch.tensor([[5, 9, 33, 7, 100, 2, 41, 8]])
    strong = tiny.open_fuser(target, draft)
    assert min(effect.projector_effects(strong, target, draft, ids)) > 100 * effect.EFFECT_FLOOR
    weak = faint(tiny.open_fuser(target, draft))
    effects = effect.projector_effects(weak, target, draft, ids)
    assert max(effects) < effect.EFFECT_FLOOR and weak.open_gates()[0] > 0
    assert effect.close_inert(weak, effects) == [0, 1] and weak.open_gates()[0] == 0
    prompt, spec = [5, 9, 33, 7, 100, 2], SpecConfig(gamma=3, max_new_tokens=24)
    run = SpeculativeDecoder(target, draft, spec, SamplingConfig(), set(), fuser=weak).generate(prompt)
    assert run.counters.fused_tokens == 0  # skipped: no fusion cost


def test_the_demo_skips_a_fuser_that_changes_nothing(saved_models, tmp_path, target, draft):
    from c2c import SpeculativePipeline

    save_fuser(faint(tiny.open_fuser(target, draft)), tmp_path / "faint")
    logged = []
    pipe = SpeculativePipeline.load(str(saved_models / "draft"), str(saved_models / "target"), fuser=str(tmp_path / "faint"),
                                    device="cpu", dtype="float32", compile=False, threads=1, log=logged.append)
    assert pipe.fusion["inert_projectors"] == [0, 1] and pipe.fusion["open_gates"][0] == 0
    assert any("changes the draft's K/V by at most" in m and "skips it" in m for m in logged)
    out = pipe.generate("the quick brown", max_new_tokens=12)
    assert pipe.session.fuser.open_gates()[0] == 0 and out.text
    strong = SpeculativePipeline.load(str(saved_models / "draft"), str(saved_models / "target"),
                                      fuser=str(saved_models / "fuser"), device="cpu", dtype="float32", compile=False, threads=1)
    assert strong.fusion["inert_projectors"] == [] and strong.fusion["open_gates"][0] > 0


def test_the_trainer_warns_when_its_fuser_changes_nothing():
    cfg = training.TrainConfig("d", "t", "x", "o")
    last = {"agreement_fused": 0.6, "agreement_unfused": 0.6, "heldout_tokens": 2048, "heldout_sequences": 40,
            "won": 0, "lost": 0, "open_gates": 4, "gates": 4, "projector_effects": [2e-7, 3e-7]}
    warnings = train_fuser.summary(cfg, "out/final", last)[1]
    assert any("changes the draft's K/V by at most 3e-07" in w and "skips it" in w for w in warnings)
    assert train_fuser.summary(cfg, "out/final", last | {"projector_effects": [0.05, 0.04]})[1] == []
