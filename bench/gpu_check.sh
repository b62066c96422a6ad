#!/usr/bin/env bash
# GPU timing check on random-init real-shape Qwen3-0.6B / Qwen3-14B (no download, no internet):
# eager and compiled steps, fusion, forced-accept round overhead, HF generate per token, and the
# predicted speedups. Writes JSON under ${OUT:-output/gpu_check}. Budget: under 8 minutes on one H100.
#   bash bench/gpu_check.sh            (PYTHON picks the interpreter)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
OUT_DIR="${OUT:-output/gpu_check}"
mkdir -p "$OUT_DIR"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
} | tee "$OUT_DIR/versions.txt"
# 1. compiled fast path (CUDA graphs), gammas 2, 4, 6 (each gamma compiles its own verify and fusion graphs)
timeout 420 "$PY" speculative_benchmark.py --synthetic qwen3 --compile --dtype bfloat16 --gammas 2 4 6 \
  --iters 30 --max_new_tokens 64 --output_dir "$OUT_DIR" 2>&1 | tee "$OUT_DIR/synthetic_compiled.log"
# 2. correctness on the GPU: the tiny preset, eager and compiled, outputs must match the target
timeout 120 "$PY" speculative_benchmark.py --preset tiny --device cuda --dtype float32 --gammas 4 --repeats 1 \
  --modes target speculative speculative_fused --max_new_tokens 64 --no_plots --compile \
  --output_dir "$OUT_DIR" 2>&1 | tail -n 1 | tee "$OUT_DIR/tiny_compiled_cuda.json"
