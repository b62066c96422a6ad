#!/usr/bin/env python3
"""Speculative decoding demo: Qwen3-0.6B drafts, Qwen3-14B verifies, a C2C Fuser feeds the
target's KV cache into the draft.

For each prompt it runs the target alone (standard), then speculative decoding, prints both and
their comparison, and ends with a summary; `--save_results` writes everything to a JSON file.
Run `python qwen3_14b_speculative_demo.py --help` for the flags; see docs/report.md for the metrics.
The flags and the run are `c2c.app.demo`'s, shared with the generic `demo_speculative_decoding.py`;
this script gives them Qwen3 defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from c2c.app import demo

DEFAULTS = dataclasses.replace(demo.QWEN3, description=" ".join(__doc__.split("\n\n")[0].split()),
                               prompts=str(Path(__file__).resolve().parent / "example_prompts.txt"))


def build_parser() -> argparse.ArgumentParser:
    return demo.build_parser(DEFAULTS)


def main(argv: list[str] | None = None) -> int:
    return demo.main(DEFAULTS, argv)


if __name__ == "__main__":
    sys.exit(main())
