"""Command line of the fuser trainer: `python -m c2c.tools.train_fuser --help`.

Trains C2C projectors for any draft/target pair (Hub ids or local folders), both models frozen,
and writes the official C2C layout (`<output_dir>/final/`) plus `<output_dir>/config.json`.
Optional, not C2C: `--draft_adapter lora|full` trains a draft adapter jointly with the projectors,
written to `<output_dir>/draft_adapter/` and applied by the demo whenever that fuser is used.
Example (the recipe for Qwen3-0.6B <- Qwen3-14B is in docs/training.md):

    python -m c2c.tools.train_fuser --base_model Qwen/Qwen3-0.6B --teacher_model Qwen/Qwen3-14B \\
        --data corpus.jsonl --output_dir output/fusers/qwen3_0.6b+qwen3_14b_Fuser --steps 4000
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import fields
from pathlib import Path

import torch

from ..app.cli import OneLineParser, apply_threads, run_main
from ..errors import UserInputError
from .run_folder import MARKER, resumable
from .training import TrainConfig

HELP = {
    "steps": "optimizer steps (may change on --resume: the schedule then follows the new length)",
    "batch_size": "sequences per step, over all processes (the global batch: the same run on 1 or N processes)",
    "seq_len": "window length in tokens for plain-text data",
    "gamma": "draft tokens per round the fuser is trained for: blocks (or suffixes) of gamma+1 positions",
    "min_prefix": "plain text: the shortest prefix before the first supervised position",
    "objective": "kl: KL(target || draft) over the vocabulary; ce: cross-entropy on the target's greedy token",
    "lr": "peak learning rate of the projectors (AdamW, linear warm-up, cosine decay to 10%%)",
    "weight_decay": "AdamW weight decay",
    "warmup_steps": "linear warm-up steps",
    "grad_clip": "gradient-norm clip",
    "hidden_dim": "projector hidden size (C2C's released fusers: 1024)",
    "intermediate_dim": "projector MLP inner size (C2C's released fusers: 1024)",
    "num_layers": "projector depth, >= 3 (C2C's: 3)",
    "dropout": "projector dropout while training",
    "anneal_steps": "steps over which the gate temperature anneals from 1.0 to 0.001 (default: all steps)",
    "initial_gate_logit": "starting gate logits (C2C: 0, gates closed at inference until training opens them)",
    "zero_init": "start with zero projections (fusion starts as the identity)",
    "heldout_fraction": "share of the sequences held out for the held-out figure (never trained on)",
    "eval_every": "steps between held-out evaluations (a line of metrics.jsonl each)",
    "eval_tokens": "held-out suffix tokens per evaluation, at least (paired fused/unfused, won/lost)",
    "save_every": "steps between checkpoints in output_dir/checkpoints (for --resume)",
    "seed": "seed of the data order, split points, block offsets and the fuser's initialisation",
    "device": "auto (CUDA if present), cuda, cuda:N or cpu; under accelerate launch each process takes its own",
    "dtype": "models' dtype: auto = bfloat16 on GPU, float32 on CPU (the projectors train in float32)",
    "save_dtype": "dtype of the saved fuser: auto = bfloat16 when the models run in bf16 (as released fusers)",
    "generate_from_target": "> 0: text records and conversations ending with a user turn are prompts the target answers (at most this many tokens, batched); the loss only on answers",
    "enable_thinking": "Qwen3's chat-template thinking switch for chat data and prompts, as in the demo",
    "threads": "torch CPU threads; 0 = one per physical core (use 1 on busy or shared cores)",
    "draft_adapter": "none (C2C: frozen draft), lora or full: a draft change trained jointly (not C2C)",
    "adapter_rank": "rank of the LoRA draft adapter",
    "adapter_lr": "learning rate of the draft adapter; 0 = --lr",
    "fusion": "--no-fusion: train the draft adapter alone (the upper-bound study's control arm)",
    "suffixes": "all: every supervised position in blocks of gamma+1 (one target pass); one: one split per batch",
    "gate_noise": "gate noise while training: gumbel (C2C's), logistic (the shipped presets') or none",
    "keep_checkpoints": "checkpoints kept in output_dir/checkpoints; older ones are deleted",
    "draft_kv": "decode: the fuser learns from the draft K/V decoding gives it (computed over the fused prefix); "
                "plain: from a plain draft pass (the earlier objective)",
    "eval_prompts": "held-out prompts the engine decodes at each evaluation, fused and unfused, for tokens per "
                    "target call, at most (0: no engine figure)",
    "eval_seconds": "the first evaluation decodes as many held-out prompts as these seconds allow (fused and unfused; "
                    "later evaluations the same prompts): more prompts, a surer verdict",
    "eval_new_tokens": "new tokens per held-out prompt in that figure, at most",
    "parallel_drafts": "K > 0: train parallel drafting (PARD's layout over the fused prefix): a mask embedding (and the "
                       "--draft_adapter) so that one draft forward over [anchor, K-1 masks] drafts K tokens; --gamma follows K",
    "mask_id": "parallel drafting's mask id (-1: a free embedding row, else a control-character token the text never "
               "holds); its embedding row is trained as the mask",
    "cod_rate": "parallel drafting: PARD's conditional drop-token (COD); mask block j keeps a random max(rate**j, floor) "
                "of its anchors, each only where block j-1 kept it (what it attends to): fewer queries a step, measured "
                "better per second of training (docs/training.md); 0: every query. Without --parallel_drafts: unused",
    "cod_floor": "the smallest share of its anchors a mask block keeps under --cod_rate",
    "length_pool": "rows of this many batches are drawn and sorted by length, and one batch of them is trained on: "
                   "less padding, every row as likely as without it (1: rows drawn at random)",
}


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m c2c.tools.train_fuser", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--base_model", required=True, help="draft (C2C receiver): Hub id or folder")
    p.add_argument("--teacher_model", required=True, help="target (C2C sharer): Hub id or folder")
    p.add_argument("--data", required=True, help="plain text file; or JSONL (or parquet, with pyarrow) records: "
                   "'messages' (OpenAI chat), 'conversations' (ShareGPT), 'text' or 'prompt'")
    p.add_argument("--output_dir", required=True, help="fuser folder to write (final/, config.json, checkpoints/)")
    p.add_argument("--resume", action="store_true", help="continue the run in output_dir from its latest checkpoint, "
                   f"with the flags it was made with: only {resumable()} may change (a changed flag is an error)")
    p.add_argument("--overwrite", action="store_true", help="start over in an output_dir this trainer wrote (it holds "
                   f"{MARKER}): what the earlier run wrote is removed once every check has passed; a folder the "
                   "trainer did not write is never touched")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    defaults = TrainConfig("", "", "", "")
    skip = {"draft_model", "target_model", "data", "output_dir"}
    for f in fields(TrainConfig):
        if f.name in skip:
            continue
        value = getattr(defaults, f.name)
        if isinstance(value, bool):
            p.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=value, help=HELP[f.name])
        else:
            p.add_argument(f"--{f.name}", type=type(value) if value is not None else int, default=value, help=HELP[f.name])
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_main(run, args)


def run(args) -> int:
    """Check everything (flags, folder, resume, data, models, disk space), then touch the folder, then train."""
    from . import chat_data, run_folder

    if args.parallel_drafts > 0 and args.gamma == TrainConfig("", "", "", "").gamma:
        args.gamma = args.parallel_drafts  # the rounds it drafts: the data's blocks and the engine figure follow
    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    cfg = TrainConfig(draft_model=args.base_model, target_model=args.teacher_model, **values)
    out = Path(cfg.output_dir)
    plan = run_folder.check(cfg, args.overwrite, args.resume)  # reads only
    records = chat_data.read_records(cfg.data)
    threads = apply_threads(cfg.threads)
    processes, device = start_processes(cfg)
    say = (lambda *a, **k: print(*a, **k, file=sys.stderr)) if processes.main else (lambda *a, **k: None)
    trainer, dtype, sizes = build_trainer(cfg, records, device, processes, say)
    run_folder.check_space(out, trainer.checkpoint_bytes())
    say(f"{sizes}; {threads} CPU thread(s); {processes.count} process(es); objective {cfg.objective}, suffixes "
        f"{cfg.suffixes}, draft K/V {cfg.draft_kv}")
    for warning in trainer.warnings():
        say(f"WARNING: {warning}")
    if plan.resume_from is not None:
        trainer.load_checkpoint(plan.resume_from)
        say(f"resumed from {plan.resume_from} (step {trainer.step})")
    # every check has passed: from here on the folder changes
    if processes.main:
        removed = run_folder.begin(cfg, plan)
        if removed:
            say(f"--overwrite: removed the previous run's {', '.join(removed[:4])}{' ...' if len(removed) > 4 else ''} "
                f"from {out}")
    processes.barrier()
    try:
        result = trainer.train(progress=not args.no_progress)
    except KeyboardInterrupt:
        latest = run_folder.latest_checkpoint(cfg.output_dir)
        where = (f"--resume continues from {latest} (step {int(latest.name.removeprefix('step_'))})" if latest
                 else f"no checkpoint was written yet (every {cfg.save_every} steps): nothing was saved")
        say(f"\ninterrupted (Ctrl-C) at step {trainer.step}: {where}")
        return 130
    if processes.main:
        save_run(cfg, trainer, result, dtype)
    return 0


def start_processes(cfg):
    """This process's place in a data-parallel run and its device."""
    from ..app.loading import resolve_device
    from . import training

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under `accelerate launch` (or torchrun)
        from accelerate import PartialState

        state = PartialState(cpu=cfg.device == "cpu")
        return training.Processes(state.process_index, state.num_processes), state.device
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true" and "MASTER_PORT" in os.environ:
        print("WARNING: `accelerate launch --cpu` started this one process only (accelerate needs mpirun for "
              "several CPU processes); for N processes on CPU use `accelerate launch --multi_gpu "
              "--num_processes N -m c2c.tools.train_fuser --device cpu ...` or `torchrun --nproc_per_node N -m "
              "c2c.tools.train_fuser --device cpu ...`", file=sys.stderr)
    return training.Processes(), resolve_device(cfg.device)


def build_trainer(cfg, records, device, processes, say):
    """Models, data and the trainer (nothing written): (trainer, the models' dtype, what the data hold)."""
    from . import train_data, training
    from ..app.loading import align_vocab, check_tokenizers, eos_token_ids, load_config, load_model, load_tokenizer, resolve_dtype

    dtype = resolve_dtype(cfg.dtype, device)
    tokenizer = load_tokenizer(cfg.target_model)
    check_tokenizers(cfg.draft_model, cfg.target_model, tokenizer, load_config(cfg.draft_model, "draft"),  # any pair of one tokenizer
                     load_config(cfg.target_model, "target"))
    target = load_model(cfg.target_model, "target", dtype, device)
    draft = load_model(cfg.draft_model, "draft", dtype, device)
    align_vocab(target, draft, say)  # embeddings padded to different sizes: both cut to the shared rows
    eos = eos_token_ids(target, tokenizer)
    mask_id = None
    if cfg.parallel_drafts:  # the flag stays as given (-1: chosen here, the same way on --resume)
        from .train_parallel import check_mask_id

        mask_id = check_mask_id(cfg.mask_id, draft, tokenizer, say)
    if cfg.generate_from_target or any(r.is_chat for r in records):
        groups = answer_groups(cfg, records, tokenizer, target, eos, processes, say)
        train_groups, held_groups = train_data.split_heldout(groups, cfg.heldout_fraction)  # whole conversations
        data = train_data.SplitData.from_answers([i for g in train_groups for i in g], cfg.gamma)
        heldout = train_data.SplitData.from_answers([i for g in held_groups for i in g], cfg.gamma)
        unit = (f"answers (the loss on assistant tokens only) from {len(train_groups)} and {len(held_groups)} "
                "conversations or prompts")
    else:
        # verbose=False: a long text is cut into windows here, so the tokenizer's length warning means nothing
        streams = [tokenizer(r.text, add_special_tokens=False, verbose=False)["input_ids"] for r in records]
        windows = train_data.make_windows(streams, cfg.seq_len, tokenizer.eos_token_id)
        train_windows, held_windows = train_data.split_heldout(list(windows), cfg.heldout_fraction)
        data = train_data.SplitData.from_windows(torch.stack(train_windows), cfg.min_prefix, cfg.gamma)
        heldout = train_data.SplitData.from_windows(torch.stack(held_windows), cfg.min_prefix, cfg.gamma)
        unit = f"windows of {cfg.seq_len} tokens"
    sizes = (f"{len(data)} training and {len(heldout)} held-out {unit} ({data.supervised_positions:,} and "
             f"{heldout.supervised_positions:,} supervised positions)")
    trainer = training.FuserTrainer(cfg, target, draft, data, heldout, device, processes, eos, mask_id=mask_id)
    trainer.tokenizer = tokenizer  # saved beside an exported draft (--parallel_drafts --no-fusion)
    return trainer, dtype, sizes


def save_run(cfg, trainer, result, dtype) -> None:
    """The fuser (official layout), config.json, the draft adapter; the closing lines and warnings."""
    from . import training
    from ..app.loading import DTYPES

    out = Path(cfg.output_dir)
    save_dtype = (torch.bfloat16 if dtype == torch.bfloat16 else torch.float32) if cfg.save_dtype == "auto" else DTYPES[cfg.save_dtype]
    extra = {"sequences": {"train": len(trainer.data), "heldout": len(trainer.heldout)}, "history": result["history"],
             "train_seconds": result["seconds"], "processes": trainer.processes.count,
             "target_tokens": result["target_tokens"], "supervised_tokens": result["supervised_tokens"],
             "padding_tokens": result["padding_tokens"]}
    config = training.run_config(cfg, extra)
    if cfg.fusion:
        final = training.save_fuser(trainer.fuser, out, config=config, dtype=save_dtype)
    else:  # the adapter-alone arm: no projectors were trained, so none are written (not loadable as a fuser)
        (out / "config.json").write_text(json.dumps(config, indent=2, default=str))
        final = out
    last = result["history"][-1]
    if trainer.adapter is not None:
        from ..core.adapter import ADAPTER_DIR

        saved = trainer.adapter.save(out / ADAPTER_DIR, dtype=save_dtype,
                                     extra={"draft_model": cfg.draft_model, "trained_with_fusion": cfg.fusion},
                                     base=trainer.draft)
        print(f"saved the draft adapter ({cfg.draft_adapter}) to {saved}; held-out agreement of the adapted draft "
              f"without fusion {last['agreement_adapter_only']:.4f}", file=sys.stderr)
    if trainer.mask is not None:
        from . import train_parallel

        if trainer.adapter is not None:
            train_parallel.save(trainer, out / ADAPTER_DIR, save_dtype)
        if not cfg.fusion:  # PARD alone: a draft folder vLLM's parallel drafting and --parallel_drafting load as it is
            exported = train_parallel.export_pard(trainer, out / "pard_draft", trainer.tokenizer, save_dtype)
            print(f"exported the parallel draft in PARD's layout to {exported} (pard_token {trainer.mask.mask_id}): "
                  f"--base_model {exported} --parallel_drafting --fuser_checkpoint none", file=sys.stderr)
    lines, warnings = summary(cfg, final, last)
    print("\n".join(lines))
    for warning in warnings:
        print(f"WARNING: {warning}", file=sys.stderr)


def summary(cfg, final, last: dict) -> tuple[list[str], list[str]]:
    """The run's closing lines (held-out agreement, the engine's tokens per target call and its verdict)
    and its warnings: wherever the fuser changes nothing or makes decoding worse, with the fix."""
    from ..core.effect import EFFECT_FLOOR, inert
    from .engine_eval import verdict

    what = "fused" if cfg.fusion else "adapted draft"
    lines, warnings = [], []
    lines.append(f"saved {final} | held-out top-1 agreement {what} {last['agreement_fused']:.4f} vs unfused "
                 f"{last['agreement_unfused']:.4f} on {last['heldout_tokens']} positions of {last['heldout_sequences']} "
                 f"held-out sequences (won {last['won']}, lost {last['lost']}); open gates {last['open_gates']}/{last['gates']}")
    if last.get("tokens_per_call_fused") is not None:
        fused, unfused, n = last["tokens_per_call_fused"], last["tokens_per_call_unfused"], last["engine_prompts"]
        said, warning = verdict(last)
        lines.append(f"engine on {n} held-out prompts (greedy, gamma {cfg.gamma}; as many as --eval_seconds "
                     f"{cfg.eval_seconds:g} allowed, at most --eval_prompts {cfg.eval_prompts}): {fused:.3f} tokens per "
                     f"target call fused vs {unfused:.3f} unfused, better on {last['engine_wins']} prompts, worse on "
                     f"{last['engine_losses']}: {said}")
        if warning:
            warnings.append(warning)
    if cfg.parallel_drafts and last.get("parallel_agreement_fused"):
        lines.extend(parallel_lines(cfg, final, last))
    effects = last.get("projector_effects")
    if cfg.fusion and last["open_gates"] == 0:
        warnings.append("no gate is open: this fuser changes nothing (every gate logit <= 0; the demo skips fusion); "
                        "train longer, raise --lr, or start the gates open with --initial_gate_logit 1")
    elif effects and len(inert(effects)) == len(effects):
        warnings.append(f"this fuser changes the draft's K/V by at most {max(effects):.2g} (relative, on a held-out "
                        f"sequence), below {EFFECT_FLOOR:g}: it changes nothing, so the demo skips it; train longer, raise "
                        "--lr, or check the data")
    elif effects and inert(effects):
        warnings.append(f"projectors {', '.join(map(str, inert(effects)))} change the draft's K/V by less than "
                        f"{EFFECT_FLOOR:g} (relative): they change nothing, and the demo closes their gates")
    return lines, warnings


def parallel_lines(cfg, final, last: dict) -> list[str]:
    """A parallel-drafting run's closing lines: held-out agreement per offset (fused and unfused), the
    engine's parallel round, and for a fused run the demo command that runs it (with the draft it was
    trained on: a PARD draft's folder, not the plain one)."""
    share = lambda values: "/".join("-" if v is None else f"{v:.3f}" for v in values)  # noqa: E731
    k = cfg.parallel_drafts
    lines = [f"parallel drafting, K {k}: held-out agreement at offsets 1..{k} "
             + (f"fused {share(last['parallel_agreement_fused'])} vs unfused {share(last['parallel_agreement_unfused'])}"
                if cfg.fusion else share(last["parallel_agreement_unfused"]))]
    if last.get("parallel_tokens_per_call_fused") is not None:
        lines.append(f"the engine's parallel round (gamma {k}) on {last['parallel_engine_prompts']} held-out prompts: "
                     + (f"{last['parallel_tokens_per_call_fused']:.3f} tokens per target call fused vs "
                        f"{last['parallel_tokens_per_call_unfused']:.3f} unfused" if cfg.fusion else
                        f"{last['parallel_tokens_per_call_unfused']:.3f} tokens per target call"))
    if cfg.fusion:
        folder = Path(final).parent if Path(final).name == "final" else Path(final)
        lines.append(f"run it: python qwen3_14b_speculative_demo.py --base_model {cfg.draft_model} --teacher_model "
                     f"{cfg.target_model} --fuser_checkpoint {folder} --parallel_drafting --gamma {k}")
    return lines


def answer_groups(cfg, records, tokenizer, target, eos, processes, say) -> list[list[tuple[list[int], int]]]:
    """Per record, in the records' order, its answers as (ids, answer start): the assistant turns a
    conversation holds, and the target's own answer to a prompt (a text record, or a conversation
    ending with a user turn). Held-out data are split by record, so a conversation is never half trained."""
    from . import chat_data, train_data

    prompts = [r.text if not r.is_chat else r.messages for r in records if not r.is_chat or r.needs_answer]
    answers = iter(())
    if prompts:
        if not cfg.generate_from_target:
            raise UserInputError(f"{len(prompts)} record(s) of {cfg.data} have no answer (a text or prompt line, or a "
                                 "conversation ending with a user turn): pass --generate_from_target N to let the "
                                 "target answer them, or give every conversation its assistant turn")
        say(f"target answering {len(prompts)} prompts (at most {cfg.generate_from_target} tokens each)")
        answers = iter(train_data.target_generations(target, tokenizer, prompts, cfg.generate_from_target, eos, processes,
                                                   cfg.enable_thinking))
    groups = []
    for r in records:
        group = chat_data.assistant_items(tokenizer, r.messages, eos, cfg.enable_thinking) if r.is_chat else []
        if not r.is_chat or r.needs_answer:
            group.append(next(answers))
        if group:
            groups.append(group)
    if not groups:
        raise UserInputError(f"{cfg.data} holds no assistant turn to train on")
    return groups


if __name__ == "__main__":
    sys.exit(main())
