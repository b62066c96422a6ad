"""Training at scale: the all-position objective equals the per-split computation block by block,
data-parallel training across processes equals one process, and the trainer's bookkeeping
(metrics.jsonl, checkpoints kept, refusing to overwrite, Ctrl-C) does what it says."""

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from c2c.tools import train_data, train_fuser, train_objective, training
from c2c.core.fuser import C2CProjector, KVShape, load_fuser
from tests import test_training

ROOT = Path(__file__).resolve().parents[1]
ARITH = ROOT / "presets" / "arith"


def test_block_layout_tiles_the_supervised_span():
    starts, supervised = train_data.block_layout(20, 5, 18, 4, 2)
    # the prompt attends its own K/V from position 0 (as prefill); the last token and beyond are their own block
    assert starts.tolist() == [0] * 5 + [5, 5, 7, 7, 7, 7, 11, 11, 11, 11, 15, 15, 15, 18, 19]
    assert train_data.block_layout(20, 5, 18, 4, 0)[0].tolist() == [0] * 5 + [5] * 4 + [9] * 4 + [13] * 4 + [17, 18, 19]
    assert supervised.tolist() == [False] * 5 + [True] * 13 + [False] * 2
    for offset in range(4):  # every supervised block is a split (m, s) with s <= gamma+1, m + s <= hi
        row, sup = train_data.block_layout(20, 5, 18, 4, offset)
        blocks = {}
        for p in range(5, 18):
            blocks.setdefault(int(row[p]), []).append(p)
        assert all(1 <= len(ps) <= 4 and ps == list(range(m, m + len(ps))) for m, ps in blocks.items())


def test_block_mask_sees_the_fused_prefix_and_its_own_block_as_an_additive_mask(draft):
    starts = torch.tensor([[0, 1, 2, 2, 2]])
    mask = train_objective.draft_block_mask(draft, starts)[0, 0]  # the tiny Qwen3 draft: no window, float32
    assert mask.dtype == torch.float32  # eager attention adds the mask: a boolean one would add 0/1
    allowed = (mask == 0).int()
    assert allowed[3].tolist() == [1, 1, 0, 0, 0] + [0, 0, 1, 1, 0]  # fused 0-1, own 2-3
    assert allowed[0].tolist() == [0] * 5 + [1, 0, 0, 0, 0]  # a prompt position: its own causal keys
    assert (mask[allowed == 0] == torch.finfo(torch.float32).min).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_each_block_equals_the_per_split_computation(target, draft, fuser, seed):
    """With the plain pass's K/V (draft_kv="plain"), the draft's logits in every block equal those of
    the one-split objective with m = the block's start (float32, 1e-5), and the target's logits too."""
    rng = random.Random(seed)
    B, L, gamma, m_min = 3, 24, 3, 6
    x = torch.randint(0, 300, (B, L), generator=torch.Generator().manual_seed(seed))
    layouts = [train_data.block_layout(L, m_min, L, gamma + 1, rng.randrange(gamma + 1)) for _ in range(B)]
    starts, supervised = torch.stack([s for s, _ in layouts]), torch.stack([v for _, v in layouts])
    with torch.no_grad():
        t_all, d_all = train_objective.all_position_logits(fuser, target, draft, x, starts, draft_kv="plain")
        checked = 0
        for row in range(B):
            for m in sorted({int(s) for s, sup in zip(starts[row], supervised[row]) if sup}):
                s = int(((starts[row] == m) & supervised[row]).sum())
                t_one, d_one = train_objective.fused_suffix_logits(fuser, target, draft, x[row : row + 1], m, s)
                assert torch.allclose(d_all[row, m : m + s], d_one[0], atol=1e-5, rtol=0), (row, m, s)
                assert torch.allclose(t_all[row, m : m + s], t_one[0], atol=1e-5, rtol=0)
                checked += s
    assert checked == int(supervised.sum())
    unfused = train_objective.all_position_logits(fuser, target, draft, x, starts, fuse=False)[1]
    assert not torch.allclose(unfused, d_all, atol=1e-3)  # fusion reached the blocks


def test_gate_noise_is_c2cs_gumbel_by_default():
    p = C2CProjector(4, 4, 1, 1, hidden_dim=8, intermediate_dim=8).train()
    torch.manual_seed(0)
    gumbel = p.gate("key", (200_000,)).mean().item()
    p.gate_noise = "logistic"
    logistic = p.gate("key", (200_000,)).mean().item()
    p.gate_noise = "none"
    none = p.gate("key", (3,))
    assert gumbel > 0.58 and abs(logistic - 0.5) < 0.005 and torch.equal(none, torch.full((3,), 0.5))


def config(tmp_path, **kw):
    """The trainer tests' config, with evaluations and checkpoints every few steps of a short run."""
    return test_training.config(tmp_path, **({"steps": 6, "eval_every": 3, "save_every": 2} | kw))


def test_metrics_jsonl_and_checkpoint_pruning(tmp_path, target, draft, windows):
    cfg = config(tmp_path, keep_checkpoints=2)
    trainer = test_training.new_trainer(cfg, target, draft, windows)
    result = trainer.train(progress=False)
    lines = [json.loads(x) for x in (tmp_path / "fuser" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [3, 6]
    keys = {"step", "heldout_agreement_fused", "heldout_agreement_unfused", "won", "lost", "target_tokens",
            "supervised_tokens", "processes", "lr", "open_gates"}
    assert keys <= set(lines[0]) and lines[0]["processes"] == 1
    # all-position: every window's positions min_prefix..31 are supervised, the target reads all 32
    assert lines[1]["target_tokens"] == 6 * 4 * 32 == result["target_tokens"]
    assert lines[1]["supervised_tokens"] == 6 * 4 * (32 - cfg.min_prefix)
    kept = sorted(p.name for p in (tmp_path / "fuser" / "checkpoints").iterdir())
    assert kept == ["step_000004", "step_000006"]  # the last step is checkpointed too: a run extends from its end


def test_one_split_objective_supervises_one_suffix_per_batch(tmp_path, target, draft, windows):
    cfg = config(tmp_path, suffixes="one", steps=3, eval_every=3, save_every=100)
    trainer = training.FuserTrainer(cfg, target, draft, train_data.SplitData.from_windows(windows, 8, 3),
                                    train_data.SplitData.from_windows(windows[:8], 8, 3), torch.device("cpu"))
    trainer.train(progress=False)
    assert 3 * 4 <= trainer.supervised_tokens <= 3 * 4 * 4 < trainer.target_tokens
    assert trainer.padding_tokens == 0  # windows share one length


def arith_command(out: Path, *extra: str, noise: bool = False) -> list[str]:
    """The trainer's command on the shipped arith pair; `noise`: C2C's default gate noise and dropout
    (otherwise off, so a figure can be compared across runs exactly)."""
    data = out.parent / "prompts.jsonl"
    if not data.exists():
        lines = [p for p in (ARITH / "eval_additions.txt").read_text().splitlines() if not p.startswith("#")][:24]
        data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in lines))
    return ["--base_model", str(ARITH / "draft"), "--teacher_model", str(ARITH / "target"), "--data", str(data),
            "--output_dir", str(out), "--generate_from_target", "6", "--steps", "4", "--batch_size", "4",
            "--gamma", "3", "--hidden_dim", "16", "--intermediate_dim", "16", "--lr", "1e-2", "--warmup_steps", "1",
            *(() if noise else ("--dropout", "0.0", "--gate_noise", "none")), "--initial_gate_logit", "1.0", "--eval_every", "4",
            "--eval_tokens", "32", "--save_every", "2", "--device", "cpu", "--dtype", "float32",
            "--save_dtype", "float32", "--threads", "1", "--no_progress", "--heldout_fraction", "0.2", *extra]


def test_two_processes_train_the_same_fuser_as_one(tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2 -m c2c.tools.train_fuser --device cpu` on the shipped arith
    models (accelerate 1.x starts several CPU processes through its torchrun launcher, `--multi_gpu`;
    its `--cpu` launcher starts one unless mpirun is set up) writes a fuser that loads and matches the
    one-process run of the same command, with the default gate noise and dropout (drawn per global row)."""
    if shutil.which("accelerate") is None and not (Path(sys.executable).parent / "accelerate").exists():
        pytest.fail("accelerate's launcher is not installed (it is a dependency in requirements.txt)")
    launcher = str(Path(sys.executable).parent / "accelerate")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    one = subprocess.run([sys.executable, "-m", "c2c.tools.train_fuser", *arith_command(tmp_path / "one", noise=True)], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                          "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517",
                          "-m", "c2c.tools.train_fuser", *arith_command(tmp_path / "two", noise=True)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 process(es)" in two.stderr and two.stdout.count("saved ") == 1  # only the main process writes
    shapes = KVShape(1, 1, 16), KVShape(4, 2, 32)
    a, b = (load_fuser(tmp_path / name, *shapes) for name in ("one", "two"))
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(x, y, atol=1e-5, rtol=1e-4), name
    m1, m2 = (json.loads((tmp_path / n / "metrics.jsonl").read_text().splitlines()[-1]) for n in ("one", "two"))
    assert m2["processes"] == 2 and m1["processes"] == 1
    assert m1["target_tokens"] == m2["target_tokens"] and m1["supervised_tokens"] == m2["supervised_tokens"]
    # resume across process counts: one process continues the two-process run's checkpoint
    resumed = subprocess.run([sys.executable, "-m", "c2c.tools.train_fuser",
                              *arith_command(tmp_path / "two", "--steps", "6", "--resume", noise=True)],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0 and "resumed from" in resumed.stderr, resumed.stderr[-2000:]


def test_a_trained_fuser_is_not_overwritten_without_overwrite(tmp_path, capsys):
    out = tmp_path / "fuser"
    (out / "final").mkdir(parents=True)
    (out / "final" / "projector_0.json").write_text("{}")
    rc = train_fuser.main(["--base_model", "d", "--teacher_model", "t", "--data", "x.txt", "--output_dir", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "this trainer did not write" in err and "--overwrite clears only" in err


@pytest.mark.parametrize("flag, value", [("--lr", "nan"), ("--lr", "inf"), ("--lr", "0"), ("--suffixes", "some"),
                                         ("--gate_noise", "uniform"), ("--keep_checkpoints", "0")])
def test_bad_trainer_numbers_exit_2(tmp_path, capsys, flag, value):
    rc = train_fuser.main(["--base_model", "d", "--teacher_model", "t", "--data", "x.txt",
                           "--output_dir", str(tmp_path / "f"), flag, value])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and flag.lstrip("-") in err and "Traceback" not in err


def test_train_step_timer_reports_the_recipes_figures(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "bench"))
    import train_step

    assert train_step.main(["--synthetic", "tiny", "--batch_size", "2", "--seq_len", "32", "--steps", "2", "--warmup", "1",
                            "--device", "cpu", "--threads", "1", "--output_dir", str(tmp_path)]) == 0
    data = json.loads(next(tmp_path.glob("train_step_*.json")).read_text())
    t = data["timings"]
    assert t["seconds_per_step"] > 0 and t["peak_memory_gb"] > 0 and len(t["seconds"]) == 2
    assert t["target_tokens_per_step"] == 2 * 32 and t["supervised_tokens_per_step"] == 2 * (32 - 8)
    assert data["environment"]["device_name"] and data["config"]["suffixes"] == "all" and t["padding_share"] == 0
    varied = tmp_path / "varied"
    assert train_step.main(["--synthetic", "tiny", "--batch_size", "4", "--seq_len", "64", "--steps", "2", "--warmup", "1",
                            "--device", "cpu", "--threads", "1", "--lengths", "varied", "--output_dir", str(varied)]) == 0
    v = json.loads(next(varied.glob("train_step_*.json")).read_text())
    assert v["config"]["lengths"] == "varied" and 0 <= v["timings"]["padding_share"] < 1
    assert train_step.main(["--synthetic", "qwen3", "--device", "cpu", "--output_dir", str(tmp_path)]) == 2
    assert "needs a GPU" in capsys.readouterr().err


def interrupt_at(monkeypatch, step: int):
    """Ctrl-C in the trainer when it reaches `step`; returns the real train_step (to put back)."""
    real = training.FuserTrainer.train_step

    def interrupted(self):
        if self.step == step:
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(training.FuserTrainer, "train_step", interrupted)
    return real


def test_ctrl_c_names_the_checkpoint_resume_continues_from(tmp_path, capsys, monkeypatch):
    interrupt_at(monkeypatch, 3)
    out = tmp_path / "f"
    argv = arith_command(out, "--steps", "10")
    assert train_fuser.main(argv) == 130
    err = capsys.readouterr().err
    assert "interrupted (Ctrl-C) at step 3" in err and "--resume continues from" in err and "step_000002" in err
    assert not (out / "final").exists()  # nothing half-written as a fuser
    monkeypatch.setattr(training.FuserTrainer, "train_step", lambda self: (_ for _ in ()).throw(KeyboardInterrupt))
    assert train_fuser.main(arith_command(tmp_path / "g")) == 130
    assert "no checkpoint was written yet" in capsys.readouterr().err
