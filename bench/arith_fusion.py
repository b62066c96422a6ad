#!/usr/bin/env python3
"""The fusion control, measured with the demo itself: `--preset arith` on held-out problems, fusion
off / prefill / decode / both (and both with C2C's unfused last prompt position), greedy.

    OMP_NUM_THREADS=1 python bench/arith_fusion.py [--gammas 2 4 6] [--additions 300] [--chains 100]

For each run it calls the demo (`qwen3_14b_speculative_demo.py --preset arith --save_results`)
and reads its results JSON. Printed per form and gamma: verification rounds and the draft's extra
rounds (rounds - problems: a perfect draft needs one round per addition), accepted length, both
acceptance figures, tokens/s and fusion time, whether every output equals the target's and how
many target answers are right. Goals (issue: the fusion control): additions, gamma 4: extra rounds
with fusion <= 0.5x without; chains, gamma 4: accepted length with fusion >= 1.15x without.
The last stdout line is one JSON object with every row.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "presets"))

import arith_task  # noqa: E402
import qwen3_14b_speculative_demo as demo  # noqa: E402

FUSION = {
    "off": ["--no_prefill_fusion", "--no_decode_fusion"],
    "prefill": ["--no_decode_fusion"],
    "decode": ["--no_prefill_fusion"],
    "both": [],
    "both_c2c_last": ["--no_fuse_last_prompt"],  # C2C's prefill: the last prompt position stays unfused
}


def run_demo(prompts: Path, gamma: int, fusion: str, preset: str, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        argv = ["--preset", preset, "--prompts", str(prompts), "--gamma", str(gamma), "--save_results",
                "--output_dir", tmp, "--lang", "en", "--threads", "1", *FUSION[fusion], *extra]
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            code = demo.main(argv)
        if code != 0:
            raise SystemExit(f"demo failed ({code}): {' '.join(argv)}")
        [path] = Path(tmp).glob("results_*.json")
        return json.loads(path.read_text())


def row(data: dict, form: str, gamma: int, fusion: str) -> dict:
    s, sp = data["summary"], data["summary"]["speculative"]
    problems = s["num_prompts"]
    right = sum(p["standard"]["text"] == arith_task.answer(p["prompt"]) for p in data["prompts"])
    return {
        "form": form, "gamma": gamma, "fusion": fusion, "problems": problems,
        "rounds": sp["rounds"], "extra_rounds": sp["rounds"] - problems,
        "average_accepted_length": sp["average_accepted_length"],
        "acceptance_rate": sp["acceptance_rate"], "acceptance_probability": sp["acceptance_probability"],
        "tokens_per_second": sp["tokens_per_second"], "target_tokens_per_second": s["standard"]["tokens_per_second"],
        "fusion_time_share": sp["fusion_time"] / sp["latency"] if sp["latency"] else None,
        "outputs_match": s["comparison"]["prompts_matching"], "target_right": right,
        "open_gates": data["config"]["fusion"]["open_gates"],
        "draft_adapter": (data["config"]["fusion"].get("draft_adapter") or {}).get("kind"),  # fused runs only
    }


def table(rows: list[dict]) -> str:
    lines = ["| form | gamma | fusion | problems | rounds | extra rounds | accepted length | acceptance rate | "
             "acceptance prob. | tokens/s | target tokens/s | fusion time | outputs = target | target right |",
             "|" + "---|" * 14]
    for r in rows:
        lines.append(
            f"| {r['form']} | {r['gamma']} | {r['fusion']} | {r['problems']} | {r['rounds']} | {r['extra_rounds']} | "
            f"{r['average_accepted_length']:.3f} | {r['acceptance_rate']:.3f} | {r['acceptance_probability']:.3f} | "
            f"{r['tokens_per_second']:.0f} | {r['target_tokens_per_second']:.0f} | {r['fusion_time_share']:.1%} | "
            f"{r['outputs_match']}/{r['problems']} | {r['target_right']}/{r['problems']} |"
        )
    return "\n".join(lines)


def goals(rows: list[dict]) -> dict:
    pick = {(r["form"], r["gamma"], r["fusion"]): r for r in rows}
    out = {}
    add_off, add_on = pick.get(("additions", 4, "off")), pick.get(("additions", 4, "both"))
    if add_off and add_on:
        ratio = add_on["extra_rounds"] / add_off["extra_rounds"] if add_off["extra_rounds"] else None
        out["additions_extra_rounds_ratio"] = ratio
        out["additions_goal_met"] = ratio is not None and ratio <= 0.5
    ch_off, ch_on = pick.get(("chains", 4, "off")), pick.get(("chains", 4, "both"))
    if ch_off and ch_on:
        ratio = ch_on["average_accepted_length"] / ch_off["average_accepted_length"]
        out["chains_accepted_length_ratio"] = ratio
        out["chains_goal_met"] = ratio >= 1.15
    out["all_outputs_match"] = all(r["outputs_match"] == r["problems"] for r in rows)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="arith")
    p.add_argument("--gammas", type=int, nargs="+", default=[2, 4, 6])
    p.add_argument("--additions", type=int, default=300, help="held-out additions (first N of eval_additions.txt)")
    p.add_argument("--chains", type=int, default=100, help="held-out chains (first N of eval_chains.txt)")
    p.add_argument("--fusion", nargs="+", default=list(FUSION), choices=list(FUSION))
    p.add_argument("--extra", default="", help="more demo flags, e.g. '--fuser_checkpoint path'")
    args = p.parse_args()
    folder = ROOT / "presets" / args.preset
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for form, n in (("additions", args.additions), ("chains", args.chains)):
            if n == 0:
                continue
            lines = [x for x in (folder / f"eval_{form}.txt").read_text().splitlines() if x and not x.startswith("#")]
            prompts = Path(tmp) / f"{form}.txt"
            prompts.write_text("\n".join(lines[:n]) + "\n")
            for gamma in args.gammas:
                for fusion in args.fusion:
                    rows.append(row(run_demo(prompts, gamma, fusion, args.preset, args.extra.split()), form, gamma, fusion))
                    print(table(rows[-1:]).splitlines()[-1], file=sys.stderr)
    print(table(rows))
    result = goals(rows)
    print(json.dumps(result, indent=2))
    print(json.dumps({"rows": rows, "goals": result}, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
