"""The fuser trainer: learning, checkpoints, resume, data formats, and its command line."""

import json

import pytest
import torch

from c2c.tools import train_data, train_fuser, training
from c2c.core.fuser import KVShape, load_fuser


def config(tmp_path, **kw):
    args = dict(draft_model="d", target_model="t", data="synthetic", output_dir=str(tmp_path / "fuser"), steps=40,
                batch_size=4, seq_len=32, gamma=3, hidden_dim=32, intermediate_dim=32, lr=3e-3, warmup_steps=2,
                eval_every=1000, eval_tokens=64, save_every=1000, dropout=0.0, initial_gate_logit=1.0, seed=0)
    return training.TrainConfig(**(args | kw))


def new_trainer(cfg, target, draft, windows):
    data = train_data.SplitData.from_windows(windows, cfg.min_prefix, cfg.gamma)
    heldout = train_data.SplitData.from_windows(windows[:8], cfg.min_prefix, cfg.gamma)
    return training.FuserTrainer(cfg, target, draft, data, heldout, torch.device("cpu"))


def test_a_few_steps_reduce_the_loss(tmp_path, target, draft, windows):
    trainer = new_trainer(config(tmp_path), target, draft, windows)
    before = trainer.evaluate()["heldout_loss"]
    for _ in range(40):
        trainer.train_step()
    after = trainer.evaluate()
    assert after["heldout_loss"] < 0.9 * before
    assert 0.0 <= after["agreement_fused"] <= 1.0 and after["gates"] == 4


def test_only_the_projectors_learn(tmp_path, target, draft, windows):
    target_before = {k: v.clone() for k, v in target.state_dict().items()}
    trainer = new_trainer(config(tmp_path), target, draft, windows)
    proj_before = [p.detach().clone() for p in trainer.fuser.parameters()]
    trainer.train_step()
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in target_before.items())
    assert any(not torch.equal(a, b) for a, b in zip(proj_before, trainer.fuser.parameters()))


def test_checkpoint_round_trip_and_resume_continue_exactly(tmp_path, target, draft, windows):
    cfg = config(tmp_path, steps=6)
    straight = new_trainer(cfg, target, draft, windows)
    for _ in range(6):
        straight.train_step()

    first = new_trainer(cfg, target, draft, windows)
    for _ in range(3):
        first.train_step()
    first.save_checkpoint(tmp_path / "ckpt")
    resumed = new_trainer(cfg, target, draft, windows)
    resumed.load_checkpoint(tmp_path / "ckpt")
    assert resumed.step == 3
    for (name, a), b in zip(first.fuser.state_dict().items(), resumed.fuser.state_dict().values()):
        assert torch.equal(a, b), name
    for _ in range(3):
        resumed.train_step()
    for (name, a), b in zip(straight.fuser.state_dict().items(), resumed.fuser.state_dict().values()):
        assert torch.equal(a, b), name


def test_read_records_plain_and_jsonl(tmp_path):
    from c2c.tools.chat_data import read_records

    (tmp_path / "a.txt").write_text("hello world", encoding="utf-8")
    assert [r.text for r in read_records(tmp_path / "a.txt")] == ["hello world"]
    (tmp_path / "b.jsonl").write_text('{"text": "one"}\n\n{"prompt": "two"}\n', encoding="utf-8")
    assert [r.text for r in read_records(tmp_path / "b.jsonl")] == ["one", "two"]
    (tmp_path / "c.jsonl").write_text('{"nope": 1}\n', encoding="utf-8")
    with pytest.raises(training.UserInputError, match="c.jsonl:1"):
        read_records(tmp_path / "c.jsonl")
    with pytest.raises(training.UserInputError, match="not found"):
        read_records(tmp_path / "missing.txt")


def test_command_line_writes_the_official_layout_and_resumes(saved_models, tmp_path, capsys):
    data = tmp_path / "data.txt"
    data.write_text(" ".join(["the quick brown fox jumps over the lazy dog"] * 300), encoding="utf-8")
    out = tmp_path / "fuser"
    common = ["--base_model", str(saved_models / "draft"), "--teacher_model", str(saved_models / "target"),
              "--data", str(data), "--output_dir", str(out), "--batch_size", "2", "--seq_len", "24",
              "--hidden_dim", "16", "--intermediate_dim", "16", "--eval_every", "2", "--save_every", "2",
              "--device", "cpu", "--no_progress"]
    assert train_fuser.main(common + ["--steps", "3"]) == 0
    assert (out / "checkpoints" / "step_000002" / "trainer_state.pt").is_file()
    config_json = json.loads((out / "config.json").read_text())
    assert config_json["model"] == {"base_model": str(saved_models / "draft"), "teacher_model": str(saved_models / "target")}
    assert config_json["training"]["steps"] == 3 and config_json["history"]
    from transformers import AutoConfig

    fuser = load_fuser(out, KVShape.of(AutoConfig.from_pretrained(saved_models / "draft")),
                       KVShape.of(AutoConfig.from_pretrained(saved_models / "target")))
    assert len(fuser.projectors) == 2
    assert train_fuser.main(common + ["--steps", "5", "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().err
    assert json.loads((out / "config.json").read_text())["history"][-1]["step"] == 5


def test_command_line_bad_input_exits_2(saved_models, tmp_path, capsys):
    code = train_fuser.main(["--base_model", str(saved_models / "draft"), "--teacher_model", str(saved_models / "target"),
                             "--data", str(tmp_path / "none.txt"), "--output_dir", str(tmp_path / "o")])
    assert code == 2 and "training data not found" in capsys.readouterr().err


def test_greedy_batch_equals_the_reference_loop_per_prompt(target):
    from c2c.core.engine import standard_generate
    from c2c.core.sampling import SamplingConfig

    prompts = [[5, 9, 33], [7, 7, 1], [100, 2], [11, 12, 13, 14, 15]]  # two of the same length share a batch
    eos = {42, 57}
    with torch.inference_mode():
        want = [standard_generate(target, p, 12, SamplingConfig(), eos).output_ids for p in prompts]
    assert train_data.greedy_batch(target, prompts, 12, eos, batch_size=2) == want


def test_answer_data_put_every_suffix_inside_the_answer():
    items = [(list(range(10 + k)), 6) for k in range(3)] * 4  # prompt of 6 tokens, answers of 4..6 tokens
    data = train_data.SplitData.from_answers(items, gamma=4)
    rng = __import__("random").Random(0)
    for _ in range(200):
        batch = data.sample(rng, 3)
        for row, n in enumerate(batch.lengths):
            sup = batch.supervised[row].nonzero().flatten().tolist()
            m, s = sup[0], len(sup)
            # the prefix holds the prompt; the suffix predicts answer tokens; one block of 1..gamma+1
            assert m >= 6 and 1 <= s <= 5 and m + s <= n - 1 and sup == list(range(m, m + s))
            assert batch.starts[row, m : m + s].tolist() == [m] * s
    batches = data.evaluation(100, batch_size=4)  # fewer positions than asked: each scored once
    assert sum(int(b.supervised.sum()) for b in batches) == data.supervised_positions < 100
    assert sorted(i for b in batches for i in b.rows) == list(range(len(data)))
    assert sum(int(b.supervised.sum()) for b in data.evaluation(20, batch_size=4)) >= 20
    again = data.evaluation(100, batch_size=4)
    assert all(torch.equal(a.starts, b.starts) for a, b in zip(batches, again))  # the same held-out blocks every time


def test_gumbel_gate_noise_is_drawn_per_batch_head_and_token():
    from c2c.core.fuser import C2CProjector

    torch.manual_seed(0)
    proj = C2CProjector(8, 4, 2, 2, hidden_dim=8, intermediate_dim=8, dtype=torch.float32).train()
    gate = proj.gate("key", (3, 2, 5, 1))
    assert gate.shape == (3, 2, 5, 1) and gate.unique().numel() == 30
    assert proj.eval().gate("key").shape == (1, 1, 1, 1)


def test_evaluation_reports_paired_won_and_lost_on_enough_tokens(tmp_path, target, draft, windows):
    trainer = new_trainer(config(tmp_path, eval_tokens=300), target, draft, windows)
    figures = trainer.evaluate()
    # the held-out windows hold fewer positions than asked: all are scored, once, and the run says so
    assert figures["heldout_tokens"] == trainer.heldout.supervised_positions == 8 * 24 < 300
    assert any("fewer than --eval_tokens" in w for w in trainer.warnings())
    diff = (figures["agreement_fused"] - figures["agreement_unfused"]) * figures["heldout_tokens"]
    assert round(diff) == figures["won"] - figures["lost"]
    assert (figures["open_gates"], figures["gates"]) == (4, 4)
