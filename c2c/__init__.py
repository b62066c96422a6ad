"""C2C speculative decoding: a small draft model guesses, a large target model verifies.

The draft (C2C's "receiver", e.g. Qwen3-0.6B) proposes `gamma` tokens per round; the target
(C2C's "sharer", e.g. Qwen3-14B) checks them in one forward pass. A learned C2C Fuser projects the
target's KV cache into the draft's cache so that the draft guesses more like the target. Fusion only
changes the draft's guesses: the emitted tokens are always the target's own.

Three subpackages, by role:

- `c2c.core`, the algorithm: `cache` (every touch of the transformers cache object), `fuser` and
  `adapter` (C2CProjector, the official checkpoint layout, the draft's optional adapter),
  `sampling` (logit warping and the acceptance rule), `tree` and `tree_steps` (tree speculation's
  pure parts, and its two model steps on static caches), `engine` (the standard and speculative
  loops) and `metrics` (per-run statistics and summaries);
- `c2c.app`, the application: `runner` (what the demo and the benchmark share), `api`
  (`SpeculativePipeline`, also importable as `c2c.SpeculativePipeline`), `loading`, `presets`,
  `prompts`, `report`, `results`, `stream`, `plots`, `benchmark` and `cli`;
- `c2c.tools`, the tools: fuser training (`train_fuser`, the `c2c-train-fuser` command, with
  `training`, `train_data`, `train_objective`, `chat_data`) and `synthetic` (real-shape timing
  without weights).

`c2c.errors` holds the one exception every part raises for bad user input.
"""

__version__ = "0.3.0"


def __getattr__(name: str):
    """`c2c.SpeculativePipeline`, imported on first use (so `import c2c` stays light)."""
    if name == "SpeculativePipeline":
        from .app.api import SpeculativePipeline

        return SpeculativePipeline
    raise AttributeError(f"module 'c2c' has no attribute {name!r}")
