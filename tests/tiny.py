"""Tiny Qwen3-architecture models and a tokenizer, built offline with fixed seeds.

The draft has fewer layers, fewer KV heads and a larger head_dim than the target (as the real
pair differs in shape). Both share the embedding and output matrices and have damped residual
branches, so the draft agrees with the target on roughly half of its guesses: enough to exercise
acceptance, rejection and rollback, like a real small/large pair.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

VOCAB = 320
HIDDEN = 64
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog. Speculative decoding drafts tokens and verifies them.",
    "请解释量子计算的基本原理。量子比特可以处于叠加态。",
    "def add(a, b):\n    return a + b\n",
    "What is the sum of all integers from 1 to 100? It is 5050.",
] * 4


def build_tokenizer(chat_template: bool = True) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB - 8, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def eos_ids() -> list[int]:
    tok = build_tokenizer()
    return [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")]


def tiny_config(layers: int, heads: int, kv_heads: int, head_dim: int) -> Qwen3Config:
    return Qwen3Config(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        max_position_embeddings=2048, tie_word_embeddings=False, eos_token_id=eos_ids(),
        bos_token_id=None, pad_token_id=None,
    )


def _build(config: Qwen3Config, seed: int, shared: tuple[torch.Tensor, torch.Tensor], damping: float):
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config).eval()
    embed, head = shared
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(embed)
        model.lm_head.weight.copy_(head)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(damping)
            layer.mlp.down_proj.weight.mul_(damping)
    model.generation_config.eos_token_id = eos_ids()
    return model.requires_grad_(False)


def build_pair(seed: int = 0):
    """(target, draft): target 4 layers / 2 KV heads / head_dim 16; draft 2 layers / 1 KV head / head_dim 32."""
    g = torch.Generator().manual_seed(seed)
    shared = (torch.randn(VOCAB, HIDDEN, generator=g), 0.3 * torch.randn(VOCAB, HIDDEN, generator=g))
    target = _build(tiny_config(4, 4, 2, 16), seed + 1, shared, damping=8.0)
    draft = _build(tiny_config(2, 2, 1, 32), seed + 2, shared, damping=4.0)
    return target, draft


def open_fuser(target, draft, seed: int = 0):
    """A random fuser for the pair with every gate open (so fusion really changes the draft's cache)."""
    from c2c.core.fuser import C2CFuser, KVShape

    torch.manual_seed(seed)
    fuser = C2CFuser.create(KVShape.of(draft.config), KVShape.of(target.config), hidden_dim=32, intermediate_dim=32, dtype=torch.float32)
    for p in fuser.projectors:
        for kind in ("key", "value"):
            getattr(p, f"{kind}_gate_logit").data.fill_(1.0)
            getattr(p, f"{kind}_proj_out").weight.data.mul_(10.0)  # large enough to change the draft's guesses
    return fuser.eval().requires_grad_(False)


# ---------------------------------------------------------------- a toy pair for distribution tests


def toy_model(layers: int, seed: int, vocab: int = 6) -> Qwen3ForCausalLM:
    """A Qwen3 of a `vocab`-token vocabulary with sharp distributions (some tokens likely, some not)."""
    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=64,
                         tie_word_embeddings=False, bos_token_id=None, pad_token_id=None, eos_token_id=None)
    m = Qwen3ForCausalLM(config).eval().requires_grad_(False)
    with torch.no_grad():
        m.lm_head.weight.mul_(8.0)
    return m


def three_step_joint(target, prompt: list[int], sampling) -> dict[tuple[int, int, int], float]:
    """The target's exact distribution of its next three sampled tokens after `prompt`, enumerated."""
    import itertools

    from c2c.core.sampling import probabilities

    vocab = target.config.vocab_size
    with torch.no_grad():
        def p(seq):
            return probabilities(target(input_ids=torch.tensor([prompt + list(seq)])).logits[0, -1], sampling)
        joint = {}
        for a, b in itertools.product(range(vocab), repeat=2):
            pab, last = float(p(())[a]) * float(p((a,))[b]), p((a, b))
            for c in range(vocab):
                joint[(a, b, c)] = pab * float(last[c])
    return joint


def pooled_chi2(expected: dict, observed, n: int) -> tuple[float, float, int]:
    """Chi-square of `observed` counts (a Counter over n draws) against `expected` probabilities, over the
    cells expected 5 times or more plus one pooled cell for the rest; returns (statistic, its 1e-4
    critical value by Wilson-Hilferty, the cells kept)."""
    import math

    cells = [k for k, q in expected.items() if n * q >= 5]
    pooled_q = 1 - sum(expected[k] for k in cells)
    pooled = n - sum(observed[k] for k in cells)
    chi2 = sum((observed[k] - n * expected[k]) ** 2 / (n * expected[k]) for k in cells)
    chi2 += (pooled - n * pooled_q) ** 2 / max(n * pooled_q, 1e-9)
    df = max(len(cells), 1)  # cells + the pooled one, less one
    return chi2, df * (1 - 2 / (9 * df) + 3.719 * math.sqrt(2 / (9 * df))) ** 3, len(cells)
