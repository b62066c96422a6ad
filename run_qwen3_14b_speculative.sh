#!/usr/bin/env bash
# Run the speculative decoding demo on example_prompts.txt; extra arguments pass through
# (e.g. ./run_qwen3_14b_speculative.sh --gamma 6 --save_results). PYTHON picks the interpreter.
# With --prompts or --preset among the arguments, example_prompts.txt is not added.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
prompts=(--prompts example_prompts.txt)
for arg in "$@"; do
  case "$arg" in --prompts|--prompts=*|--preset|--preset=*) prompts=() ;; esac
done
exec "${PYTHON:-python3}" qwen3_14b_speculative_demo.py "${prompts[@]}" "$@"
