"""Tiny random models of many decoder-only architectures, built offline with fixed seeds: the test
matrix of tests/test_architectures.py and the generator of docs/architectures.md.

Each architecture is one `Arch`: how to build its config at tiny size, and the modes (`MODES`:
chain, tree, compiled chain and tree, fusion, the generic demo) the harness refuses on it
(`unsupported`: an error line; every other mode must give transformers' own greedy output). A pair
is the target and a draft that is the target with its weights perturbed, so drafts partly agree
(rounds accept and reject). Sliding windows are shorter than a test's sequence, so they bite.

`python -m tests.archs` runs every architecture in every mode and writes docs/architectures.md from
what happened; `render(declared())` is what the page must say, checked by a test (the matrix tests
check each declaration holds).
"""

from __future__ import annotations

import copy
import sys
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from tests import tiny

WINDOW = 12  # sliding window of the tiny sliding-window models: shorter than every test's prompt + output
MODES = ("chain", "tree", "parallel", "compiled", "compiled_tree", "compiled_parallel", "fusion", "demo")
ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "architectures.md"


@dataclass(frozen=True)
class Arch:
    name: str  # as the docs name it
    model_type: str  # transformers' model_type
    config: dict  # the tiny config's fields (beyond the common ones)
    features: str  # what makes it different, for the page
    unsupported: dict = field(default_factory=dict)  # mode -> the error's gist (an `error:` line, before any model runs)


COMMON = dict(vocab_size=tiny.VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256)
LLAMA_LIKE = dict(intermediate_size=96, num_key_value_heads=2, tie_word_embeddings=False)

ARCHS = [
    Arch("Llama", "llama", LLAMA_LIKE, "grouped-query attention, rotary"),
    Arch("Qwen3", "qwen3", LLAMA_LIKE | dict(head_dim=16), "grouped-query, q/k norm"),
    Arch("Qwen2", "qwen2", LLAMA_LIKE, "grouped-query, QKV bias"),
    Arch("Mistral", "mistral", LLAMA_LIKE | dict(sliding_window=WINDOW), "sliding window on every layer"),
    Arch("Gemma 2", "gemma2", LLAMA_LIKE | dict(sliding_window=WINDOW, head_dim=16, query_pre_attn_scalar=16),
         "hybrid sliding/global layers, logit soft-capping"),
    Arch("Gemma 3", "gemma3_text", LLAMA_LIKE | dict(sliding_window=WINDOW, head_dim=16, query_pre_attn_scalar=16,
                                                     sliding_window_pattern=2, rope_local_base_freq=10000.0),
         "hybrid sliding/global layers (local rotary base)"),
    Arch("Phi-3", "phi3", LLAMA_LIKE | dict(pad_token_id=0), "fused QKV and gate/up projections"),
    Arch("GPT-NeoX", "gpt_neox", dict(intermediate_size=96), "multi-head attention, fused QKV, parallel residual"),
    Arch("OPT", "opt", dict(ffn_dim=96, word_embed_proj_dim=64), "multi-head attention, learned absolute positions"),
    Arch("GPT-2", "gpt2", dict(n_inner=96), "multi-head attention, fused QKV (Conv1D), learned absolute positions"),
    Arch("GPT-J", "gptj", dict(n_inner=96, rotary_dim=8), "multi-head attention, partial rotary, parallel residual"),
    Arch("BLOOM", "bloom", dict(), "ALiBi position bias, fused QKV",
         unsupported={"tree": "its ALiBi position bias follows each key's cache slot, not a tree node's position"}),
    Arch("Falcon", "falcon", dict(new_decoder_architecture=False, multi_query=True, num_kv_heads=1),
         "multi-query attention, fused QKV, parallel residual"),
    Arch("Starcoder2", "starcoder2", LLAMA_LIKE | dict(sliding_window=WINDOW), "sliding window, biases"),
    Arch("OLMo-2", "olmo2", LLAMA_LIKE, "q/k norm, post-norm"),
    Arch("Granite", "granite", LLAMA_LIKE, "scaled residuals and logits"),
    Arch("StableLM", "stablelm", LLAMA_LIKE, "partial rotary, layer norm"),
    Arch("Phi", "phi", dict(intermediate_size=96), "partial rotary, parallel residual"),
]
BY_NAME = {a.name: a for a in ARCHS}
# cross-family fusion pairs the matrix tests (draft, target): different architectures, one tokenizer
FUSION_PAIRS = (("Llama", "Qwen3"), ("GPT-NeoX", "Gemma 2"))


def declared(arch: Arch) -> dict[str, str]:
    """What the harness promises on `arch`: mode -> "yes" or the error's gist (a compiled tree: as the tree;
    the generic demo runs chains)."""
    return {mode: arch.unsupported.get(mode.removeprefix("compiled_"), "yes") for mode in MODES}


def build_config(arch: Arch):
    config = AutoConfig.for_model(arch.model_type, **COMMON, **arch.config)
    eos = tiny.eos_ids()
    config.eos_token_id, config.bos_token_id = eos, None
    if getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = eos[1]
    return config


def _perturb(model, scale: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.add_(scale * p.std() * torch.randn(p.shape, generator=g))


def build_model(arch: Arch, seed: int = 0, attn: str = "eager"):
    torch.manual_seed(seed)
    config = build_config(arch)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()
    with torch.no_grad():  # a sharper distribution than the init's: greedy choices are not near-ties
        model.get_output_embeddings().weight.mul_(4.0)
    model.generation_config.eos_token_id = tiny.eos_ids()
    model.generation_config.pad_token_id = tiny.eos_ids()[1]
    return model.requires_grad_(False)


def build_pair(arch: Arch, seed: int = 0, scale: float = 0.25):
    """(target, draft): the draft is the target with every weight matrix perturbed."""
    target = build_model(arch, seed)
    draft = copy.deepcopy(target)
    _perturb(draft, scale, seed + 100)
    return target, draft


def save_pair(arch: Arch, root: Path, seed: int = 0) -> tuple[Path, Path]:
    """The pair and the tiny tokenizer saved as a user has them on disk: (target folder, draft folder)."""
    tok = tiny.build_tokenizer()
    folders = []
    for name, model in zip(("target", "draft"), build_pair(arch, seed)):
        folder = root / f"{arch.model_type}-{name}"
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        folders.append(folder)
    return folders[0], folders[1]


# ---------------------------------------------------------------- running a mode (the tests and the page)

PROMPTS = ([5, 9, 33, 7, 100, 2, 44, 61], [17, 4, 250, 251])
NEW_TOKENS = 24


_HF: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> {(prompt, tokens): output}; dies with the model


def hf_greedy(target, prompt: list[int], new_tokens: int = NEW_TOKENS) -> list[int]:
    """transformers' own greedy generate: the reference every mode must equal (once per model and prompt)."""
    held = _HF.setdefault(target, {})
    key = (tuple(prompt), new_tokens)
    if key not in held:
        held[key] = _hf_greedy(target, prompt, new_tokens)
    return held[key]


def _hf_greedy(target, prompt: list[int], new_tokens: int) -> list[int]:
    out = target.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                          eos_token_id=None, pad_token_id=tiny.eos_ids()[1])
    return out[0, len(prompt):].tolist()


def run_mode(arch: Arch, mode: str, target=None, draft=None, compiled=None, backend: str = "eager") -> list[tuple[list[int], list[int]]]:
    """(HF's greedy output, ours) per prompt, in `mode`; raises the harness's own error where it refuses."""
    from c2c.core import cache as kv
    from c2c.core.engine import CompiledSteps, SpecConfig, SpeculativeDecoder
    from c2c.core.sampling import SamplingConfig
    from c2c.core.tree import TreeShape

    if target is None:
        target, draft = build_pair(arch)
    fuser = None
    tree = TreeShape(8, 3, 2) if mode in ("tree", "compiled_tree") else None
    if mode in ("tree", "compiled_tree"):
        kv.check_tree_support(target, "target")
        kv.check_tree_support(draft, "draft")
    if mode == "fusion":
        fuser = open_fuser(draft, target)
    if mode.startswith("compiled") and compiled is None:
        compiled = CompiledSteps(backend=backend)
    results = []
    for prompt in PROMPTS:
        want = hf_greedy(target, prompt)
        parallel = mode in ("parallel", "compiled_parallel")  # an untrained mask id: offset 1 accepts, the rest rarely
        spec = SpecConfig(gamma=3, max_new_tokens=NEW_TOKENS, tree=tree, parallel=parallel)
        got = SpeculativeDecoder(target, draft, spec, SamplingConfig(), set(), fuser=fuser,
                                 compiled=compiled if mode.startswith("compiled") else None,
                                 masks=[draft.config.get_text_config().vocab_size - 1] if parallel else None).generate(prompt)
        results.append((want, got.output_ids))
    return results


def open_fuser(draft, target, seed: int = 0):
    """A random fuser for any pair, every gate open (so fusion really changes the draft's cache)."""
    from c2c.core.fuser import C2CFuser, KVShape

    torch.manual_seed(seed)
    fuser = C2CFuser.create(KVShape.of(draft.config), KVShape.of(target.config), hidden_dim=32, intermediate_dim=32,
                            dtype=torch.float32)
    for p in fuser.projectors:
        for kind in ("key", "value"):
            getattr(p, f"{kind}_gate_logit").data.fill_(1.0)
            getattr(p, f"{kind}_proj_out").weight.data.mul_(10.0)  # large enough to change the draft's guesses
    return fuser.eval().requires_grad_(False)


def observe(arch: Arch, backend: str = "eager") -> dict[str, str]:
    """Run every mode on `arch`: mode -> "yes" (HF's greedy output, every prompt), "MISMATCH", or the
    harness's error line (a UserInputError); anything else raises."""
    from c2c.core.engine import CompiledSteps
    from c2c.errors import UserInputError

    target, draft = build_pair(arch)
    compiled = CompiledSteps(backend=backend)
    out = {}
    with torch.inference_mode():
        for mode in (m for m in MODES if m != "demo"):  # the demo runs apart, from saved folders
            try:
                pairs = run_mode(arch, mode, target, draft, compiled=compiled if mode.startswith("compiled") else None)
                out[mode] = "yes" if all(w == g for w, g in pairs) else "MISMATCH"
            except UserInputError as e:
                gist = arch.unsupported.get(mode.removeprefix("compiled_"))
                out[mode] = gist if gist and gist in str(e) else f"error: {e}"
    out["demo"] = run_demo(arch)
    return out


def run_demo(arch: Arch) -> str:
    """The generic demo end to end on the pair saved to disk (chain rounds, greedy, a two-turn question):
    "yes" when it exits 0 and every turn's output is the target's alone."""
    import contextlib
    import io
    import json
    import tempfile

    import demo_speculative_decoding as generic

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        target, draft = save_pair(arch, root)
        prompts = root / "q.jsonl"
        prompts.write_text(json.dumps({"question_id": 1, "category": "writing", "turns": ["The quick brown fox",
                                                                                         "What is 1 + 1?"]}) + "\n")
        args = ["--base_model", str(draft), "--teacher_model", str(target), "--prompts", str(prompts), "--max_new_tokens",
                str(NEW_TOKENS), "--device", "cpu", "--threads", "1", "--save_results", "--output_dir", str(root / "out")]
        err = io.StringIO()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            code = generic.main(args)
        if code != 0:
            return f"exit {code}: {err.getvalue().strip().splitlines()[-1]}"
        entries = json.loads(next((root / "out").glob("results_*.json")).read_text())["prompts"]
        return "yes" if all(e["comparison"]["outputs_match"] for e in entries) else "MISMATCH"


LABELS = {"chain": "chain", "tree": "tree", "parallel": "parallel drafting", "compiled": "compiled chain",
          "compiled_tree": "compiled tree", "compiled_parallel": "compiled parallel", "fusion": "fusion", "demo": "generic demo"}


def render(results: dict[str, dict[str, str]]) -> str:
    """docs/architectures.md from a result per architecture and mode ("yes" or the error's gist)."""
    notes: list[str] = []

    def cell(value: str) -> str:
        if value == "yes":
            return "yes"
        if value not in notes:
            notes.append(value)
        return f"error [{notes.index(value) + 1}]"

    lines = [
        "# Tested architectures",
        "",
        "<!-- generated by `python -m tests.archs --write` from the test matrix in tests/archs.py; "
        "tests/test_architectures.py checks this page is current and that every row holds -->",
        "",
        "Tiny random pairs of each architecture (the draft a perturbed copy of the target; 2 layers, hidden 64, "
        f"sliding windows of {WINDOW} positions, shorter than the sequences), built offline by the tests. "
        "**yes**: greedy output equal, token for token, to transformers' own `generate` of the target on every "
        "test prompt; **error**: the harness refuses with one `error:` line, decided from the config before any "
        "model runs (note below). Compiled: static caches and the compiled steps (`--compile`), traced by dynamo. "
        "Parallel drafting: `--parallel_drafting` at gamma 3 with an untrained mask id (the last vocabulary id), "
        "so exactness is tested, not acceptance. Generic demo: `demo_speculative_decoding.py` on the pair saved to disk, chain rounds, a two-turn "
        "question, every turn's output equal to the target's alone. "
        "Fusion: a random C2C fuser, every gate open, on the pair; across families "
        + ", ".join(f"a {d} draft fused from a {t} target" for d, t in FUSION_PAIRS) + " (one tokenizer).",
        "",
        "| architecture | `model_type` | what is particular | " + " | ".join(LABELS[m] for m in MODES) + " |",
        "|" + "---|" * (3 + len(MODES)),
    ]
    for arch in ARCHS:
        row = results[arch.name]
        lines.append(f"| {arch.name} | `{arch.model_type}` | {arch.features} | " + " | ".join(cell(row[m]) for m in MODES) + " |")
    lines += ["", *(f"[{i}] {note}: chain rounds (`--tree_budget 0`) serve it." for i, note in enumerate(notes, 1))]
    lines += [
        "",
        "In CI (`tests/test_architectures.py`, under a minute on 2 cores): chain, tree, parallel drafting and fusion "
        f"on every row; compiled chain, tree and parallel drafting on {' and '.join(COMPILED_IN_CI)} (hybrid sliding/global layers, learned "
        "absolute positions); the generic demo on GPT-2 (chains) and Gemma 2 (trees); the whole table, compiled included, by "
        "`python -m tests.archs --write`, which fails when a row does not hold. Sampled rounds are checked "
        "against the target's distribution (chi-square) on Gemma 2 and GPT-2.",
        "",
        "Not served, from the config: layers whose state a rollback can't crop (linear attention, Mamba-style "
        "recurrent layers, chunked or shared-KV layers), and models whose layers differ in KV shape.",
        "",
    ]
    return "\n".join(lines)


COMPILED_IN_CI = ("Gemma 3", "GPT-2")


def main(argv: list[str]) -> int:
    """Run the matrix (every architecture, every mode) and, with --write, write docs/architectures.md
    from what happened; exit 1 when a result differs from what ARCHS declares."""
    torch.set_num_threads(1)
    results, wrong = {}, []
    for arch in ARCHS:
        results[arch.name] = observe(arch)
        print(arch.name, results[arch.name], file=sys.stderr)
        wrong += [f"{arch.name} {m}: {v}" for m, v in results[arch.name].items() if v != declared(arch)[m]]
    if wrong:
        print("the matrix does not hold what ARCHS declares:\n  " + "\n  ".join(wrong), file=sys.stderr)
        return 1
    if "--write" in argv:
        PAGE.write_text(render(results), encoding="utf-8")
        print(f"wrote {PAGE}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
