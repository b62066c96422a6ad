"""Timing the parts of speculative decoding on real-shape models with random weights.

No download: Qwen3-0.6B and Qwen3-14B are built from their public config numbers directly on the
device (bf16 on GPU), with a 0.6B <- 14B fuser (hidden 1024). Random weights make acceptance
meaningless, so this times the parts instead: the target's one-token step and (gamma+1)-token
verify, the draft's step eager and compiled, the fusion of one round's tokens, and the engine's
per-round overhead with every draft token forced accepted (a timing-only switch). Beside each
step it prints the weight-read floor (bytes of weights / memory bandwidth) and, from the measured
parts, the predicted speedup at alpha 0.6, 0.7 and 0.8 for each gamma.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..core import cache as kv
from ..app.cli import apply_threads
from ..core.engine import CompiledSteps, SpecConfig, SpeculativeDecoder, model_device
from ..core.timing import forward_time, time_it  # noqa: F401 (re-exported: bench scripts time with them)
from ..errors import UserInputError
from ..core.fuser import C2CFuser, KVShape
from ..app.loading import resolve_device, resolve_dtype
from ..core.metrics import expected_tokens_per_round
from ..core.sampling import SamplingConfig

# Public config numbers (see ../shared/docs/c2c-fuser.md); "tiny" keeps the structure at toy size for tests.
SHAPES = {
    "qwen3": {
        "draft": dict(num_hidden_layers=28, hidden_size=1024, intermediate_size=3072, num_attention_heads=16,
                      num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True),
        "target": dict(num_hidden_layers=40, hidden_size=5120, intermediate_size=17408, num_attention_heads=40,
                       num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=False),
        "fuser_hidden": 1024,
    },
    "tiny": {
        "draft": dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=32, vocab_size=512, tie_word_embeddings=True),
        "target": dict(num_hidden_layers=4, hidden_size=128, intermediate_size=256, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=32, vocab_size=512, tie_word_embeddings=False),
        "fuser_hidden": 32,
    },
}
# Peak memory bandwidth in bytes/s by device name fragment (vendor data sheets).
BANDWIDTH = {"H200": 4.8e12, "H100 PCIe": 2.0e12, "H100": 3.35e12, "A100-SXM4-80GB": 2.039e12, "A100": 1.555e12,
             "L40S": 0.864e12, "RTX 4090": 1.008e12}


@dataclass(frozen=True)
class SyntheticPair:
    target: torch.nn.Module
    draft: torch.nn.Module
    fuser: C2CFuser


def add_arguments(parser, synthetic: str = "tiny", device: str = "auto", threads: int = 1) -> None:
    """The options the timing scripts under bench/ share: shapes, device, dtype, torch threads."""
    parser.add_argument("--synthetic", choices=sorted(SHAPES), default=synthetic)
    parser.add_argument("--device", default=device)
    parser.add_argument("--dtype", default="auto", help="auto: bfloat16 on a GPU, float32 on the CPU")
    parser.add_argument("--threads", type=int, default=threads, help="torch CPU threads (0: one per physical core)")


def resolve(args, needs_target: bool = True) -> tuple[torch.device, torch.dtype]:
    """Apply `add_arguments`' options: torch threads, then the device and dtype. The real-shape pair
    needs a GPU (a 14B target); the real-shape draft alone (`needs_target` False) runs on a CPU."""
    apply_threads(args.threads)
    device = resolve_device(args.device)
    if needs_target and args.synthetic == "qwen3" and device.type != "cuda":
        raise UserInputError("--synthetic qwen3 needs a GPU (a 14B target); use --synthetic tiny on a CPU")
    return device, resolve_dtype(args.dtype, device)


def build_model(name: str, role: str, device: torch.device, dtype: torch.dtype):
    """One random-init model of the named shapes ("target" or "draft"), created directly on `device` in
    `dtype` (seeded by the caller)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(**SHAPES[name][role], max_position_embeddings=4096, eos_token_id=None, pad_token_id=None,
                         bos_token_id=None)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return Qwen3ForCausalLM(config).eval().requires_grad_(False)
    finally:
        torch.set_default_dtype(previous)


def build(name: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> SyntheticPair:
    """Random-init models and fuser of the named shapes, created directly on `device` in `dtype`."""
    shapes = SHAPES[name]
    torch.manual_seed(seed)
    models = [build_model(name, role, device, dtype) for role in ("target", "draft")]
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            fuser = C2CFuser.create(KVShape.of(models[1].config), KVShape.of(models[0].config),
                                    hidden_dim=shapes["fuser_hidden"], intermediate_dim=shapes["fuser_hidden"], dtype=dtype)
    finally:
        torch.set_default_dtype(previous)
    for p in fuser.projectors:  # open gates, so fusion does its full work
        p.key_gate_logit.data.fill_(1.0)
        p.value_gate_logit.data.fill_(1.0)
    return SyntheticPair(models[0], models[1], fuser.eval().requires_grad_(False))


def weight_bytes(model) -> int:
    """Bytes read per decode step: every parameter once (tied embeddings counted once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def bandwidth_of(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((bw for key, bw in BANDWIDTH.items() if key in name), None)


def _fusion_timer(pair: SyntheticPair, tokens: int, context: int, iters: int, warmup: int, compiled) -> float:
    """Seconds to fuse `tokens` positions: the compiled fixed window the fast path uses, or eager slices."""
    from ..core.engine import fuse_positions, fuse_window, static_capacity

    device = model_device(pair.draft)
    fusion = pair.fuser.batched()  # what the engine fuses with
    if compiled:
        capacity = static_capacity(context + 1)
        t_cache, d_cache = compiled.cache(pair.target, capacity), compiled.cache(pair.draft, capacity, "draft")
    else:
        t_cache, d_cache = kv.new_cache(pair.target), kv.new_cache(pair.draft)
    prompt = torch.randint(0, pair.target.config.vocab_size, (1, context), device=device)
    with torch.inference_mode():
        kv.forward(pair.target, prompt, t_cache, 0, logits_to_keep=1)
        kv.forward(pair.draft, prompt, d_cache, 0, logits_to_keep=1)
        if compiled is None:
            return time_it(lambda: fuse_positions(fusion, t_cache, d_cache, context - tokens, context), device, iters, warmup)
        step = compiled.function(fuse_window, device)
        positions = torch.arange(context - tokens, context, device=device)
        keep = torch.zeros(tokens, dtype=torch.bool, device=device)  # same work; values stay put across iterations

        def fuse():
            CompiledSteps.step_begin(device)
            step(fusion, t_cache, d_cache, positions, keep)

        return time_it(fuse, device, iters, warmup)


def _overhead_per_round(pair: SyntheticPair, gamma: int, context: int, new_tokens: int, compiled) -> dict:
    """Forced-accept runs: per-round seconds of each phase, the engine's own overhead among them."""
    prompt = torch.randint(0, pair.target.config.vocab_size, (context,), device="cpu").tolist()
    spec = SpecConfig(gamma, new_tokens, True, True)
    make = lambda: SpeculativeDecoder(pair.target, pair.draft, spec, SamplingConfig(), set(), fuser=pair.fuser,  # noqa: E731
                                      compiled=compiled, force_accept=True)
    with torch.inference_mode():
        t0 = time.perf_counter()
        make().generate(prompt)  # warm-up (and compilation of the round's graphs)
        warmup = time.perf_counter() - t0
        result = make().generate(prompt)
    c = result.counters
    per_round = {phase: c.times.get(phase, 0.0) / c.rounds for phase in ("draft", "target", "fusion", "overhead")}
    per_round["latency_per_token"] = result.latency / len(result.output_ids)
    per_round["rounds"] = c.rounds
    per_round["warmup_seconds"] = warmup  # the first run: compiling on the fast path (cached by torch on a rerun)
    return per_round


def run(name: str, device: torch.device, dtype: torch.dtype, gammas: list[int], context: int = 128,
        iters: int = 20, warmup: int = 3, compile_steps: bool = True, new_tokens: int = 64, log=print) -> dict:
    """Every timing of the synthetic mode, as one JSON-ready dict."""
    t0 = time.perf_counter()
    pair = build(name, device, dtype)
    build_seconds = time.perf_counter() - t0
    compiled = CompiledSteps() if compile_steps else None
    bw = bandwidth_of(device)
    floors = {role: (weight_bytes(m) / bw if bw else None) for role, m in (("target", pair.target), ("draft", pair.draft))}
    steps: dict = {}

    def record(key, seconds, floor=None):
        steps[key] = {"seconds": seconds, "ms": seconds * 1e3, "floor_ms": floor * 1e3 if floor else None,
                      "vs_floor": seconds / floor if floor else None}
        log(f"{key:32s} {seconds * 1e3:9.3f} ms" + (f"   floor {floor * 1e3:7.3f} ms ({seconds / floor:.2f}x)" if floor else ""))

    record("target_step_eager", forward_time(pair.target, 1, context, None, iters, warmup), floors["target"])
    record("draft_step_eager", forward_time(pair.draft, 1, context, None, iters, warmup), floors["draft"])
    compile_seconds = None
    if compiled:
        t1 = time.perf_counter()
        forward_time(pair.draft, 1, context, compiled, 1, 1)
        forward_time(pair.target, 1, context, compiled, 1, 1)
        compile_seconds = time.perf_counter() - t1
        record("target_step_compiled", forward_time(pair.target, 1, context, compiled, iters, warmup), floors["target"])
        record("draft_step_compiled", forward_time(pair.draft, 1, context, compiled, iters, warmup), floors["draft"])
    per_gamma = {}
    for gamma in gammas:
        key = "compiled" if compiled else "eager"
        record(f"target_verify_{gamma + 1}_{key}", forward_time(pair.target, gamma + 1, context, compiled, iters, warmup), floors["target"])
        # parallel drafting's one draft forward: the block of 2 gamma tokens (window of gamma+1, gamma-1 masks)
        record(f"draft_block_{2 * gamma}_{key}", forward_time(pair.draft, 2 * gamma, context, compiled, iters, warmup), floors["draft"])
        record(f"fusion_{gamma + 1}_tokens", _fusion_timer(pair, gamma + 1, context, iters, warmup, compiled))
        rounds = _overhead_per_round(pair, gamma, context, new_tokens, compiled)
        per_gamma[gamma] = rounds
        log(f"round gamma={gamma}: " + ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in rounds.items() if k not in ("rounds", "warmup_seconds"))
            + f" (warm-up run {rounds['warmup_seconds']:.1f} s)")
    hf_ms = hf_generate_ms_per_token(pair.target, context, new_tokens)
    log(f"{'hf_generate_per_token':32s} {hf_ms:9.3f} ms")
    prediction = predict(steps, per_gamma, compiled is not None, hf_ms)
    return {
        "shapes": name, "device": str(device), "dtype": str(dtype).removeprefix("torch."), "context": context,
        "bandwidth_bytes_per_s": bw, "weight_bytes": {"target": weight_bytes(pair.target), "draft": weight_bytes(pair.draft)},
        "build_seconds": build_seconds, "compile_seconds": compile_seconds, "steps": steps,
        "rounds_forced_accept": per_gamma, "hf_generate_ms_per_token": hf_ms, "prediction": prediction,
    }


def hf_generate_ms_per_token(target, context: int, new_tokens: int) -> float:
    device = model_device(target)
    x = torch.randint(0, target.config.vocab_size, (1, context), device=device)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                  pad_token_id=0, attention_mask=torch.ones_like(x))
    with torch.inference_mode():
        target.generate(x, **(kwargs | {"max_new_tokens": 4, "min_new_tokens": 4}))
        short = time_it(lambda: target.generate(x, **(kwargs | {"max_new_tokens": 2, "min_new_tokens": 2})), device, 3, 0)
        full = time_it(lambda: target.generate(x, **kwargs), device, 3, 0)
    return (full - short) / (new_tokens - 2) * 1e3  # per decode token, prefill cancelled out


def predict(steps: dict, per_gamma: dict, compiled: bool, hf_ms: float) -> dict:
    """Predicted tokens/s gain at alpha 0.6/0.7/0.8 per gamma, from the measured parts of a round.

    A round costs gamma draft steps + one verify + fusion + overhead and yields E = (1-a^(g+1))/(1-a)
    tokens; target-only decoding costs one target step per token. `parallel`: the same with parallel
    drafting's one draft forward of 2 gamma tokens in place of the gamma steps (at the same alpha: what
    a parallel draft as good as the chain would give).
    """
    key = "compiled" if compiled else "eager"
    target_step = steps[f"target_step_{key}"]["seconds"]
    draft_step = steps[f"draft_step_{key}"]["seconds"]
    out: dict = {}
    for alpha in (0.6, 0.7, 0.8):
        rows = {}
        for gamma, rounds in per_gamma.items():
            round_s = gamma * draft_step + steps[f"target_verify_{gamma + 1}_{key}"]["seconds"] \
                + steps[f"fusion_{gamma + 1}_tokens"]["seconds"] + rounds["overhead"]
            tokens = expected_tokens_per_round(alpha, gamma)
            per_token = round_s / tokens
            rows[gamma] = {"vs_target_only": target_step / per_token, "vs_hf_generate": hf_ms / 1e3 / per_token,
                           "ms_per_token": per_token * 1e3}
            block = steps.get(f"draft_block_{2 * gamma}_{key}")
            if block is not None:
                parallel_s = round_s - gamma * draft_step + block["seconds"]
                rows[gamma] |= {"parallel_vs_target_only": target_step * tokens / parallel_s,
                                "parallel_draft_in_steps": block["seconds"] / draft_step}
            measured = sum(rounds.get(phase, 0.0) for phase in ("draft", "target", "fusion", "overhead"))
            if measured > 0:  # from the engine's own forced-accept round, with and without its fusion phase
                rows[gamma] |= {
                    "round_ms_measured": measured * 1e3, "round_in_target_steps": measured / target_step,
                    "vs_target_only_measured_round": target_step / (measured / tokens),
                    "vs_target_only_measured_round_no_fusion": target_step / ((measured - rounds.get("fusion", 0.0)) / tokens),
                }
        best = max(rows, key=lambda g: rows[g]["vs_hf_generate"])
        out[str(alpha)] = {"per_gamma": rows, "best_gamma": best, "best_vs_hf_generate": rows[best]["vs_hf_generate"],
                           "best_vs_target_only": rows[best]["vs_target_only"]}
    out["cost_ratio_c"] = draft_step / target_step
    return out
