#!/usr/bin/env python3
"""Time training steps of the fuser trainer at real shapes without weights: random-init Qwen3-0.6B
and Qwen3-14B (`--synthetic qwen3`, bf16 on the GPU) and a fresh 0.6B <- 14B fuser (float32, hidden
1024), on random token windows. Reports seconds per step, supervised and target tokens per second
and peak memory, the figures the training recipe (docs/training.md) is computed from. Random
weights: timing only, nothing about what the fuser learns. `--synthetic tiny` runs on a CPU (tests).
`--lengths varied`: chat-like rows instead (a 32-token prompt, then an answer of a length drawn
uniformly up to --seq_len), batched as the trainer does (right-padded, from a length-sorted pool of
--length_pool batches), so the padding share and its cost are measured too.

    python bench/train_step.py --synthetic qwen3 --batch_size 8 --seq_len 512 --steps 5   # one GPU

Writes <output_dir>/train_step_<time>.json; the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from c2c.tools import synthetic, train_data, training  # noqa: E402
from c2c.app.cli import run_main  # noqa: E402
from c2c.core.engine import sync_device  # noqa: E402
from c2c.app.results import check_output_dir, command_line, environment, save_json_atomic  # noqa: E402


def run(args, argv) -> int:
    check_output_dir(args.output_dir)
    device, dtype = synthetic.resolve(args)
    pair = synthetic.build(args.synthetic, device, dtype)
    vocab = pair.target.config.vocab_size
    g = torch.Generator().manual_seed(0)
    rows = max(4 * args.batch_size * args.length_pool, 16)
    if args.lengths == "fixed":
        windows = torch.randint(0, vocab, (rows, args.seq_len), generator=g)
        data = train_data.SplitData.from_windows(windows, args.min_prefix, args.gamma)
    else:
        lengths = torch.randint(min(48, args.seq_len), args.seq_len + 1, (rows,), generator=g).tolist()
        data = train_data.SplitData.from_answers(
            [(torch.randint(0, vocab, (n,), generator=g).tolist(), min(32, n - 2)) for n in lengths], args.gamma)
    hidden = synthetic.SHAPES[args.synthetic]["fuser_hidden"]
    cfg = training.TrainConfig(draft_model=args.synthetic, target_model=args.synthetic, data="random tokens",
                               output_dir=str(Path(args.output_dir) / "train_step_scratch"), steps=10**6,
                               batch_size=args.batch_size, seq_len=args.seq_len, gamma=args.gamma,
                               min_prefix=args.min_prefix, hidden_dim=hidden, intermediate_dim=hidden,
                               eval_every=10**6, save_every=10**6, suffixes=args.suffixes, device=str(device),
                               draft_kv=args.draft_kv, length_pool=args.length_pool)
    trainer = training.FuserTrainer(cfg, pair.target, pair.draft, data, data, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds, target_tokens, supervised, padding = [], [], [], []
    for i in range(args.warmup + args.steps):
        before = (trainer.target_tokens, trainer.supervised_tokens, trainer.padding_tokens)
        sync_device(device)
        t0 = time.perf_counter()
        trainer.train_step()
        sync_device(device)
        if i >= args.warmup:
            seconds.append(time.perf_counter() - t0)
            target_tokens.append(trainer.target_tokens - before[0])
            supervised.append(trainer.supervised_tokens - before[1])
            padding.append(trainer.padding_tokens - before[2])
    step = statistics.median(seconds)
    result = {
        "config": {"command": command_line(argv), "synthetic": args.synthetic, "batch_size": args.batch_size,
                   "seq_len": args.seq_len, "gamma": args.gamma, "suffixes": args.suffixes, "steps": args.steps,
                   "lengths": args.lengths, "length_pool": args.length_pool, "draft_kv": args.draft_kv,
                   "warmup": args.warmup, "dtype": str(dtype).removeprefix("torch."), "fuser_hidden": hidden},
        "environment": environment(device),
        "timings": {
            "seconds_per_step": step, "seconds": seconds,
            "target_tokens_per_step": statistics.mean(target_tokens),
            "supervised_tokens_per_step": statistics.mean(supervised),
            "padding_share": sum(padding) / sum(target_tokens),
            "target_tokens_per_second": statistics.mean(target_tokens) / step,
            "supervised_tokens_per_second": statistics.mean(supervised) / step,
            "peak_memory_gb": training.peak_memory_gb(device),
            "trained_parameters": sum(p.numel() for p in trainer.trained),
        },
    }
    path = save_json_atomic(result, args.output_dir, prefix="train_step")
    t = result["timings"]
    print(f"{step:.3f} s/step | {t['supervised_tokens_per_second']:,.0f} supervised tokens/s | padding {t['padding_share']:.0%} | "
          f"{t['target_tokens_per_second']:,.0f} target tokens/s | peak {t['peak_memory_gb']:.1f} GB | {path}",
          file=sys.stderr)
    print(json.dumps({"seconds_per_step": step, "supervised_tokens_per_second": t["supervised_tokens_per_second"],
                      "peak_memory_gb": t["peak_memory_gb"], "path": str(path)}))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    synthetic.add_arguments(p, synthetic="qwen3", threads=0)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--seq_len", type=int, default=512)
    p.add_argument("--gamma", type=int, default=4)
    p.add_argument("--min_prefix", type=int, default=8)
    p.add_argument("--suffixes", choices=training.SUFFIXES, default="all")
    p.add_argument("--draft_kv", choices=("decode", "plain"), default="decode")
    p.add_argument("--lengths", choices=("fixed", "varied"), default="fixed",
                   help="fixed: windows of --seq_len; varied: chat-like rows of random lengths up to --seq_len")
    p.add_argument("--length_pool", type=int, default=training.TrainConfig("", "", "", "").length_pool)
    p.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--output_dir", default="output/train_step")
    args = p.parse_args(argv)
    return run_main(run, args, argv)


if __name__ == "__main__":
    sys.exit(main())
