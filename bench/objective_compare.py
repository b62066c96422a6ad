#!/usr/bin/env python3
"""The trainer's two objectives on the arith pair at the same number of target forward tokens:
`--suffixes one` (one prefix/suffix split per batch, the earlier default) against `--suffixes all`
(every answer position, in blocks of gamma+1). Both train through the arith build's fuser stage
(the same 6,000 problems, seed, schedule, hidden size, learning rate and gate noise); `all` runs
--steps steps, `one` as many steps as reach the same target tokens (measured on a short dry run).
Then both fusers are scored on the same held-out tokens (the preset's eval problems, never trained
on; every answer position in blocks of gamma+1, as the trainer's held-out figure since issue 21;
the 2026-12-01 figures in docs/training.md were one split per batch): top-1 agreement with the
target, and the paired counts between them (won: right only with the
all-position fuser; lost: right only with the one-split fuser).

    OMP_NUM_THREADS=1 python bench/objective_compare.py --out /tmp/objectives --steps 3000 --train all
    OMP_NUM_THREADS=1 python bench/objective_compare.py --out /tmp/objectives --steps 3000 --train one
    OMP_NUM_THREADS=1 python bench/objective_compare.py --out /tmp/objectives --evaluate

The last stdout line of --evaluate is one JSON object; each arm's curve is its metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "presets"))
sys.path.insert(0, str(ROOT / "bench"))

import arith_upper_bound as study  # noqa: E402
import build_arith  # noqa: E402

from c2c.tools import train_data, train_objective  # noqa: E402

PROBE_STEPS = 500  # long enough that the one-split arm's random split lengths average out


def tokens_per_step(out: Path, suffixes: str) -> float:
    """Target tokens one step of `suffixes` reads, from a short run of the same data and seed."""
    args = build_arith.build_parser().parse_args(["--fuser_steps", str(PROBE_STEPS), "--fuser_suffixes", suffixes])
    folder = f"probe_{suffixes}"
    build_arith.train_fuser(out, args, folder=folder)
    return json.loads((out / folder / "config.json").read_text())["target_tokens"] / PROBE_STEPS


def train(out: Path, arm: str, steps: int, preset: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for role in ("target", "draft"):
        if not (out / role).exists():
            (out / role).symlink_to((preset / role).resolve())
    if arm == "one":  # the same target tokens as `all` at `steps`
        ratio = tokens_per_step(out, "all") / tokens_per_step(out, "one")
        steps = round(steps * ratio)
        print(f"one: {ratio:.3f}x the steps of all for the same target tokens: {steps} steps", file=sys.stderr)
    args = build_arith.build_parser().parse_args(["--fuser_steps", str(steps), "--fuser_suffixes", arm])
    info = build_arith.train_fuser(out, args, folder=arm)
    print(f"{arm}: {info['seconds']} s, last held-out figures {info['last_eval']}", file=sys.stderr)


@torch.no_grad()
def evaluate(out: Path, preset: Path, tokens: int) -> dict:
    pair = study.load_pair(out)
    target, draft, _ = pair
    fusers = {arm: study.load_arm(out / arm, pair)[0] for arm in ("all", "one")}
    result = {}
    for form in ("additions", "chains"):
        data = train_data.SplitData.from_answers(study.answered(pair, form, 500, preset), gamma=4)
        right = {arm: [] for arm in ("plain", *fusers)}
        for batch in data.evaluation(tokens, 64):  # every answer position, in blocks of gamma+1
            mask = batch.supervised
            t_logits, plain = train_objective.all_position_logits(None, target, draft, batch.x, batch.starts, fuse=False)
            want = t_logits.argmax(-1)[mask]
            right["plain"].append(plain.argmax(-1)[mask] == want)
            for arm, fuser in fusers.items():
                fused = train_objective.all_position_logits(fuser, target, draft, batch.x, batch.starts)[1]
                right[arm].append(fused.argmax(-1)[mask] == want)
        r = {arm: torch.cat(v) for arm, v in right.items()}
        result[form] = {"tokens": len(r["plain"]), **{f"agreement_{arm}": round(v.float().mean().item(), 4) for arm, v in r.items()},
                        "won_all_vs_one": int((r["all"] & ~r["one"]).sum()), "lost_all_vs_one": int((r["one"] & ~r["all"]).sum())}
    for arm in fusers:
        config = json.loads((out / arm / "config.json").read_text())
        result[arm] = {"steps": config["training"]["steps"], "target_tokens": config["target_tokens"],
                       "supervised_tokens": config["supervised_tokens"], "train_seconds": round(config["train_seconds"])}
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="study folder")
    p.add_argument("--preset", default=str(ROOT / "presets" / "arith"))
    p.add_argument("--steps", type=int, default=3000, help="steps of the all-position arm")
    p.add_argument("--train", choices=("all", "one"), help="train one arm")
    p.add_argument("--evaluate", action="store_true", help="score both arms on the held-out problems")
    p.add_argument("--tokens", type=int, default=3000, help="held-out answer tokens per form, at least")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.train:
        train(out, args.train, args.steps, Path(args.preset))
    if args.evaluate:
        result = evaluate(out, Path(args.preset), args.tokens)
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
