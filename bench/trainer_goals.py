#!/usr/bin/env python3
"""Issue 27's goals tried as a new user would, with the trainer of a repository (argv[1]) on the
shipped arith pair, in a scratch folder (argv[2], emptied first): a mistyped --overwrite run,
--overwrite into a model folder, --resume of a finished run, --resume with a changed --hidden_dim or
--lr, an output folder under a file. One JSON line per case: exit code, what it said, whether it
trained, and the files it removed or changed of those the user had.

    OMP_NUM_THREADS=1 python bench/trainer_goals.py . /tmp/goals
    OMP_NUM_THREADS=1 python bench/trainer_goals.py /tmp/old_checkout /tmp/goals_old   # the trainer before
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
SAID = ("error:", "Traceback", "--overwrite:", "no checkpoint", "resumed")


def command(root: Path, out: Path, data: Path, *extra: str) -> list[str]:
    arith = root / "presets" / "arith"
    return [sys.executable, "-m", "c2c.tools.train_fuser", "--base_model", str(arith / "draft"),
            "--teacher_model", str(arith / "target"), "--data", str(data), "--output_dir", str(out),
            "--generate_from_target", "6", "--steps", "2", "--batch_size", "4", "--gamma", "3", "--hidden_dim", "16",
            "--intermediate_dim", "16", "--lr", "1e-2", "--warmup_steps", "1", "--initial_gate_logit", "1.0",
            "--eval_every", "2", "--eval_tokens", "32", "--save_every", "100", "--device", "cpu", "--dtype", "float32",
            "--threads", "1", "--no_progress", "--heldout_fraction", "0.2", *extra]


def snapshot(folder: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


def case(name: str, root: Path, argv: list[str], folder: Path) -> dict:
    before = snapshot(folder)
    r = subprocess.run(argv, cwd=root, capture_output=True, text=True, env=ENV)
    after = snapshot(folder)
    said = [line[:160] for line in r.stderr.splitlines() if line.startswith(SAID)][:3]
    if r.returncode not in (0, 2):
        said.append(r.stderr.strip().splitlines()[-1][:160])
    return {"case": name, "rc": r.returncode, "said": said, "trained": "saved " in r.stdout,
            "files_lost": sorted(set(before) - set(after))[:6],
            "files_changed": sorted(k for k in before if k in after and before[k] != after[k])[:6]}


def main(root: Path, work: Path) -> None:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    data = work / "prompts.jsonl"
    lines = [p for p in (root / "presets/arith/eval_additions.txt").read_text().splitlines() if not p.startswith("#")][:24]
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in lines))
    finished = work / "finished"
    assert subprocess.run(command(root, finished, data), cwd=root, capture_output=True, env=ENV).returncode == 0

    def copy(name: str) -> Path:
        shutil.copytree(finished, work / name)
        return work / name

    model = work / "model"
    shutil.copytree(root / "presets/arith/draft", model)
    (work / "afile").write_text("x")
    cases = [
        ("mistyped --overwrite (--data typo)", command(root, copy("typo"), work / "promts.jsonl", "--overwrite"), work / "typo"),
        ("--overwrite into a model folder", command(root, model, data, "--overwrite"), model),
        ("--resume of a finished run (--steps 2)", command(root, copy("fin2"), data, "--resume"), work / "fin2"),
        ("--resume of a finished run (--steps 40)", command(root, copy("fin40"), data, "--resume", "--steps", "40"), work / "fin40"),
        ("--resume with --hidden_dim 32", command(root, copy("hd"), data, "--resume", "--steps", "4", "--hidden_dim", "32"), work / "hd"),
        ("--resume with --lr 0.02", command(root, copy("lr"), data, "--resume", "--steps", "4", "--lr", "0.02"), work / "lr"),
        ("--output_dir under a file", command(root, work / "afile" / "out", data), work),
    ]
    for name, argv, folder in cases:
        print(json.dumps(case(name, root, argv, folder)))


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve(), Path(sys.argv[2]))
