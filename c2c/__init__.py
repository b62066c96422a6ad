"""C2C speculative decoding: a small draft model guesses, a large target model verifies.

The draft (C2C's "receiver", e.g. Qwen3-0.6B) proposes `gamma` tokens per round; the target
(C2C's "sharer", e.g. Qwen3-14B) checks them in one forward pass. A learned C2C Fuser projects the
target's KV cache into the draft's cache so that the draft guesses more like the target. Fusion only
changes the draft's guesses: the emitted tokens are always the target's own.

Modules: `cache` (every touch of the transformers cache object), `fuser` (C2CProjector and the
official checkpoint layout), `sampling` (logit warping and the acceptance rule), `engine` (the
standard and speculative loops), `metrics` (per-run statistics and summaries), `loading`
(models, tokenizers, devices, fuser resolution), `prompts` and `report` (input and output text),
`stream` (streamed output with tokens marked by origin) and `api` (`SpeculativePipeline`, the engine
from Python).
"""

__version__ = "0.1.0"
