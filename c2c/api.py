"""The engine from Python: load a draft, a target and an optional fuser once, then generate.

    from c2c.api import SpeculativePipeline

    pipe = SpeculativePipeline.load("Qwen/Qwen3-0.6B", "Qwen/Qwen3-14B", fuser="path/to/fuser")
    out = pipe.generate("Explain KV caches in one sentence.", max_new_tokens=64, gamma=4)
    print(out.text, out.metrics["average_accepted_length"])

Everything the demo does, without the command line: the same loading checks (errors are
`c2c.errors.UserInputError`, a ValueError, with the fix in the message), the same engine, the
same metrics dict as the demo's JSON (`out.metrics`), and optionally the target-only run with the
comparison (`compare=True`), per-round records (`rounds=True`) and streamed output (`stream=`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TextIO

from . import runner
from .stream import StreamPrinter, use_colour


@dataclass
class Generation:
    """One prompt's result."""

    text: str  # the speculative output (the target's own tokens), special tokens skipped
    ids: list[int]  # its token ids
    metrics: dict  # acceptance, accepted length, latency, tokens/s, time split... (the demo's "speculative" entry)
    standard: dict | None = None  # compare=True: the target-only run's metrics and text
    comparison: dict | None = None  # compare=True: outputs_match, first_divergence, speedup
    rounds: list[dict] | None = None  # rounds=True: each round's drafted/accepted counts and token ids


class SpeculativePipeline:
    """A loaded draft/target pair (and fuser); `generate` runs one prompt at a time."""

    def __init__(self, session: runner.Session):
        self.session = session

    @classmethod
    def load(cls, draft: str, target: str, fuser: str | None = None, *, device: str = "auto", dtype: str = "auto",
             device_map: str | None = None, compile: bool = False, enable_thinking: bool = False,
             log=None) -> "SpeculativePipeline":
        """Draft and target: Hub ids or local folders; `fuser`: a C2C checkpoint folder (None: no fusion;
        a `draft_adapter/` beside its `final/` is applied to the fused runs' draft). `device`
        auto/cuda/cuda:N/cpu, `dtype` auto/bfloat16/float16/float32 (auto: bf16 on GPU, float32 on CPU),
        `compile`: static caches and CUDA graphs (call `generate` once untimed first)."""
        cfg = runner.RunConfig(
            draft_model=draft, target_model=target, fuser_checkpoint=fuser or "", fuser_explicit=fuser is not None,
            prefill_fusion=fuser is not None, decode_fusion=fuser is not None, device=device, dtype=dtype,
            device_map=device_map, compile=compile, enable_thinking=enable_thinking,
        )
        return cls(runner.prepare(cfg, log=log or (lambda message: None)))

    @property
    def fusion(self) -> dict:
        """Whether fusion is on, the fuser's path, how many of its gates are open, its draft adapter."""
        return self.session.fusion

    def generate(self, prompt: str, *, max_new_tokens: int = 128, gamma: int = 4, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int = 0, prefill_fusion: bool = True,
                 decode_fusion: bool = True, compare: bool = False, rounds: bool = False,
                 stream: TextIO | None = None, color: bool | None = None) -> Generation:
        """Speculative decoding of one prompt (the chat template is applied). Greedy at temperature 0,
        else sampling whose output follows the target's distribution. `stream`: a text file (e.g.
        sys.stdout) to print the output to as rounds commit, marked (colour: default on a terminal)."""
        has_fuser = self.session.fuser is not None
        cfg = dataclasses.replace(
            self.session.config, max_new_tokens=max_new_tokens, gamma=gamma, temperature=temperature, top_p=top_p,
            top_k=top_k, seed=seed, prefill_fusion=prefill_fusion and has_fuser, decode_fusion=decode_fusion and has_fuser,
        )
        runner.validate(cfg)
        session = dataclasses.replace(self.session, config=cfg)
        printer = None
        if stream is not None:
            printer = StreamPrinter(session.tokenizer, stream, colour=use_colour(stream) if color is None else color)
        entry = runner.run_prompt(session, prompt, compare, printer=printer, save_rounds=rounds)
        spec = entry["speculative"]
        return Generation(spec["text"], spec["output_ids"], spec, entry["standard"], entry["comparison"],
                          spec.get("round_records") if rounds else None)
