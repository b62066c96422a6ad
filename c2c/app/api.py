"""The engine from Python: load a draft, a target and an optional fuser once, then generate.

    from c2c import SpeculativePipeline

    pipe = SpeculativePipeline.load("Qwen/Qwen3-0.6B", "Qwen/Qwen3-14B", fuser="path/to/fuser")
    out = pipe.generate("Explain KV caches in one sentence.", max_new_tokens=64, gamma=4)
    print(out.text, out.metrics["average_accepted_length"])

    pipe = SpeculativePipeline.from_preset("tiny")   # the shipped offline pair, from any folder

Everything the demo does, without the command line: the same loading checks (errors are
`c2c.errors.UserInputError`, a ValueError, with the fix in the message), the same engine, the
same metrics dict as the demo's JSON (`out.metrics`), and optionally the target-only run with the
comparison (`compare=True`), per-round records (`rounds=True`) and streamed output (`stream=`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TextIO

import math
import numbers
import warnings

from . import runner
from .cli import apply_threads
from ..errors import UserInputError
from .stream import StreamPrinter, use_colour

def _integer(name: str, value, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise UserInputError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"between {low} and {high}"
        raise UserInputError(f"{name} must be {bound}, got {value}")
    return int(value)


def _real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise UserInputError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _arg(name: str) -> str:
    """How messages name a setting here: the argument's own name (the command line says --name)."""
    return name


FIRST_CONTACT = ("SpeculativePipeline.from_preset('tiny') runs a small shipped pair offline on this CPU now (or pass "
                 "local folders as draft and target; CPU-only machines: install the CPU build of torch first, README)")


def _flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise UserInputError(f"{name} must be True or False, got {value!r}")
    return value


@dataclass
class Generation:
    """One prompt's result."""

    text: str  # the speculative output (the target's own tokens), special tokens skipped
    ids: list[int]  # its token ids
    metrics: dict  # acceptance, accepted length, latency, tokens/s, time split... (the demo's "speculative" entry)
    standard: dict | None = None  # compare=True: the target-only run's metrics and text
    comparison: dict | None = None  # compare=True: outputs_match, first_divergence, speedup
    rounds: list[dict] | None = None  # rounds=True: each round's drafted/accepted counts and token ids
    max_new_tokens: int = 0  # this prompt's: fewer than asked where the output would reach the models' context
    stopped_at_context: bool = False  # the output stopped at the models' context (max_position_embeddings)


class SpeculativePipeline:
    """A loaded draft/target pair (and fuser); `generate` runs one prompt at a time."""

    def __init__(self, session: runner.Session):
        self.session = session

    @classmethod
    def load(cls, draft: str, target: str, fuser: str | None = None, *, device: str = "auto", dtype: str = "auto",
             device_map: str | None = None, compile: bool | None = None, enable_thinking: bool = False,
             threads: int = 0, log=None) -> "SpeculativePipeline":
        """Draft and target: Hub ids or local folders; `fuser`: a C2C checkpoint folder (None: no fusion;
        a `draft_adapter/` beside its `final/` is applied to the fused runs' draft). `device`
        auto/cuda/cuda:N/cpu, `dtype` auto/bfloat16/float16/float32 (auto: bf16 on GPU, float32 on CPU),
        `compile`: static caches and CUDA graphs (None: on for a CUDA device, as the demo; the first
        `generate` of each shape compiles, so call it once untimed first). `threads`: torch's
        CPU threads, set for the whole process as the demo's --threads does (0: one per physical core;
        torch's own default, one per logical CPU, collapses on busy or shared cores)."""
        for name, value in (("draft", draft), ("target", target)):
            if not isinstance(value, str) or not value.strip():
                raise UserInputError(f"{name} must be a Hub id or a folder (a non-empty string), got {value!r}")
        if fuser is not None and (not isinstance(fuser, str) or not fuser.strip()):
            raise UserInputError(f"fuser must be a folder or a Hub pair name (a non-empty string) or None, got {fuser!r}")
        if compile is not None:
            _flag("compile", compile)
        _flag("enable_thinking", enable_thinking)
        compile = runner.choose_compile(compile, device)
        apply_threads(_integer("threads", threads, 0))
        cfg = runner.RunConfig(
            draft_model=draft, target_model=target, fuser_checkpoint=fuser or "", fuser_explicit=fuser is not None,
            prefill_fusion=fuser is not None, decode_fusion=fuser is not None, device=device, dtype=dtype,
            device_map=device_map, compile=compile, enable_thinking=enable_thinking,
        )
        return cls(runner.prepare(cfg, log=log or (lambda message: None), first_contact=FIRST_CONTACT, arg=_arg))

    @classmethod
    def from_preset(cls, name: str, *, fuser: str | None = "preset", **kwargs) -> "SpeculativePipeline":
        """A shipped offline pair (`tiny` or `arith`: CPU, float32, no download), found wherever c2c is
        installed. `fuser`: "preset" (its own), "parallel" (its fuser trained with a parallel draft, for
        generate(parallel_drafting=True)), None (no fusion) or another fuser folder."""
        from .presets import preset_defaults

        values = preset_defaults(name, parallel=fuser == "parallel")
        kwargs = {"device": values["device"], "dtype": values["dtype"], **kwargs}
        chosen = values["fuser_checkpoint"] if fuser in ("preset", "parallel") else fuser
        return cls.load(values["base_model"], values["teacher_model"], fuser=chosen, **kwargs)

    @property
    def fusion(self) -> dict:
        """Whether fusion is on, the fuser's path, how many of its gates are open, its draft adapter."""
        return self.session.fusion

    def generate(self, prompt: str, *, max_new_tokens: int = 128, gamma: int = 4, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int = 0, prefill_fusion: bool = True,
                 decode_fusion: bool = True, compare: bool = False, rounds: bool = False,
                 stream: TextIO | None = None, color: bool | None = None, tree_budget: int = 0, tree_depth: int = 5,
                 tree_topk: int = 4, parallel_drafting: bool = False) -> Generation:
        """Speculative decoding of one prompt (the chat template is applied). Greedy at temperature 0,
        else sampling whose output follows the target's distribution. `stream`: a text file (e.g.
        sys.stdout) to print the output to as rounds commit, marked (colour: default on a terminal).
        `tree_budget` > 0: tree rounds (the draft's top `tree_topk` children of the best nodes, depth by
        depth up to `tree_depth`, the best `tree_budget` nodes verified in one target forward); 0: a
        chain of `gamma` drafts. `parallel_drafting`: all `gamma` drafts of a round from one draft forward
        (the draft's config names its mask id, as PARD drafts' do)."""
        if not isinstance(prompt, str):
            raise UserInputError(f"prompt must be a string (one prompt per call), got {type(prompt).__name__}"
                                 + (": call generate once per prompt" if isinstance(prompt, (list, tuple)) else ""))
        if not prompt.strip():
            raise UserInputError("prompt is empty: pass the text to continue")
        max_new_tokens, gamma = _integer("max_new_tokens", max_new_tokens, 1), _integer("gamma", gamma, 1)
        temperature, top_p = _real("temperature", temperature), _real("top_p", top_p)
        top_k, seed = _integer("top_k", top_k, 0), _integer("seed", seed, *runner.SEED_RANGE)
        tree_budget, tree_depth = _integer("tree_budget", tree_budget, 0), _integer("tree_depth", tree_depth, 1)
        tree_topk = _integer("tree_topk", tree_topk, 1)
        for name, value in (("prefill_fusion", prefill_fusion), ("decode_fusion", decode_fusion), ("compare", compare),
                            ("rounds", rounds), ("parallel_drafting", parallel_drafting)):
            _flag(name, value)
        if stream is not None and not callable(getattr(stream, "write", None)):
            raise UserInputError(f"stream must be a text file (with .write), e.g. sys.stdout, got {stream!r}")
        has_fuser = self.session.fuser is not None
        cfg = dataclasses.replace(
            self.session.config, max_new_tokens=max_new_tokens, gamma=gamma, temperature=temperature, top_p=top_p,
            top_k=top_k, seed=seed, prefill_fusion=prefill_fusion and has_fuser, decode_fusion=decode_fusion and has_fuser,
            tree_budget=tree_budget, tree_depth=tree_depth, tree_topk=tree_topk, parallel_drafting=parallel_drafting,
        )
        try:
            runner.validate(cfg)
        except UserInputError as e:  # its messages name command-line flags: here they are arguments
            raise UserInputError(str(e).replace("--", "")) from None
        cfg, budget_capped = runner.cap_tree_budget(cfg, _arg)
        if budget_capped:
            warnings.warn(budget_capped, stacklevel=2)
        masks = self.session.masks
        if parallel_drafting and masks is None:
            masks = runner.parallel_masks(self.session.draft.config, cfg.draft_model, _arg, None)
        session = dataclasses.replace(self.session, config=cfg, masks=masks)
        capped = (runner.gamma_warning(tree_depth, max_new_tokens, _arg, "tree_depth") if tree_budget
                  else runner.gamma_warning(gamma, max_new_tokens, arg=_arg))
        if capped:
            warnings.warn(capped, stacklevel=2)
        for warning in runner.check_context(session, [runner.encode(session, prompt)], max_new_tokens, gamma, arg=_arg):
            warnings.warn(warning.removeprefix("WARNING: "), stacklevel=2)
        printer = None
        if stream is not None:
            printer = StreamPrinter(session.tokenizer, stream, colour=use_colour(stream) if color is None else color)
        entry = runner.run_prompt(session, prompt, compare, printer=printer, save_rounds=rounds)
        spec = entry["speculative"]
        return Generation(spec["text"], spec["output_ids"], spec, entry["standard"], entry["comparison"],
                          spec.get("round_records") if rounds else None, entry["max_new_tokens"], entry["stopped_at_context"])
