#!/usr/bin/env bash
# Run the speculative decoding demo on example_prompts.txt; extra arguments pass through
# (e.g. ./run_qwen3_14b_speculative.sh --gamma 6 --save_results). PYTHON picks the interpreter.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
exec "${PYTHON:-python3}" qwen3_14b_speculative_demo.py --prompts example_prompts.txt "$@"
