#!/usr/bin/env python3
"""The fusion control's upper-bound study: can a trained draft use the target's cache better than a
frozen one? Each arm trains with the project's trainer (`python -m c2c.tools.train_fuser`, through the
arith build's fuser stage: the same data, steps, seed and schedule), then all arms are scored on
the same held-out problems (the preset's eval files, never trained on), additions and chains apart:

  frozen       projectors only, both models frozen (C2C, what the preset ships)
  alone_full   the draft fine-tuned alone (every decoder weight free, no fusion): what training the
               draft buys without the target's cache
  joint_full   the same draft change trained jointly with the projectors (the upper bound)
  joint_lora   a rank-8 LoRA draft adapter trained jointly with the projectors (the shippable option)

    OMP_NUM_THREADS=1 python bench/arith_upper_bound.py --out /tmp/ub --steps 6000 --arms frozen alone_full
    OMP_NUM_THREADS=1 python bench/arith_upper_bound.py --out /tmp/ub --steps 6000 --arms joint_full joint_lora
    python bench/arith_upper_bound.py --out /tmp/ub --evaluate     # every trained arm, one table
    python bench/arith_upper_bound.py --out /tmp/ub --breakdown frozen joint_lora --export_draft alone_full

Scores: top-1 agreement of the draft with the target on held-out answer tokens (suffix splits as
in training: a fused prompt + part of the answer, then up to gamma+1 drafted tokens), for the plain
draft, the arm's draft without fusion (adapter only) and as the fused modes run it, with paired
won/lost counts against the plain draft. The last stdout line is one JSON object.
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

import arith_task as task  # noqa: E402
import build_arith  # noqa: E402

from c2c.tools import train_data, train_objective  # noqa: E402
from c2c.core.adapter import find_adapter, load_adapter  # noqa: E402
from c2c.core.fuser import KVShape, find_final_dir, load_fuser  # noqa: E402
from c2c.app.loading import eos_token_ids  # noqa: E402

ARMS = {
    "frozen": (),
    "alone_full": ("--draft_adapter", "full", "--no-fusion"),
    "joint_full": ("--draft_adapter", "full"),
    "joint_lora": ("--draft_adapter", "lora", "--adapter_rank", "8"),
}


def train_arms(out: Path, arms: list[str], steps: int, preset: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for role in ("target", "draft"):
        if not (out / role).exists():
            (out / role).symlink_to((preset / role).resolve())
    args = build_arith.build_parser().parse_args(["--fuser_steps", str(steps)])
    for arm in arms:
        if (out / arm / "config.json").is_file():
            print(f"{arm}: already trained in {out / arm}", file=sys.stderr)
            continue
        print(f"{arm}: training ({steps} steps)", file=sys.stderr)
        info = build_arith.train_fuser(out, args, folder=arm, extra=ARMS[arm])
        print(f"{arm}: {info['seconds']} s, last held-out figures {info['last_eval']}", file=sys.stderr)


def load_pair(out: Path) -> tuple:
    """(target, draft, tokenizer) of the study folder, float32 on the CPU."""
    from transformers import AutoTokenizer

    return build_arith.load_model(out / "target"), build_arith.load_model(out / "draft"), AutoTokenizer.from_pretrained(out / "target")


def answered(pair: tuple, form: str, n: int, preset: Path) -> list[tuple[list[int], int]]:
    """The first n held-out problems of one form, each followed by the target's greedy answer:
    (prompt + answer ids, prompt length)."""
    target, _, tokenizer = pair
    lines = [x for x in (preset / f"eval_{form}.txt").read_text().splitlines() if x and not x.startswith("#")][:n]
    return train_data.target_generations(target, tokenizer, lines, 4 * task.CHAIN_TERMS + 2, eos_token_ids(target, tokenizer))


def load_arm(folder: Path, pair: tuple) -> tuple:
    """(fuser, adapter) of a trained arm; None for what it lacks (no projectors: the adapter-alone arm)."""
    target, draft, _ = pair
    fuser = None
    if find_final_dir(folder) is not None:
        fuser = load_fuser(folder, KVShape.of(draft.config), KVShape.of(target.config), dtype=torch.float32)
    adapter_dir = find_adapter(folder)
    return fuser, load_adapter(adapter_dir, draft) if adapter_dir else None


def evaluate(out: Path, preset: Path, tokens: int, pair: tuple) -> list[dict]:
    target, draft, _ = pair
    sets = {form: train_data.SplitData.from_answers(answered(pair, form, 500, preset), gamma=4) for form in ("additions", "chains")}
    rows = []
    for arm in ARMS:
        folder = out / arm
        if not (folder / "config.json").is_file():
            continue
        fuser, adapter = load_arm(folder, pair)
        if adapter is not None:
            adapter.attach(draft)
        try:
            for form, data in sets.items():
                f = train_objective.paired_agreement(fuser, target, draft, data, tokens, 64, device="cpu", adapter=adapter,
                                              fuse=fuser is not None)
                rows.append({"arm": arm, "form": form, "tokens": f["heldout_tokens"], "plain": f["agreement_unfused"],
                             "adapter_only": f.get("agreement_adapter_only"), "as_run": f["agreement_fused"],
                             "won": f["won"], "lost": f["lost"], "open_gates": f["open_gates"], "gates": f["gates"],
                             "steps": json.loads((folder / "config.json").read_text())["training"]["steps"]})
        finally:
            if adapter is not None:
                adapter.detach()
    return rows


def chain_breakdown(out: Path, preset: Path, arm: str, n: int = 200, gamma: int = 4, pair: tuple | None = None) -> dict:
    """Where on chains fusion helps. At every cut k of the answer, the prefix (prompt and answer
    tokens 0..k-1) is fused, the draft reads answer token k (the newest committed token, unfused, as
    in a round's first draft step) and guesses tokens k+1..k+gamma+1 on its own. Agreement with the
    target, split by the guessed token's place in its term (hundreds, tens, units, comma, end) and by
    whether that term is the one token k belongs to ("term in progress") or a later one.
    Counts: {"<term>, <place>": [tokens, right: plain draft, the arm's draft unfused, as run]}."""
    pair = pair or load_pair(out)
    target, draft, _ = pair
    items = answered(pair, "chains", n, preset)
    x = torch.tensor([ids for ids, _ in items])  # one length: every chain answer is 33 tokens
    n0 = items[0][1]
    fuser, adapter = load_arm(out / arm, pair)
    fuse = fuser is not None
    counts: dict[str, list[int]] = {}
    if adapter is not None:
        adapter.attach(draft)
    try:
        answer = x.shape[1] - n0  # 8 terms of 4 tokens, then the end token
        for k in range(answer - 1):
            m, s = n0 + k, min(gamma + 1, answer - 1 - k)  # the last guess is the end token
            want, as_run = train_objective.fused_suffix_logits(fuser, target, draft, x, m, s, fuse=fuse)
            want = want.argmax(-1)
            if adapter is None:
                plain = alone = train_objective.fused_suffix_logits(fuser, target, draft, x, m, s, fuse=False)[1]
            else:
                alone = train_objective.fused_suffix_logits(fuser, target, draft, x, m, s, fuse=False)[1] if fuse else as_run
                with adapter.disabled():
                    plain = train_objective.fused_suffix_logits(fuser, target, draft, x, m, s, fuse=False)[1]
            for j in range(s):
                token = k + j + 1  # answer index of the guessed token
                where = "a later term" if token // 4 > k // 4 else "term in progress"
                what = ("hundreds", "tens", "units", "comma")[token % 4] if token < 4 * task.CHAIN_TERMS else "end"
                c = counts.setdefault(f"{where}, {what}", [0, 0, 0, 0])
                c[0] += len(x)
                for i, logits in enumerate((plain, alone, as_run), 1):
                    c[i] += int((logits[:, j].argmax(-1) == want[:, j]).sum())
    finally:
        if adapter is not None:
            adapter.detach()
    return counts


def table(rows: list[dict]) -> str:
    lines = ["| arm | steps | form | tokens | plain draft | adapted, no fusion | as run (fused) | won / lost vs plain | gates open |",
             "|" + "---|" * 9]
    for r in rows:
        only = f"{r['adapter_only']:.3f}" if r["adapter_only"] is not None else "-"
        lines.append(f"| {r['arm']} | {r['steps']} | {r['form']} | {r['tokens']} | {r['plain']:.3f} | {only} | "
                     f"{r['as_run']:.3f} | {r['won']} / {r['lost']} | {r['open_gates']}/{r['gates']} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="study folder (links to the preset's models, one folder per arm)")
    p.add_argument("--preset", default=str(ROOT / "presets" / "arith"))
    p.add_argument("--steps", type=int, default=6000, help="training steps of every arm")
    p.add_argument("--arms", nargs="*", default=[], choices=list(ARMS), help="arms to train (skipped if present)")
    p.add_argument("--evaluate", action="store_true", help="score every trained arm on the held-out problems")
    p.add_argument("--tokens", type=int, default=3000, help="held-out answer tokens per form")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--export_draft", nargs="*", default=[],
                   help="arms whose adapted draft to save as a model folder (<out>/<arm>/merged_draft) for the engine")
    p.add_argument("--breakdown", nargs="*", default=[], help="arms (folders under --out) to split chain agreement by term")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out, preset = Path(args.out), Path(args.preset)
    train_arms(out, args.arms, args.steps, preset)
    pair = load_pair(out) if args.evaluate or args.breakdown or args.export_draft else None
    if args.evaluate:
        with torch.no_grad():
            rows = evaluate(out, preset, args.tokens, pair)
        print(table(rows))
        print(json.dumps({"rows": rows}, separators=(",", ":")))
    for arm in args.export_draft:
        _, draft, tokenizer = pair
        merged = load_adapter(find_adapter(out / arm), draft).merged_copy(draft)
        merged.save_pretrained(out / arm / "merged_draft")  # float32: the weights the demo's fused runs use
        tokenizer.save_pretrained(out / arm / "merged_draft")
        print(f"{arm}: adapted draft saved to {out / arm / 'merged_draft'}")
    for arm in args.breakdown:
        with torch.no_grad():
            counts = chain_breakdown(out, preset, arm, pair=pair)
        for category, (n, plain, alone, as_run) in sorted(counts.items()):
            print(f"{arm} chains, {category}: {n} tokens, plain draft {plain / n:.3f}, unfused {alone / n:.3f}, "
                  f"as run {as_run / n:.3f}")
        print(json.dumps({"breakdown": arm, "counts": counts}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
