#!/usr/bin/env python3
"""Build the `arith` offline preset: a pair where the target provably knows what the draft can't.

    python presets/build_arith.py [--out presets/arith] [--stages target draft fuser fuser_adapter] ...

About 100 minutes on one CPU thread with the defaults (target 23 + 23 min, draft 1.5, fuser 34,
adapter fuser 20); the two fuser stages can run side by side (`--stages fuser`, `--stages fuser_adapter`).

The positive control for fusion (see presets/arith_task.py for the task): the target (Qwen3
architecture, ~0.8M parameters) learns 3-digit addition in normal digit order and the mod-1000
addition chain; the draft (1 layer, a few % of the target's size) cannot carry reliably on its own.
Whatever the fuser adds to the draft's acceptance must come from the target's KV cache.

Stages, each seeded (CPU, float32; weights rounded to bf16 before the next stage, as shipped):
1. a character-level tokenizer (every byte its own token, no merges) with the tiny preset's
   Qwen-style chat template and end-of-sequence ids;
2. the target, trained on chat-formatted problems, loss on the answer tokens only, in two phases:
   7,000 steps (additions first, then half chains: additions reach 100%, chains 0%), then a fresh
   6,000-step schedule at half the learning rate on 75% chains (chains 0% -> 100% on a glance set);
3. the draft, trained the same way but small and briefly (its exact rate must stay <= 50%);
4. held-out exact rates of both (greedy, batched), written to build_info.json;
5. the fuser, trained by `python -m c2c.tools.train_fuser` (frozen models, official layout);
6. not C2C, an option: `fuser_adapter/`, projectors and a rank-8 LoRA draft adapter trained jointly
   (`--draft_adapter lora`), the same data and seed, 12,000 steps.
No network access: the data are generated.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import arith_task as task  # noqa: E402  (presets/ is the script's own folder)
from build_tiny import SPECIALS, build_tokenizer, lr_at, qwen3, round_to_bf16  # noqa: E402

ROLE_TOKENS = ["user", "assistant"]  # one token each, so the chat template costs 8 tokens per prompt
VOCAB = 256 + len(SPECIALS) + len(ROLE_TOKENS)  # bytes, specials, roles: no merges, every digit one token
HELD_ADDITIONS, HELD_CHAINS, SEED_HELDOUT = 1000, 600, 1234


class Encoder:
    """Chat-formatted ids of (prompt, answer) pairs without calling the tokenizer per sample (the
    tokenizer is character-level, so the template's ids and a character map are enough; checked
    against `encode_prompt` once)."""

    def __init__(self, tokenizer):
        from c2c.app.prompts import encode_prompt

        probe = "123+456="
        ids = encode_prompt(tokenizer, probe)
        text = tokenizer.decode(ids)
        cut = text.index(probe)
        self.head = tokenizer(text[:cut], add_special_tokens=False)["input_ids"]
        self.tail = tokenizer(text[cut + len(probe) :], add_special_tokens=False)["input_ids"]
        self.chars = {c: tokenizer.convert_tokens_to_ids(c) for c in "0123456789+=,"}
        self.eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
        assert self.prompt(probe) == ids, "character map disagrees with the chat template"

    def prompt(self, text: str) -> list[int]:
        return self.head + [self.chars[c] for c in text] + self.tail

    def sample(self, prompt: str, answer: str) -> tuple[list[int], int]:
        ids = self.prompt(prompt)
        return ids + [self.chars[c] for c in answer] + [self.eos], len(ids)


def batch(encoder: Encoder, problems: task.TrainingProblems, size: int, pad: int, chain_fraction: float | None = None):
    """(B, L) ids right-padded with `pad`, and the (B, L-1) loss mask of answer positions."""
    samples = [encoder.sample(*problem) for problem in problems.batch(size, chain_fraction)]
    width = max(len(ids) for ids, _ in samples)
    x = torch.full((size, width), pad)
    mask = torch.zeros(size, width - 1, dtype=torch.bool)
    for row, (ids, n0) in enumerate(samples):
        x[row, : len(ids)] = torch.tensor(ids)
        mask[row, n0 - 1 : len(ids) - 1] = True  # predictions of the answer and its end token
    return x, mask


def train(model, encoder, problems, steps: int, batch_size: int, lr: float, seed: int, pad: int, log, additions_first: int = 0,
          probe=None):
    """Answer-token cross-entropy, cosine schedule over `steps`; the first `additions_first` steps see
    additions only (a curriculum: chains reuse the addition the model learns first)."""
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    model.train()
    started = time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup=50)
        x, mask = batch(encoder, problems, batch_size, pad, 0.0 if step < additions_first else None)
        logits = model(input_ids=x[:, :-1]).logits  # (B, L-1, V)
        loss = F.cross_entropy(logits[mask], x[:, 1:][mask])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 200 == 0 or step == steps - 1:
            log(f"  step {step:5d}/{steps} loss {loss.item():.4f} ({time.perf_counter() - started:.0f} s)")
        if probe is not None and (step + 1) % 1000 == 0:  # a glance at held-out exactness (a few seconds)
            log(f"  step {step + 1}: held-out exact {json.dumps(probe(model.eval()))}")
            model.train()
    return model.eval().requires_grad_(False)


def exact_rate(model, encoder, problems: list[tuple[str, str]], eos_ids: set[int]) -> float:
    from c2c.tools.train_data import greedy_batch

    prompts = [encoder.prompt(p) for p, _ in problems]
    wanted = [[encoder.chars[c] for c in a] + [encoder.eos] for _, a in problems]
    longest = max(len(w) for w in wanted)
    got = greedy_batch(model, prompts, longest, eos_ids)
    return sum(g == w for g, w in zip(got, wanted)) / len(problems)


def write_prompt_files(out: Path, adds, chains) -> None:
    """prompts.txt (the demo's few), eval_additions.txt and eval_chains.txt: held-out problems only."""
    header = "# Held-out problems (never trained on): {}\n"
    demo = [task.addition(*p)[0] for p in adds[:4]] + [task.chain(*p)[0] for p in chains[:3]]
    (out / "prompts.txt").write_text(header.format("additions and chains") + "\n".join(demo) + "\n")
    (out / "eval_additions.txt").write_text(header.format("3-digit additions") + "\n".join(task.addition(*p)[0] for p in adds) + "\n")
    (out / "eval_chains.txt").write_text(header.format(f"chains of {task.CHAIN_TERMS} terms") + "\n".join(task.chain(*p)[0] for p in chains) + "\n")


def train_fuser(out: Path, args, folder: str = "fuser", extra: tuple[str, ...] = (), steps: int | None = None,
                draft: str = "draft") -> dict:
    """The shipped fuser, trained by the project's own trainer command (frozen models); `folder`,
    `extra` trainer flags, `steps` and `draft` (the draft's folder in `out`) serve the adapter fuser,
    the parallel drafts (presets/build_parallel.py) and the upper-bound study (bench/arith_upper_bound.py):
    the same data, seed and schedule."""
    from c2c.tools import train_fuser

    seed, steps, problems = args.seed, steps or args.fuser_steps, args.fuser_problems
    gen = task.TrainingProblems(seed + 7, *task.heldout(SEED_HELDOUT, HELD_ADDITIONS, HELD_CHAINS), args.fuser_chain_fraction)
    data = out / f"{folder}_train.jsonl"
    # 3-digit additions and chains only: the forms the fuser serves
    lines = []
    while len(lines) < problems:
        prompt, _ = gen.next()
        if "+" not in prompt or all(len(x) == 3 for x in prompt[:-1].split("+")):
            lines.append(json.dumps({"prompt": prompt}))
    data.write_text("\n".join(lines) + "\n")
    argv = ["--base_model", str(out / draft), "--teacher_model", str(out / "target"), "--data", str(data),
            "--output_dir", str(out / folder), "--generate_from_target", str(4 * task.CHAIN_TERMS + 2),
            "--steps", str(steps), "--batch_size", "32", "--gamma", "4", "--hidden_dim", str(args.fuser_hidden),
            "--intermediate_dim", str(args.fuser_hidden), "--lr", str(args.fuser_lr), "--warmup_steps", "50",
            "--dropout", "0.0", "--initial_gate_logit", "1.0", "--eval_every", str(max(steps // 6, 1)),
            "--save_every", str(10**9), "--seed", str(seed), "--device", "cpu", "--dtype", "float32",
            "--save_dtype", "bfloat16", "--threads", str(args.threads), "--no_progress",
            "--suffixes", args.fuser_suffixes, "--gate_noise", args.fuser_gate_noise, "--overwrite", *extra]
    started = time.perf_counter()
    rc = train_fuser.main(argv)
    if rc != 0:
        raise SystemExit(f"fuser training failed (exit {rc})")
    data.unlink()
    shutil.rmtree(out / folder / "checkpoints", ignore_errors=True)  # the last step's: the shipped fuser has none
    config = json.loads((out / folder / "config.json").read_text())
    # the shipped copy lives in presets/arith/: record the models' and fuser's paths as shipped, not the build folder's
    config["model"] = {"base_model": f"presets/arith/{draft}", "teacher_model": "presets/arith/target"}
    config["training"] |= {"draft_model": f"presets/arith/{draft}", "target_model": "presets/arith/target",
                           "data": f"presets/build_arith.py's fuser problems ({data.name}, written and deleted by the build)",
                           "output_dir": f"presets/arith/{folder}"}
    (out / folder / "config.json").write_text(json.dumps(config, indent=2, default=str))
    return {"seconds": round(time.perf_counter() - started), "command": "python -m c2c.tools.train_fuser " + " ".join(argv),
            "last_eval": config["history"][-1]}


def load_model(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval().requires_grad_(False)


def new_model(shape: str, eos: list[int]):
    """A fresh Qwen3 model of `shape` (layers,hidden,heads,kv_heads,head_dim,intermediate) for this vocabulary."""
    model = qwen3(*map(int, shape.split(",")), eos, eos[1], vocab=VOCAB)
    model.config.max_position_embeddings = 128
    return model


def save_model(model, tokenizer, folder: Path) -> None:
    """As shipped: bf16 weights and the tokenizer beside them."""
    model.to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def stage_target(args, out: Path, adds, chains) -> dict:
    tokenizer = build_tokenizer(["0123456789+=,"], vocab=VOCAB - len(ROLE_TOKENS))
    tokenizer.add_tokens(ROLE_TOKENS)
    encoder = Encoder(tokenizer)
    eos = [encoder.eos, tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    print("target:")
    started = time.perf_counter()
    if args.target_init:  # same tokenizer (built above from the same seedless recipe), trained further
        target = load_model(Path(args.target_init)).requires_grad_(True)
        if target.config.vocab_size != VOCAB:
            raise SystemExit(f"--target_init {args.target_init}: vocabulary {target.config.vocab_size}, expected {VOCAB}")
    else:
        target = new_model(args.target_shape, eos)
    glance = [task.addition(*p) for p in adds[500:600]], [task.chain(*p) for p in chains[500:550]]  # not the reported 500s

    def probe(model):
        with torch.no_grad():
            return {form: exact_rate(model, encoder, probs, set(eos)) for form, probs in zip(("additions", "chains"), glance)}

    if not args.target_init:  # phase 1: additions first, then the even mix (additions reach 100%, chains do not)
        problems = task.TrainingProblems(args.seed, adds, chains, args.chain_fraction)
        target = round_to_bf16(train(target, encoder, problems, args.target_steps, args.batch_size, args.lr, args.seed,
                                     eos[1], print, additions_first=args.additions_first, probe=probe)).requires_grad_(True)
    if args.chain_steps:  # phase 2: a fresh, lower schedule on mostly chains (chains 0% -> 100% on the glance set)
        print("target, chain phase:")
        problems = task.TrainingProblems(args.seed, adds, chains, args.chain_phase_fraction)
        target = round_to_bf16(train(target, encoder, problems, args.chain_steps, args.batch_size, args.chain_lr, args.seed,
                                     eos[1], print, probe=probe))
    save_model(target, tokenizer, out / "target")
    return {"target_seconds": round(time.perf_counter() - started)}


def stage_draft(args, out: Path, adds, chains) -> dict:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out / "target")
    encoder = Encoder(tokenizer)
    eos = [encoder.eos, tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    print("draft:")
    started = time.perf_counter()
    draft = new_model(args.draft_shape, eos)
    problems = task.TrainingProblems(args.seed + 1, adds, chains, args.chain_fraction)
    draft = round_to_bf16(train(draft, encoder, problems, args.draft_steps, args.batch_size, args.draft_lr, args.seed + 1, eos[1], print))
    save_model(draft, tokenizer, out / "draft")
    seconds = round(time.perf_counter() - started)
    target, draft = load_model(out / "target"), load_model(out / "draft")  # exactly the shipped weights
    eval_adds = [task.addition(*p) for p in adds[:500]]
    eval_chains = [task.chain(*p) for p in chains[:500]]
    rates = {
        f"{name}_{form}": exact_rate(model, encoder, problems_, set(eos))
        for name, model in (("target", target), ("draft", draft))
        for form, problems_ in (("additions", eval_adds), ("chains", eval_chains))
    }
    print("held-out exact:", json.dumps(rates))
    write_prompt_files(out, adds[:500], chains[:500])
    params = {"target": sum(p.numel() for p in target.parameters()), "draft": sum(p.numel() for p in draft.parameters())}
    return {"draft_seconds": seconds, "heldout_exact": rates,
            "heldout_problems": {"additions": len(eval_adds), "chains": len(eval_chains)},
            "parameters": params, "draft_fraction_of_target": params["draft"] / params["target"]}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "presets" / "arith"))
    p.add_argument("--target_steps", type=int, default=7000)
    p.add_argument("--draft_steps", type=int, default=3000)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--target_shape", default="4,128,4,2,32,384", help="layers,hidden,heads,kv_heads,head_dim,intermediate")
    p.add_argument("--draft_shape", default="1,64,4,1,16,128", help="as --target_shape")
    p.add_argument("--target_init", default=None,
                   help="start from the target saved in this folder and run only the chain phase (skips --target_steps)")
    p.add_argument("--chain_steps", type=int, default=6000,
                   help="target, second phase: a new cosine schedule on a chain-heavy mix (0: none)")
    p.add_argument("--chain_lr", type=float, default=5e-4, help="peak learning rate of the chain phase")
    p.add_argument("--chain_phase_fraction", type=float, default=0.75, help="share of chains in the chain phase")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of the target")
    p.add_argument("--draft_lr", type=float, default=3e-3)
    p.add_argument("--chain_fraction", type=float, default=0.5, help="share of chains among the training problems")
    p.add_argument("--additions_first", type=int, default=2000, help="target steps on additions only, before the mix")
    p.add_argument("--fuser_steps", type=int, default=24000)
    p.add_argument("--fuser_problems", type=int, default=6000)
    p.add_argument("--fuser_hidden", type=int, default=128)
    p.add_argument("--fuser_lr", type=float, default=2e-3)
    p.add_argument("--fuser_suffixes", choices=("one", "all"), default="one",
                   help="the trainer's objective; the shipped fusers were trained with one split per batch")
    p.add_argument("--fuser_gate_noise", choices=("logistic", "gumbel", "none"), default="logistic",
                   help="gate noise while training; the shipped fusers were trained with logistic noise")
    p.add_argument("--fuser_chain_fraction", type=float, default=0.25)
    p.add_argument("--adapter_steps", type=int, default=12000, help="fuser_adapter stage: steps")
    p.add_argument("--adapter_rank", type=int, default=8, help="fuser_adapter stage: LoRA rank of the draft adapter")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--stages", nargs="+", choices=("target", "draft", "fuser", "fuser_adapter"),
                   default=["target", "draft", "fuser", "fuser_adapter"],
                   help="rebuild only these (the later ones read the earlier ones from --out)")
    return p


def main() -> int:
    args = build_parser().parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    adds, chains = task.heldout(SEED_HELDOUT, HELD_ADDITIONS, HELD_CHAINS)
    info_path = out / "build_info.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    info["torch"] = torch.__version__
    command = "python presets/build_arith.py " + " ".join(sys.argv[1:])
    for name, stage in (("target", stage_target), ("draft", stage_draft)):
        if name in args.stages:
            info |= stage(args, out, adds, chains)
            info.setdefault("built_by", {})[name] = {"command": command, "args": vars(args)}
            info_path.write_text(json.dumps(info, indent=2))
    if "fuser" in args.stages:
        info["fuser"] = train_fuser(out, args)
        info_path.write_text(json.dumps(info, indent=2))
    if "fuser_adapter" in args.stages:  # not C2C: projectors and a LoRA draft adapter trained jointly
        info["fuser_adapter"] = train_fuser(out, args, "fuser_adapter", ("--draft_adapter", "lora", "--adapter_rank",
                                                                         str(args.adapter_rank)), args.adapter_steps)
        info_path.write_text(json.dumps(info, indent=2))
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
