"""Command line of the fuser trainer: `python -m c2c.train_fuser --help`.

Trains C2C projectors for any draft/target pair (Hub ids or local folders), both models frozen,
and writes the official C2C layout (`<output_dir>/final/`) plus `<output_dir>/config.json`.
Optional, not C2C: `--draft_adapter lora|full` trains a draft adapter jointly with the projectors,
written to `<output_dir>/draft_adapter/` and applied by the demo whenever that fuser is used.
Example (the recipe for Qwen3-0.6B <- Qwen3-14B is in docs/training.md):

    python -m c2c.train_fuser --base_model Qwen/Qwen3-0.6B --teacher_model Qwen/Qwen3-14B \\
        --data corpus.jsonl --output_dir output/fusers/qwen3_0.6b+qwen3_14b_Fuser --steps 4000
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields

import torch

from .cli import OneLineParser, apply_threads, run_main
from .training import TrainConfig


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m c2c.train_fuser", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--base_model", required=True, help="draft (C2C receiver): Hub id or folder")
    p.add_argument("--teacher_model", required=True, help="target (C2C sharer): Hub id or folder")
    p.add_argument("--data", required=True, help="plain text file, or JSONL with a 'text' or 'prompt' field per line")
    p.add_argument("--output_dir", required=True, help="fuser folder to write (final/, config.json, checkpoints/)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    defaults = TrainConfig("", "", "", "")
    skip = {"draft_model", "target_model", "data", "output_dir"}
    for f in fields(TrainConfig):
        if f.name in skip:
            continue
        value = getattr(defaults, f.name)
        if isinstance(value, bool):
            p.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=value)
        else:
            p.add_argument(f"--{f.name}", type=type(value) if value is not None else int, default=value)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_main(run, args)


def run(args) -> int:
    from pathlib import Path

    from . import training
    from .loading import DTYPES, eos_token_ids, load_model, load_tokenizer, resolve_device, resolve_dtype

    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    cfg = TrainConfig(draft_model=args.base_model, target_model=args.teacher_model, **values)
    threads = apply_threads(cfg.threads)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    texts = training.read_texts(cfg.data)
    tokenizer = load_tokenizer(cfg.target_model)
    target = load_model(cfg.target_model, "target", dtype, device)
    draft = load_model(cfg.draft_model, "draft", dtype, device)
    eos = eos_token_ids(target, tokenizer)
    if cfg.generate_from_target:
        print(f"target answering {len(texts)} prompts (at most {cfg.generate_from_target} tokens each)", file=sys.stderr)
        items = training.target_generations(target, tokenizer, texts, cfg.generate_from_target, eos)
        train_items, held_items = training.split_heldout(items, cfg.heldout_fraction)
        data = training.SplitData.from_answers(train_items, cfg.gamma)
        heldout = training.SplitData.from_answers(held_items, cfg.gamma)
        unit = "problems (suffixes inside the answers)"
    else:
        streams = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        windows = training.make_windows(streams, cfg.seq_len, tokenizer.eos_token_id)
        train_windows, held_windows = training.split_heldout(list(windows), cfg.heldout_fraction)
        data = training.SplitData.from_windows(torch.stack(train_windows), cfg.min_prefix, cfg.gamma)
        heldout = training.SplitData.from_windows(torch.stack(held_windows), cfg.min_prefix, cfg.gamma)
        unit = f"windows of {cfg.seq_len} tokens"
    print(f"{data.rows} training and {heldout.rows} held-out {unit}; {threads} CPU thread(s)", file=sys.stderr)
    trainer = training.FuserTrainer(cfg, target, draft, data, heldout, device)
    if args.resume:
        latest = training.latest_checkpoint(cfg.output_dir)
        if latest is None:
            print(f"no checkpoint in {cfg.output_dir}/checkpoints: starting from step 0", file=sys.stderr)
        else:
            trainer.load_checkpoint(latest)
            print(f"resumed from {latest} (step {trainer.step})", file=sys.stderr)
    result = trainer.train(progress=not args.no_progress)
    save_dtype = (torch.bfloat16 if dtype == torch.bfloat16 else torch.float32) if cfg.save_dtype == "auto" else DTYPES[cfg.save_dtype]
    extra = {"sequences": {"train": data.rows, "heldout": heldout.rows}, "history": result["history"],
             "train_seconds": result["seconds"]}
    out, config = Path(cfg.output_dir), training.run_config(cfg, extra)
    if cfg.fusion:
        final = training.save_fuser(trainer.fuser, out, config=config, dtype=save_dtype)
    else:  # the adapter-alone arm: no projectors were trained, so none are written (not loadable as a fuser)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(config, indent=2, default=str))
        final = out
    last = result["history"][-1]
    if trainer.adapter is not None:
        from .adapter import ADAPTER_DIR

        saved = trainer.adapter.save(out / ADAPTER_DIR, dtype=save_dtype,
                                     extra={"draft_model": cfg.draft_model, "trained_with_fusion": cfg.fusion})
        print(f"saved the draft adapter ({cfg.draft_adapter}) to {saved}; held-out agreement of the adapted draft "
              f"without fusion {last['agreement_adapter_only']:.4f}", file=sys.stderr)
    what = "fused" if cfg.fusion else "adapted draft"
    print(f"saved {final} | held-out top-1 agreement {what} {last['agreement_fused']:.4f} vs unfused "
          f"{last['agreement_unfused']:.4f} on {last['heldout_tokens']} suffix tokens (won {last['won']}, lost "
          f"{last['lost']}); open gates {last['open_gates']}/{last['gates']}")
    if cfg.fusion and last["open_gates"] == 0:
        print("WARNING: no gate is open: this fuser changes nothing (every gate logit <= 0)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
