#!/usr/bin/env python3
"""Speculative decoding demo for any pair: a small draft proposes tokens, a large target verifies
them, optionally a C2C Fuser feeds the target's KV cache into the draft.

Any decoder-only pair that shares a tokenizer (Hub ids or local folders), e.g.
    python demo_speculative_decoding.py --base_model meta-llama/Llama-3.2-1B-Instruct \
        --teacher_model meta-llama/Llama-3.1-8B-Instruct
    python demo_speculative_decoding.py --base_model Qwen/Qwen2.5-0.5B-Instruct \
        --teacher_model Qwen/Qwen2.5-7B-Instruct --prompts prompts/spec_bench_mini.jsonl --save_results
The same flags, report and JSON as `qwen3_14b_speculative_demo.py` (both are `c2c.app.demo`), but no
default models: --base_model and --teacher_model are required, and fusion is on only when
--fuser_checkpoint names a fuser. Tested architectures: docs/architectures.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from c2c.app import demo

DEFAULTS = dataclasses.replace(demo.GENERIC, description=" ".join(__doc__.split("\n\n")[0].split()),
                               prompts=str(Path(__file__).resolve().parent / "example_prompts.txt"))


def build_parser() -> argparse.ArgumentParser:
    return demo.build_parser(DEFAULTS)


def main(argv: list[str] | None = None) -> int:
    return demo.main(DEFAULTS, argv)


if __name__ == "__main__":
    sys.exit(main())
