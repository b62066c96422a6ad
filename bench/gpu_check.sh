#!/usr/bin/env bash
# GPU check on random-init real-shape Qwen3-0.6B / Qwen3-14B (no download, no internet) plus the
# shipped presets' correctness on CUDA. Steps run in order of value, each under what is left of
# BUDGET seconds (default 480), each writing its log/JSON under ${OUT:-output/gpu_check} as it goes:
#   1. --preset tiny compiled on CUDA: the new fast path (one-graph greedy draft round, verify with the
#      acceptance in one graph, batched fusion, pooled caches) must give the target's outputs
#   2. synthetic compiled (CUDA graphs) timings, gamma 4: draft step, verify, fusion, the forced-accept
#      round, round / target step, predictions, compile seconds (about 4-5 minutes on a fresh H100,
#      mostly compiling; it also times the eager 14B and 0.6B steps)
#   3. --preset arith compiled on CUDA (lossless, accepted length; one untimed warm-up run)
#   4. fuser training steps at real shapes (random weights, bf16, batch 8 x 512, all-position objective,
#      decode-time draft K/V): fixed windows, then chat-like rows of varied lengths (right-padded,
#      length-sorted pool): seconds, supervised tokens/s, padding share, peak memory, for the recipe
#   5. the draft step with inductor's weight freezing (q/k/v and gate/up as one matrix product each)
#      against the engine's compile: matrix products, step time, extra memory (bench/draft_kernels.py)
#   6. tree rounds: --preset tiny with --tree_budget 32 on CUDA, compiled (CUDA graphs: lossless, tokens per
#      target call), the tree round's graphs and launches (bench/round_ops.py --tree, tiny shapes), and the
#      14B verify of 1..64 tokens (eager) and of 5 and 32 tokens compiled (bench/verify_blocks.py), the
#      cost a tree adds over a chain
#   6b. --preset tiny and --preset arith eager (lossless; measured twice already on an H100)
#   7. step 2 again: what torch's compile cache saves on a second run (its compile_seconds and warm-up)
#   6c. parallel drafting: --preset tiny with its PARD-layout draft (presets/tiny/pard_draft) compiled on CUDA
#      (lossless, one draft forward a round), and the 0.6B forward of 1, 4, 8, 12, 16, 24 tokens at real shapes
#      (bench/verify_blocks.py --draft_compiled: parallel drafting's block of 2K tokens for K = 2..12); step 2's
#      synthetic JSON also holds draft_block_8 and the parallel round's predicted speedup; then --preset arith
#      --parallel_drafting compiled (fusion on top of its PARD draft under CUDA graphs: lossless, tokens per call)
#   8. synthetic eager timings: target/draft steps, verify, fusion, round overhead, HF generate, gammas 2 4 6
#      (measured twice already; runs if budget is left)
#   BUDGET=480 bash bench/gpu_check.sh            (PYTHON picks the interpreter)
# Afterwards: unpack json.tgz and commit its synthetic_*.json under bench/results/ (the docs cite them).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
OUT_DIR="${OUT:-output/gpu_check}"
BUDGET="${BUDGET:-480}"
export PYTHONUNBUFFERED=1
mkdir -p "$OUT_DIR"
left() { echo $(( BUDGET - SECONDS )); }
step() {  # step NAME MAX_SECONDS CMD...: runs CMD under min(MAX, time left), log in $OUT_DIR/NAME.log
  local name=$1 max=$2; shift 2
  local t=$(( $(left) < max ? $(left) : max ))
  if (( t < 20 )); then echo "== $name: skipped (budget spent)" | tee -a "$OUT_DIR/summary.txt"; return; fi
  echo "== $name (limit ${t}s)"
  local s0=$SECONDS
  timeout "$t" "$@" > "$OUT_DIR/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT_DIR/$name.log"
  echo "== $name: rc=$rc in $(( SECONDS - s0 ))s" | tee -a "$OUT_DIR/summary.txt"
}
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
} | tee "$OUT_DIR/versions.txt"
JSON_DIR="$OUT_DIR/json"  # result JSONs, packed into one json.tgz at the end ($OUT brings back at most 8 files)
mkdir -p "$JSON_DIR"
COMMON=(--device cuda --dtype float32 --gammas 4 --repeats 1 --warmup 0 --no_plots --output_dir "$JSON_DIR")
step tiny_compiled 120 "$PY" speculative_benchmark.py --preset tiny "${COMMON[@]}" \
  --modes target speculative speculative_fused --max_new_tokens 64 --num_prompts 4 --compile --warmup 1
step synthetic_compiled 400 "$PY" speculative_benchmark.py --synthetic qwen3 --compile --dtype bfloat16 --gammas 4 \
  --iters 10 --max_new_tokens 32 --output_dir "$JSON_DIR"
step arith_compiled 120 "$PY" speculative_benchmark.py --preset arith "${COMMON[@]}" \
  --modes target speculative speculative_fused --num_prompts 8 --compile --warmup 1
step train_step 150 "$PY" bench/train_step.py --synthetic qwen3 --batch_size 8 --seq_len 512 --steps 3 --warmup 1 \
  --output_dir "$JSON_DIR"
step train_step_varied 120 "$PY" bench/train_step.py --synthetic qwen3 --batch_size 8 --seq_len 512 --steps 3 --warmup 1 \
  --lengths varied --output_dir "$JSON_DIR"
step draft_kernels 150 "$PY" bench/draft_kernels.py --synthetic qwen3 --device cuda --output_dir "$JSON_DIR"
step tiny_tree 120 "$PY" qwen3_14b_speculative_demo.py --preset tiny --device cuda --dtype float32 --compile \
  --tree_budget 32 --tree_depth 4 --tree_topk 4 --max_new_tokens 64 --lang en --save_results --output_dir "$JSON_DIR"
step tree_round_ops 90 "$PY" bench/round_ops.py --synthetic tiny --device cuda --tree 32,4,4 --runs 3 --rounds 40
step verify_blocks 240 "$PY" bench/verify_blocks.py --synthetic qwen3 --device cuda --compiled 5 32 --output_dir "$JSON_DIR"
step tiny_parallel 120 "$PY" speculative_benchmark.py --preset tiny --base_model presets/tiny/pard_draft \
  --fuser_checkpoint none "${COMMON[@]}" --modes target speculative --parallel_drafting --gammas 4 8 \
  --max_new_tokens 64 --num_prompts 4 --compile --warmup 1
step arith_parallel 120 "$PY" speculative_benchmark.py --preset arith "${COMMON[@]}" \
  --modes target speculative speculative_fused --parallel_drafting --num_prompts 8 --compile --warmup 1
step draft_blocks 150 "$PY" bench/verify_blocks.py --synthetic qwen3 --device cuda --blocks 1 --draft_blocks 1 8 16 24 \
  --draft_compiled 1 4 8 12 16 24 \
  --output_dir "$JSON_DIR"
step tiny_eager 60 "$PY" speculative_benchmark.py --preset tiny "${COMMON[@]}" \
  --modes target speculative speculative_fused --max_new_tokens 64 --num_prompts 8
step arith_eager 60 "$PY" speculative_benchmark.py --preset arith "${COMMON[@]}" \
  --modes target speculative speculative_fused --num_prompts 20
step synthetic_compiled_cached 300 "$PY" speculative_benchmark.py --synthetic qwen3 --compile --dtype bfloat16 --gammas 4 \
  --iters 10 --max_new_tokens 32 --output_dir "$JSON_DIR"
step synthetic_eager 150 "$PY" speculative_benchmark.py --synthetic qwen3 --dtype bfloat16 --gammas 2 4 6 \
  --iters 10 --max_new_tokens 32 --output_dir "$JSON_DIR"
tar czf "$OUT_DIR/json.tgz" -C "$OUT_DIR" json && rm -rf "$JSON_DIR"
echo "total ${SECONDS}s" | tee -a "$OUT_DIR/summary.txt"
