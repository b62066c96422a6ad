#!/usr/bin/env python3
"""Fewer matrix products per draft step (issue 15, item 3), measured before it is adopted: the
random-init Qwen3-0.6B (real shapes; `--synthetic tiny` for a quick run) compiled as the engine
compiles its draft step, against the same compile with inductor's weight freezing, whose
concat-linear patterns turn each layer's q/k/v projections into one matrix product and gate/up
into another (7 -> 4 per layer). For each: compile seconds, the matrix products in the compiled
graph, the median one-token step (CUDA graphs on a GPU), the extra memory the frozen constants
take, and how far its logits are from the eager model's over --check steps (the draft only
proposes, so a difference never changes the output; it can change acceptance).

    python bench/draft_kernels.py --synthetic qwen3 --device cuda            # GPU, bf16
    OMP_NUM_THREADS=1 python bench/draft_kernels.py --synthetic tiny         # CPU, seconds

The engine does not use freezing: it would hold a second, concatenated copy of those weights per
compiled graph (~0.6 GB for the 0.6B in bf16, several graphs), and its gain is unmeasured on a GPU.
Writes <output_dir>/draft_kernels_<time>.json; the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from c2c.core import cache as kv  # noqa: E402
from c2c.tools import synthetic  # noqa: E402
from c2c.app.cli import run_main  # noqa: E402
from c2c.core.engine import CompiledSteps, sync_device  # noqa: E402
from c2c.app.results import check_output_dir, command_line, environment, save_json_atomic  # noqa: E402

# calls to matrix-product kernels in inductor's generated code (cuBLAS / oneDNN / MKL)
MATMUL_CALLS = re.compile(r"extern_kernels\.(?:mm|addmm|bmm|baddbmm)\(|torch\.ops\.(?:mkl\._mkl_linear|mkldnn\._linear_pointwise)\.\w+\(")


def count_matmuls(code: list[str]) -> int:
    return sum(len(MATMUL_CALLS.findall(source)) for source in code)


def measure(model, device, frozen: bool, context: int, iters: int, check: int) -> dict:
    import torch._inductor.config as inductor_config
    from torch._inductor.utils import run_and_get_code

    # freezing is read outside torch.compile's `options`, so it is patched around the compiling call;
    # on the CPU the concat patterns need their own switch
    patch = inductor_config.patch(freezing=frozen, **({"cpp.enable_concat_linear": frozen} if device.type == "cpu" else {}))
    torch._dynamo.reset()
    step = torch.compile(model, mode="reduce-overhead" if device.type == "cuda" else None, dynamic=False)
    vocab = model.config.vocab_size
    cache, reference = kv.new_cache(model, context + check + 8), kv.new_cache(model, context + check + 8)
    prompt = torch.randint(0, vocab, (1, context), device=device)
    token = torch.randint(0, vocab, (1, 1), device=device)
    with torch.inference_mode():
        kv.forward(model, prompt, cache, 0, logits_to_keep=1)
        kv.forward(model, prompt, reference, 0, logits_to_keep=1)
        memory0 = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        t0 = time.perf_counter()
        CompiledSteps.step_begin(device)
        with patch:
            _, code = run_and_get_code(kv.forward, model, token, cache, context, logits_to_keep=1, call=step)
        sync_device(device)
        compile_s = time.perf_counter() - t0
        extra = (torch.cuda.memory_allocated(device) - memory0) if device.type == "cuda" else None
        times = []
        for _ in range(iters + 3):
            kv.crop(cache, context)
            sync_device(device)
            t0 = time.perf_counter()
            CompiledSteps.step_begin(device)
            kv.forward(model, token, cache, context, logits_to_keep=1, call=step)
            sync_device(device)
            times.append(time.perf_counter() - t0)
        kv.crop(cache, context)
        worst, agree, feed = 0.0, 0, token
        for i in range(check):  # greedy steps: compiled against eager, the eager token fed to both
            CompiledSteps.step_begin(device)
            a = kv.forward(model, feed, cache, context + i, logits_to_keep=1, call=step)[0, -1].float()
            b = kv.forward(model, feed, reference, context + i, logits_to_keep=1)[0, -1].float()
            worst = max(worst, (a - b).abs().max().item())
            agree += int(a.argmax() == b.argmax())
            feed = b.argmax().view(1, 1)
    return {"frozen": frozen, "compile_seconds": compile_s, "matmuls_per_step": count_matmuls(code),
            "step_ms_median": statistics.median(times[3:]) * 1e3,
            "extra_memory_bytes": extra, "max_abs_logit_diff_vs_eager": worst, "argmax_agree": f"{agree}/{check}"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    synthetic.add_arguments(ap)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--check", type=int, default=32, help="greedy steps compared with the eager model")
    ap.add_argument("--output_dir", default="output")
    args = ap.parse_args(argv)
    check_output_dir(args.output_dir)
    device, dtype = synthetic.resolve(args, needs_target=False)  # the draft alone
    torch.manual_seed(0)
    model = synthetic.build_model(args.synthetic, "draft", device, dtype)
    rows = []
    for frozen in (False, True):
        row = measure(model, device, frozen, args.context, args.iters, args.check)
        rows.append(row)
        print(f"{'frozen (concat q/k/v, gate/up)' if frozen else 'as the engine compiles'}: "
              f"{row['matmuls_per_step']} matrix products per step, step {row['step_ms_median']:.3f} ms, "
              f"compile {row['compile_seconds']:.1f} s, max |logit diff| vs eager {row['max_abs_logit_diff_vs_eager']:.3g}, "
              f"argmax agree {row['argmax_agree']}", flush=True)
    report = {"synthetic": args.synthetic, "draft": synthetic.SHAPES[args.synthetic]["draft"], "dtype": str(dtype).removeprefix("torch."),
              "context": args.context, "command": command_line(argv), "environment": environment(device), "rows": rows}
    path = save_json_atomic(report, args.output_dir, prefix="draft_kernels")
    print(f"results: {path}")
    print(json.dumps({"rows": rows, "path": str(path)}))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
