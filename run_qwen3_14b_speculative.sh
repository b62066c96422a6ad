#!/usr/bin/env bash
# Run the speculative decoding demo on example_prompts.txt; extra arguments pass through
# (e.g. ./run_qwen3_14b_speculative.sh --gamma 6 --save_results). PYTHON picks the interpreter.
# With --prompts or --preset among the arguments, example_prompts.txt is not added. Paths in the
# arguments are taken relative to the folder you run this from (results go to ./output/... there).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
prompts=(--prompts "$here/example_prompts.txt")
for arg in "$@"; do
  case "$arg" in --prompts|--prompts=*|--preset|--preset=*) prompts=() ;; esac
done
exec "${PYTHON:-python3}" "$here/qwen3_14b_speculative_demo.py" "${prompts[@]}" "$@"
