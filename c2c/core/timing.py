"""Timing one forward or one step on the device: the median of several synchronised runs. The
application's `--tree_budget auto` times the target's verify sizes with it, and the synthetic timing
tools (c2c.tools.synthetic, bench/) time every step with it; it lives here so that the demo runs
without the tools package."""

from __future__ import annotations

import time
from statistics import median

import torch

from . import cache as kv
from .engine import CompiledSteps, model_device, step_forward, sync_device


def time_it(fn, device: torch.device, iters: int, warmup: int) -> float:
    """Median seconds of fn() over iters calls, device synchronised around each."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        sync_device(device)
        t0 = time.perf_counter()
        fn()
        sync_device(device)
        times.append(time.perf_counter() - t0)
    return median(times)


def forward_time(model, tokens: int, context: int, compiled: CompiledSteps | None, iters: int, warmup: int) -> float:
    """Seconds for one forward of `tokens` tokens after `context` cached positions (rolled back each time)."""
    device = model_device(model)
    vocab = model.config.vocab_size
    cache = compiled.cache(model, context + tokens + 1, "timer") if compiled else kv.new_cache(model)
    prompt = torch.randint(0, vocab, (1, context), device=device)
    block = torch.randint(0, vocab, (1, tokens), device=device)
    call = compiled(model) if compiled else None
    with torch.inference_mode():
        kv.forward(model, prompt, cache, 0, logits_to_keep=1)

        def step():
            step_forward(model, block, cache, context, logits_to_keep=0 if tokens > 1 else 1, call=call)
            kv.crop(cache, context)

        return time_it(step, device, iters, warmup)
