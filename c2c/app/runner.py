"""From a frozen configuration to results: load everything, warm up, run each prompt both ways.

Entry scripts (the demo, the benchmark) build a `RunConfig` from their flags and call `prepare`
and `run_prompt` with it; nothing here parses arguments or reads the environment.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass

import torch

from ..core import metrics
from ..core.adapter import adapter_mask_id, find_adapter, load_adapter, load_mask
from ..core.engine import CompiledSteps, SpecConfig, SpeculativeDecoder, cache_sizes, standard_generate, top2_margin
from ..errors import UserInputError
from ..core.effect import EFFECT_FLOOR, close_inert, projector_effects
from ..core.fuser import C2CFuser, KVShape, load_fuser
from .loading import (
    DEFAULT_FUSER,
    align_vocab,
    check_device_fits,
    check_tokenizers,
    check_pair,
    eos_token_ids,
    load_config,
    load_model,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
    resolve_fuser,
)
from .prompts import Question, conversation, encode_prompt
from ..core.cache import text_config, tree_unsupported
from ..core.sampling import SamplingConfig
from ..core.parallel import MASK_KEYS, config_mask_ids
from ..core.tree import TreeShape, grown_nodes


AUTO = -1  # --tree_budget auto
AUTO_BUDGETS = (4, 8, 16, 32, 64)  # the budgets --tree_budget auto weighs (verify sizes timed: budget + 1)


@dataclass(frozen=True)
class RunConfig:
    draft_model: str = "Qwen/Qwen3-0.6B"
    target_model: str = "Qwen/Qwen3-14B"
    fuser_checkpoint: str = DEFAULT_FUSER
    fuser_explicit: bool = False  # the user named the fuser: not finding it is an error
    gamma: int = 4
    max_new_tokens: int = 256
    prefill_fusion: bool = True
    decode_fusion: bool = True
    fuse_last_prompt: bool = True  # decode fusion covers the last prompt position too
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    device_map: str | None = None
    enable_thinking: bool = False
    compile: bool = False  # static caches + torch.compile'd fixed-shape steps
    threads: int | None = None  # torch CPU threads the entry script set (recorded, not applied here)
    tree_budget: int = 0  # > 0: tree rounds of this many draft nodes (0: a chain of gamma drafts; AUTO: chosen in the warm-up)
    tree_depth: int = 5  # tree rounds: draft forwards per round, the longest path
    tree_topk: int = 4  # tree rounds: children per expanded node, nodes expanded per depth
    parallel_drafting: bool = False  # all gamma drafts of a round from one draft forward (the draft names its mask id)

    @property
    def tree(self) -> TreeShape | None:
        if self.tree_budget == AUTO:  # until the warm-up chooses: the largest tree it measures
            return TreeShape(AUTO_BUDGETS[-1], self.tree_depth, self.tree_topk)
        return TreeShape(self.tree_budget, self.tree_depth, self.tree_topk) if self.tree_budget > 0 else None

    @property
    def spec(self) -> SpecConfig:
        return SpecConfig(self.gamma, self.max_new_tokens, self.prefill_fusion, self.decode_fusion, self.fuse_last_prompt,
                          self.tree, self.parallel_drafting)

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(self.temperature, self.top_k, self.top_p)


@dataclass
class Session:
    """Everything loaded for a run."""

    config: RunConfig
    device: torch.device
    dtype: torch.dtype
    tokenizer: object
    target: object
    draft: object
    fuser: C2CFuser | None
    fusion: dict  # {enabled, prefill, decode, reason}
    eos_ids: set[int]
    compiled: CompiledSteps | None = None
    fused_draft: object = None  # the draft with the fuser's draft adapter merged in (fused runs only), if it has one
    tree_auto: dict | None = None  # --tree_budget auto: what the warm-up measured and chose
    masks: list[int] | None = None  # the draft's mask id(s) for parallel drafting (None: its config names none)
    parallel_draft: object = None  # the draft with a parallel adapter merged (its mask trained): every parallel run uses it


SEED_RANGE = (0, 2**64 - 1)  # what torch.Generator.manual_seed takes


def choose_compile(requested: bool | None, device: str) -> bool:
    """--compile / --no-compile as given; by default on when the run goes to a CUDA device. Measured on
    an H100: eager, the 0.6B draft step cost as much as the 14B step (c ~ 1, no speedup possible);
    compiled, 0.18-0.20 of it (docs/gpu.md)."""
    if requested is not None:
        return requested
    from .loading import resolve_device

    try:
        return resolve_device(device).type == "cuda"
    except UserInputError:
        return False  # the device error itself is reported by prepare()


def validate(cfg: RunConfig) -> None:
    """Configuration errors, before anything is loaded."""
    if cfg.tree_budget == AUTO and cfg.tree_depth > AUTO_BUDGETS[-1]:
        raise UserInputError(f"--tree_budget auto weighs budgets up to {AUTO_BUDGETS[-1]} nodes, fewer than --tree_depth "
                             f"{cfg.tree_depth}: lower --tree_depth, or give a --tree_budget of at least {cfg.tree_depth}")
    if cfg.tree_budget == AUTO and grown_nodes(cfg.tree_depth, cfg.tree_topk) < AUTO_BUDGETS[0]:
        raise UserInputError(f"--tree_budget auto weighs trees of {AUTO_BUDGETS[0]} to {AUTO_BUDGETS[-1]} nodes, more than "
                             f"--tree_topk {cfg.tree_topk} at --tree_depth {cfg.tree_depth} can hold: raise either")
    if cfg.parallel_drafting and cfg.tree_budget:
        raise UserInputError("--parallel_drafting drafts a chain of --gamma tokens in one forward; tree rounds "
                             "(--tree_budget) draft one forward per depth: pass one of the two")
    if cfg.tree_budget < 0 and cfg.tree_budget != AUTO:
        raise UserInputError(f"--tree_budget must be >= 0 (0: a chain of --gamma drafts) or auto, got {cfg.tree_budget}")
    try:
        _ = cfg.spec, cfg.sampling  # their constructors check the values
    except ValueError as e:
        raise UserInputError(str(e)) from None
    if not SEED_RANGE[0] <= cfg.seed <= SEED_RANGE[1]:
        raise UserInputError(f"--seed must be between 0 and 2**64 - 1 (what torch's generator takes), got {cfg.seed}")


def flag(name: str) -> str:
    """How the command line names a setting (the API passes its own naming: argument names)."""
    return f"--{name}"


FIRST_CONTACT = ("--preset tiny runs a small shipped pair offline on this CPU now (or pass local folders for "
                 "--base_model/--teacher_model; CPU-only machines: install the CPU build of torch first, README quick start)")


def gamma_warning(gamma: int, max_new_tokens: int, arg=flag, name: str = "gamma") -> str | None:
    """The warning for a gamma (or tree depth, `name`) no round can hold, in the caller's terms (None when it fits)."""
    if gamma <= max_new_tokens - 2:
        return None
    return (f"{arg(name)} {gamma} exceeds what {arg('max_new_tokens')} {max_new_tokens} allows: a round drafts at most "
            f"{max(max_new_tokens - 2, 0)} tokens (the first token comes from the prefill, the last from the target), "
            "and every figure uses that gamma")


def cap_tree_budget(cfg: RunConfig, arg=flag) -> tuple[RunConfig, str | None]:
    """A tree budget above what (depth, top_k) can grow, capped to it (the caches are sized for the
    budget, and the JSON records the budget the rounds had), with the warning that says so."""
    most = grown_nodes(cfg.tree_depth, cfg.tree_topk)
    if cfg.tree_budget <= most:  # also chains (0) and auto
        return cfg, None
    return dataclasses.replace(cfg, tree_budget=most), (
        f"{arg('tree_budget')} {cfg.tree_budget} is more than a tree of {arg('tree_depth')} {cfg.tree_depth} and "
        f"{arg('tree_topk')} {cfg.tree_topk} can grow ({most} nodes): using {most}; raise either to grow more")


def prepare(cfg: RunConfig, log=print, first_contact: str = FIRST_CONTACT, arg=flag) -> Session:
    """Check cheap things first (device, configs, fuser shapes), then load the models. Without a GPU, a
    model that can't be loaded or is too large for the CPU gets `first_contact` (what to do now) added
    to its error; `arg` names settings in messages (flags here, argument names from the API)."""
    validate(cfg)
    cfg, capped = cap_tree_budget(cfg, arg)
    if capped:
        log(f"WARNING: {capped}")
    warning = gamma_warning(cfg.tree_depth if cfg.tree_budget else cfg.gamma, cfg.max_new_tokens, arg,
                            "tree_depth" if cfg.tree_budget else "gamma")
    if warning:
        log(f"WARNING: {warning}")
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    try:
        target_config = load_config(cfg.target_model, "target")
        draft_config = load_config(cfg.draft_model, "draft")
        check_device_fits(target_config, cfg.target_model, device, cfg.device)
    except UserInputError as e:
        if torch.cuda.is_available():  # a GPU machine: the model error alone is the story
            raise
        raise UserInputError(f"{e}; no GPU here either: {first_contact}") from None
    check_pair(draft_config, target_config, cfg.draft_model, cfg.target_model)
    if cfg.tree_budget:  # before any download of weights: an architecture tree rounds can't serve
        for role, name, config in (("target", cfg.target_model, target_config), ("draft", cfg.draft_model, draft_config)):
            reason = tree_unsupported(config)
            if reason:
                raise UserInputError(f"{arg('tree_budget')} can't run on the {role} {name} ({type(config).__name__}): "
                                     f"{reason}; use chain rounds ({arg('tree_budget')} 0)")

    fusion_wanted = cfg.prefill_fusion or cfg.decode_fusion
    if not fusion_wanted:
        choice_path, reason = None, "fusion disabled (--no_prefill_fusion --no_decode_fusion)"
    else:
        choice = resolve_fuser(cfg.fuser_checkpoint, cfg.fuser_explicit)
        choice_path, reason = choice.path, choice.reason
        if choice_path is None and not cfg.fuser_explicit:  # the default name, not found: run without fusion
            log(f"WARNING: {reason}")
    fuser = None
    if choice_path is not None:
        fuser = load_fuser(choice_path, KVShape.of(draft_config), KVShape.of(target_config), device=device, dtype=dtype)
    adapter_dir = find_adapter(choice_path) if fuser is not None else None
    trained_mask = adapter_mask_id(adapter_dir)  # a parallel-drafting adapter's mask id (train_fuser --parallel_drafts)
    if cfg.parallel_drafting:
        masks = parallel_masks(draft_config, cfg.draft_model, arg, trained_mask)
    else:  # what a later parallel run (the API's generate) would use, if anything names a mask
        masks = config_mask_ids(draft_config) or ([trained_mask] if trained_mask is not None else None)

    tokenizer = load_tokenizer(cfg.target_model)
    check_tokenizers(cfg.draft_model, cfg.target_model, tokenizer, draft_config, target_config)
    target = load_model(cfg.target_model, "target", dtype, device, cfg.device_map)
    draft = load_model(cfg.draft_model, "draft", dtype, device)
    align_vocab(target, draft, log)
    rows = draft.get_input_embeddings().weight.shape[0]
    if cfg.parallel_drafting and max(masks) >= rows:
        raise UserInputError(f"{cfg.draft_model}'s mask id {max(masks)} lies past the {rows} embedding rows the pair shares "
                             "(the draft's extra rows are cut to the target's vocabulary): use a draft whose mask id is "
                             f"below {rows}, or drop {arg('parallel_drafting')}")
    open_gates = list(fuser.open_gates()) if fuser is not None else None
    fused_draft, adapter_info = None, None
    if adapter_dir is not None:
        adapter = load_adapter(adapter_dir, draft)
        fused_draft = adapter.merged_copy(draft)
        load_mask(adapter_dir, fused_draft)  # a parallel adapter's mask vector into its row (nothing otherwise)
        adapter_info = {"path": str(adapter_dir), "kind": adapter.kind, "rank": adapter.rank if adapter.kind == "lora" else None,
                        "parameters": sum(p.numel() for p in adapter.parameters())}
        log(f"draft adapter ({adapter.kind}) from {adapter_dir}: fused runs use the adapted draft, unfused runs the plain one"
            + (f"; parallel drafting runs use it fused and unfused (its trained mask, id {trained_mask})"
               if trained_mask is not None else ""))
    if open_gates is not None and open_gates[0] == 0:
        log(f"WARNING: no gate of the fuser at {choice_path} is open (all {open_gates[1]} gate logits <= 0): "
            "fusion changes nothing, so the engine skips it; the fuser is untrained or badly trained")
    effects, inert = (None, None) if fuser is None else close_inert_projectors(fuser, target, fused_draft or draft, choice_path, log)
    open_gates = list(fuser.open_gates()) if fuser is not None else None  # after closing the inert projectors
    fusion = {
        "enabled": fuser is not None,
        "prefill": fuser is not None and cfg.prefill_fusion,
        "decode": fuser is not None and cfg.decode_fusion,
        "fuse_last_prompt": fuser is not None and cfg.decode_fusion and cfg.fuse_last_prompt,
        "open_gates": open_gates,  # [open, total]: K and V gates of the projectors the layer map uses
        "projector_effects": effects,  # relative K/V change of each projector on a probe (c2c.core.effect)
        "inert_projectors": inert,  # those below EFFECT_FLOOR, their gates closed: they changed nothing
        "draft_adapter": adapter_info,  # not C2C: a draft change trained with the projectors (None: frozen draft)
        "reason": reason,
        "path": str(choice_path) if choice_path else None,
    }
    compiled = CompiledSteps() if cfg.compile else None
    parallel_draft = fused_draft if trained_mask is not None and masks == [trained_mask] else None
    return Session(cfg, device, dtype, tokenizer, target, draft, fuser, fusion, eos_token_ids(target, tokenizer), compiled,
                   fused_draft, masks=masks, parallel_draft=parallel_draft)


def parallel_masks(draft_config, draft_name: str, arg=flag, trained: int | None = None) -> list[int]:
    """The draft's mask id(s) for parallel drafting: from its config (as vLLM reads them), else from the
    fuser's parallel adapter (`trained`), checked against its vocabulary; an error naming the fix when
    neither names one."""
    ids = config_mask_ids(draft_config)
    if ids is None and trained is not None:
        ids = [trained]
    if ids is None:
        raise UserInputError(
            f"{arg('parallel_drafting')} needs a draft trained to draft in parallel, and {draft_name}'s config.json names "
            f"no mask id ({', '.join(MASK_KEYS)}) and the fuser has no parallel adapter: use a PARD draft such as "
            f"amd/PARD-Qwen3-0.6B (or its folder), train one (python -m c2c.tools.train_fuser --parallel_drafts K "
            f"--draft_adapter lora), or drop {arg('parallel_drafting')} to draft a chain")
    vocab = getattr(text_config(draft_config), "vocab_size", None)
    bad = [i for i in ids if i < 0 or (vocab is not None and i >= vocab)]
    if bad:
        raise UserInputError(f"{draft_name}'s config.json names mask id {bad[0]}, outside its vocabulary of {vocab} "
                             "embeddings: fix the mask id in the draft's config.json")
    return ids


def close_inert_projectors(fuser, target, draft, where, log) -> tuple[list[float], list[int]]:
    """Measure each projector's effect on the draft's K/V (64 seeded random tokens) and close the gates
    of those below EFFECT_FLOOR: a fuser that changes nothing then costs nothing (the engine skips a
    fuser with every gate closed). Returns (effects, closed projectors)."""
    vocab = min(target.config.vocab_size, draft.config.vocab_size)
    ids = torch.randint(0, vocab, (1, 64), generator=torch.Generator().manual_seed(0))  # (1, 64)
    open_before = fuser.open_gates()[0]
    effects = projector_effects(fuser, target, draft, ids)
    closed = close_inert(fuser, effects)
    if closed and open_before and fuser.open_gates()[0] == 0:
        log(f"WARNING: the fuser at {where} changes the draft's K/V by at most {max(effects):.2g} (relative; "
            f"{EFFECT_FLOOR:g} is the floor): fusion changes nothing, so the engine skips it (no fusion cost); the fuser "
            "is untrained or badly trained")
    elif closed and open_before:
        log(f"projectors {', '.join(map(str, closed))} of the fuser at {where} change the draft's K/V by less than "
            f"{EFFECT_FLOOR:g} (relative): their gates are closed")
    return effects, closed


def _generator(session: Session) -> torch.Generator:
    return torch.Generator(device=session.device).manual_seed(session.config.seed)


def decoder(session: Session, spec: SpecConfig | None = None, force_accept: bool = False, on_round=None) -> SpeculativeDecoder:
    """The session's speculative decoder. `force_accept` (compiled warm-ups only): every draft accepted
    and no end of sequence, so every round is full-size and the 2-token catch-up runs; output discarded."""
    cfg = session.config
    spec = spec or cfg.spec
    fuses = session.fuser is not None and (spec.prefill_fusion or spec.decode_fusion)
    draft = session.fused_draft if fuses and session.fused_draft is not None else session.draft
    if spec.parallel and session.parallel_draft is not None:  # the plain draft was never trained on masks
        draft = session.parallel_draft
    return SpeculativeDecoder(
        session.target, draft, spec, cfg.sampling, set() if force_accept else session.eos_ids,
        fuser=session.fuser, generator=_generator(session), compiled=session.compiled, force_accept=force_accept,
        on_round=on_round, masks=session.masks,
    )


def warm_prompts(session: Session, prompts: list[list[int]], max_new_tokens: int, gamma: int,
                 room_gamma: int | None = None, lookahead: int | None = None) -> list[list[int]]:
    """The prompts a warm-up must run: the first one, and with --compile the first of each static
    cache size the runs will use (each size has its own caches, graphs and compilation; a prompt's
    length stops at the context, see context_room, with `room_gamma` as the runs use it; the size
    follows the rounds' SpecConfig.lookahead, default gamma)."""
    if session.compiled is None:
        return prompts[:1]
    first: dict = {}
    for ids in prompts:
        tokens = context_room(session, len(ids), max_new_tokens, gamma if room_gamma is None else room_gamma)
        first.setdefault(cache_sizes(len(ids), tokens, gamma if lookahead is None else lookahead), ids)
    return list(first.values())


def warm_tokens(session: Session, max_new_tokens: int, gamma: int, least: int) -> int:
    """A warm-up run's length: compiling, the real one (graphs are per cache size, and the size
    follows the length); else short, with at least one full-size round, never longer than a real run."""
    if session.compiled is not None:
        return max_new_tokens
    return min(max(least, 2 * (gamma + 1)), max_new_tokens)


def warm_runs(session: Session, prompts: list[list[int]], max_new_tokens: int, gamma: int, least: int,
              room_gamma: int | None = None, lookahead: int | None = None) -> list[tuple[list[int], int]]:
    """The warm-up's runs, (prompt ids, new tokens): `warm_prompts`, each as long as `warm_tokens` says
    and no longer than its real run (stopped at the context, at `room_gamma`, default gamma)."""
    room_gamma = gamma if room_gamma is None else room_gamma
    tokens = warm_tokens(session, max_new_tokens, gamma, least)
    return [(ids, min(tokens, context_room(session, len(ids), max_new_tokens, room_gamma)))
            for ids in warm_prompts(session, prompts, max_new_tokens, gamma, room_gamma, lookahead)]


def warm_compiled(session: Session, ids: list[int], spec: SpecConfig) -> None:
    """With --compile, one forced-accept run at the real length: it builds every compiled shape the
    speculative runs can meet (1- and 2-token draft steps, the verify block, the fusion window)."""
    if session.compiled is not None:
        decoder(session, spec, force_accept=True).generate(ids)


def encode(session: Session, prompt: str | list[dict]) -> list[int]:
    """A prompt's ids: one user turn, or a conversation's messages (prompts.conversation)."""
    return encode_prompt(session.tokenizer, prompt, session.config.enable_thinking)


def conversation_turns(questions: list[Question], entries: list[dict]):
    """(question, turn number from 1, the messages to answer) for every turn of every question, in
    order: a later turn's messages hold the earlier turns and the answers the run gave them, read
    from `entries` (the caller appends each turn's entry, labelled by `label_entry`, before asking
    for the next turn): the speculative run's text, which greedy makes the target's own."""
    for question in questions:
        answers: list[str] = []
        for turn in range(1, len(question.turns) + 1):
            yield question, turn, conversation(list(question.turns[:turn]), answers)
            answers.append(entries[-1]["speculative"]["text"])


def label_entry(entry: dict, question: Question, turn: int) -> dict:
    """A turn's entry with where it comes from (JSON: question_id, category, turn)."""
    return entry | {"question_id": question.question_id, "category": question.category, "turn": turn}


def context_length(session: Session) -> int | None:
    """Positions both models can hold (their configs' max_position_embeddings), or None if unknown."""
    limits = []
    for model in (session.target, session.draft):
        config = text_config(model.config)
        if getattr(config, "max_position_embeddings", None):
            limits.append(int(config.max_position_embeddings))
    return min(limits) if limits else None


def check_context(session: Session, prompts: list[list[int]], max_new_tokens: int, gamma: int, arg=flag) -> list[str]:
    """Prompts against the models' context (max_position_embeddings), before any run. A prompt that
    leaves no room for one round is an error (past the context Qwen3's rotary positions go beyond what
    it was trained on and the output degrades: a 42k-token prompt on the tiny pair printed "you you
    you..."). A prompt that fits but whose output could run past the context at --max_new_tokens gets
    a warning (returned, for the caller to print): most outputs end at an end-of-sequence token first,
    and generation stops at the context (`run_prompt`), the report and JSON saying so. `arg` names
    the settings in the caller's terms."""
    limit = context_length(session)
    if limit is None:
        return []
    warnings = []
    for i, ids in enumerate(prompts, 1):
        if len(ids) + gamma + 2 > limit:
            raise UserInputError(
                f"prompt {i} is {len(ids):,} tokens, but the models hold {limit:,} positions "
                f"(max_position_embeddings) and a speculative round at {arg('gamma')} {gamma} needs {gamma + 2} more: shorten the prompt "
                f"to at most {max(limit - gamma - 2 - 1, 0):,} tokens")
        if len(ids) + max_new_tokens + gamma + 1 > limit and not warnings:
            room = max(limit - len(ids) - gamma - 1, 1)
            warnings.append(
                f"WARNING: prompt {i} is {len(ids):,} tokens: an output of {arg('max_new_tokens')} {max_new_tokens} would run "
                f"past the models' {limit:,} positions (max_position_embeddings), where they degrade: generation "
                f"stops there, after at most {room:,} tokens, and the results say so (lower {arg('max_new_tokens')} to "
                f"{room:,} to stay inside)")
    return warnings


def context_room(session: Session, prompt_tokens: int, max_new_tokens: int, gamma: int) -> int:
    """New tokens a prompt may get: max_new_tokens, or fewer where the output would run past the models'
    context (a speculative round reads up to gamma + 1 positions past the output's end)."""
    limit = context_length(session)
    if limit is None:
        return max_new_tokens
    return max(1, min(max_new_tokens, limit - prompt_tokens - gamma - 1))


@torch.inference_mode()
def warmup(session: Session, prompts: list[str], run_standard: bool, tokens: int = 8) -> float:
    """An untimed run of each loop so that lazy initialisation (and compilation) stays out of the
    timings: a short one on the first prompt; with --compile, full-length runs (a forced-accept one
    too) on the first prompt of each static cache size. Returns its seconds (compiling: mostly compile time)."""
    import time

    started = time.perf_counter()
    cfg = session.config
    all_ids = [encode(session, p) for p in prompts]
    runs = warm_runs(session, all_ids, cfg.max_new_tokens, cfg.gamma, tokens, lookahead=cfg.spec.lookahead)
    for ids, length in runs:
        spec = dataclasses.replace(cfg.spec, max_new_tokens=length)
        if run_standard:
            standard(session, ids, length)
        decoder(session, spec).generate(ids)
        warm_compiled(session, ids, spec)
    if cfg.tree_budget == AUTO:
        choose_tree(session, all_ids)
        chosen = session.config  # compiling: the chosen shape's graphs, before the timed runs (its caches may
        for ids, length in warm_runs(session, all_ids, chosen.max_new_tokens, chosen.gamma, tokens,  # be sized apart)
                                     lookahead=chosen.spec.lookahead):
            warm_compiled(session, ids, dataclasses.replace(chosen.spec, max_new_tokens=length))
    return time.perf_counter() - started


def choose_tree(session: Session, prompts: list[list[int]], log=None) -> dict:
    """--tree_budget auto: decode the first prompts with the largest tree it weighs, logging what each
    round accepted; time the target's verify of each budget's block and the draft's cost per depth on
    this machine; keep the (budget, depth) with the most estimated tokens per second of round time
    (tree.choose_shape). Replaces the session's configuration and returns the figures (also in the
    results as config.tree_auto)."""
    from ..core.timing import forward_time
    from ..core.tree import choose_shape

    cfg = session.config
    draft_s = other_s = 0.0
    logs: list = []
    for ids in prompts[:3]:  # a few prompts' rounds: enough to rank the shapes, short enough for a warm-up
        spec = dataclasses.replace(cfg.spec, max_new_tokens=context_room(session, len(ids), cfg.max_new_tokens, cfg.tree_depth))
        dec = decoder(session, spec)
        dec.tree_log = []
        c = dec.generate(ids).counters
        draft_s += c.times.get("draft", 0.0)
        other_s += c.times.get("fusion", 0.0) + c.times.get("overhead", 0.0)
        logs += dec.tree_log
    say = log or (lambda m: print(m, file=sys.stderr))
    if not logs:  # nothing drafted (max_new_tokens leaves no room, or the outputs ended at once): no data
        shape = cfg.tree
        figures = {"chosen": None, "candidates": [], "rounds_logged": 0, "verify_ms": {},
                   "note": "no tree round to measure: the largest shape was kept"}
        session.config = dataclasses.replace(cfg, tree_budget=shape.budget)
        session.tree_auto = figures
        say(f"--tree_budget auto: no tree round in the warm-up to measure (max_new_tokens leaves no room, or the outputs "
            f"ended at once): keeping budget {shape.budget}, depth {shape.depth}")
        return figures
    # the verify of each budget's block after the first prompt's context (median of 3)
    verify_ms = {b + 1: 1000 * forward_time(session.target, b + 1, len(prompts[0]), None, 3, 0) for b in AUTO_BUDGETS}
    forwards = sum(max(depths) for _, depths, _ in logs)  # draft forwards of the logged rounds (one per depth)
    shape, figures = choose_shape(logs, verify_ms, 1000 * draft_s / max(forwards, 1), 1000 * other_s / len(logs),
                                  cfg.tree_topk, cfg.tree_depth)
    figures |= {"rounds_logged": len(logs), "verify_ms": verify_ms}
    session.config = dataclasses.replace(cfg, tree_budget=shape.budget, tree_depth=shape.depth)
    session.tree_auto = figures
    c = figures["chosen"]
    say(f"--tree_budget auto: budget {shape.budget}, depth {shape.depth} (top_k {shape.top_k}): an estimated "
                   f"{c['tokens_per_round']:.2f} tokens a round in {c['round_ms']:.2f} ms, {c['tokens_per_second']:.0f} "
                   f"tokens/s, the best of {len(figures['candidates'])} shapes (budgets {', '.join(map(str, AUTO_BUDGETS))}, "
                   f"depths 1-{cfg.tree_depth}) from {len(logs)} logged rounds and verify times measured here")
    return figures


def standard(session: Session, ids: list[int], max_new_tokens: int, on_token=None):
    cfg = session.config
    return standard_generate(session.target, ids, max_new_tokens, cfg.sampling, session.eos_ids, _generator(session),
                             compiled=session.compiled, on_token=on_token)


@torch.inference_mode()
def run_prompt(session: Session, prompt: str | list[dict], run_standard: bool, printer=None, save_rounds: bool = False) -> dict:
    """One prompt (a user turn, or a conversation's messages ending with one): the standard run
    (unless skipped), the speculative run and their comparison.

    `printer` (a stream.StreamPrinter) streams both runs as they go, its time left out of the
    latencies; `save_rounds` adds each speculative round's record (RoundInfo.record) to the entry.
    """
    cfg, tok = session.config, session.tokenizer
    ids = encode(session, prompt)
    if not isinstance(prompt, str):  # a later turn grew with the answers: it may no longer fit (an error line if not)
        check_context(session, [ids], cfg.max_new_tokens, cfg.gamma)
    max_new = context_room(session, len(ids), cfg.max_new_tokens, cfg.gamma)
    entry = {"prompt": prompt if isinstance(prompt, str) else prompt[-1]["content"], "prompt_tokens": len(ids), "max_new_tokens": max_new, "stopped_at_context": False,
             "standard": None, "speculative": None, "comparison": None}
    if run_standard:
        if printer is not None:
            printer.begin(printer.labels["standard"])
        result = standard(session, ids, max_new, on_token=printer.token if printer is not None else None)
        if printer is not None:
            printer.end()
        entry["standard"] = metrics.standard_metrics(result, tok.decode(result.output_ids, skip_special_tokens=True))
    rounds = []

    def on_round(info) -> None:
        if save_rounds:
            rounds.append(info.record())
        if printer is not None:
            printer.round(info)

    if printer is not None:
        shape = (f"tree {cfg.tree_budget}/{cfg.tree_depth}/{cfg.tree_topk}" if cfg.tree_budget else
                 f"parallel drafting, gamma {cfg.gamma}" if cfg.parallel_drafting else f"gamma {cfg.gamma}")
        printer.begin(printer.labels["speculative"].format(gamma=shape))
    spec = cfg.spec if max_new == cfg.max_new_tokens else dataclasses.replace(cfg.spec, max_new_tokens=max_new)
    result = decoder(session, spec, on_round=on_round if printer is not None or save_rounds else None).generate(ids)
    if printer is not None:
        printer.end()
    entry["stopped_at_context"] = max_new < cfg.max_new_tokens and len(result.output_ids) == max_new
    step = entry["standard"]["target_step_time"] if entry["standard"] else None
    entry["speculative"] = metrics.speculative_metrics(result, tok.decode(result.output_ids, skip_special_tokens=True), cfg.gamma, step)
    if save_rounds:
        entry["speculative"]["round_records"] = rounds
    if entry["standard"] is not None:
        comparison = metrics.comparison(entry["standard"], entry["speculative"])
        k = comparison["first_divergence"]
        if k is not None and cfg.temperature == 0:  # greedy outputs differ: say how close the tie was
            comparison["divergence_top2_margin"] = top2_margin(session.target, ids, entry["standard"]["output_ids"][:k])
        comparison["explanation"] = metrics.explain(entry["standard"], entry["speculative"])
        entry["comparison"] = comparison
    return entry


def config_record(session: Session, prompts_file: str, command: str) -> dict:
    cfg = session.config
    return {
        "draft_model": cfg.draft_model,
        "target_model": cfg.target_model,
        "fuser_checkpoint": cfg.fuser_checkpoint,
        "fusion": session.fusion,
        "gamma": cfg.gamma,
        "max_new_tokens": cfg.max_new_tokens,
        "temperature": cfg.temperature,
        "top_p": cfg.top_p,
        "top_k": cfg.top_k,
        "seed": cfg.seed,
        "dtype": str(session.dtype).removeprefix("torch."),
        "device": str(session.device),
        "device_map": cfg.device_map,
        "enable_thinking": cfg.enable_thinking,
        "compile": cfg.compile,
        "tree": {"budget": "auto" if cfg.tree_budget == AUTO else cfg.tree_budget, "depth": cfg.tree_depth,
                 "top_k": cfg.tree_topk} if cfg.tree_budget else None,
        "tree_auto": session.tree_auto,
        "draft_mode": "tree" if cfg.tree_budget else "parallel" if cfg.parallel_drafting else "chain",
        "parallel_drafting": {"mask_ids": session.masks} if cfg.parallel_drafting else None,
        "threads": cfg.threads,
        "prompts_file": prompts_file,
        "command": command,
        "eos_token_ids": sorted(session.eos_ids),
    }
