"""The architecture matrix (tests/archs.py): on tiny random pairs of 18 decoder-only architectures
(the draft a perturbed copy of the target, so rounds accept and reject), greedy chain and tree
rounds give exactly transformers' own greedy `generate`, sliding windows shorter than the sequence;
compiled rounds (traced: dynamo's graphs on the eager backend, as the fast-path tests) on a
representative subset: Gemma 3 (hybrid sliding/global layers) and GPT-2 (learned absolute
positions), the rest by `python -m tests.archs`; fusion on every architecture and on two cross-family pairs; sampled rounds follow the
target's distribution on two families; what an architecture can't serve is one `error:` line
decided before any model runs; docs/architectures.md says what this file tests."""

import json

import pytest
import torch

import demo_speculative_decoding as generic
from c2c.core.engine import SpecConfig, SpeculativeDecoder
from c2c.core.sampling import SamplingConfig
from c2c.errors import UserInputError
from tests import archs, tiny
from tests.test_sampling import chi2, chi2_critical

COMPILED = archs.COMPILED_IN_CI  # hybrid sliding/global layers; learned absolute positions
_PAIRS: dict = {}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Models this small gain nothing from a second thread, and on busy shared cores lose a lot to it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pair(name: str):
    if name not in _PAIRS:
        _PAIRS[name] = archs.build_pair(archs.BY_NAME[name])
    return _PAIRS[name]


def check_mode(name: str, mode: str, **kw) -> None:
    arch = archs.BY_NAME[name]
    declared = archs.declared(arch)[mode]
    with torch.inference_mode():
        if declared != "yes":
            with pytest.raises(UserInputError, match="ALiBi"):
                archs.run_mode(arch, mode, *pair(name), **kw)
            return
        for want, got in archs.run_mode(arch, mode, *pair(name), **kw):
            assert got == want, (name, mode)


@pytest.mark.parametrize("name", [a.name for a in archs.ARCHS])
def test_greedy_chain_tree_and_parallel_equal_transformers_generate(name):
    check_mode(name, "chain")
    check_mode(name, "tree")
    check_mode(name, "parallel")


@pytest.mark.parametrize("name", [a.name for a in archs.ARCHS])
def test_fusion_keeps_the_targets_output(name):
    check_mode(name, "fusion")


@pytest.mark.parametrize("name", COMPILED)
def test_compiled_chain_and_tree_equal_transformers_generate(name):
    from c2c.core.engine import CompiledSteps

    compiled = CompiledSteps(backend="eager")  # traced: the compiled plumbing without C++ code generation
    check_mode(name, "compiled", compiled=compiled)
    check_mode(name, "compiled_tree", compiled=compiled)
    check_mode(name, "compiled_parallel", compiled=compiled)


def test_the_drafts_partly_agree_and_sliding_windows_bite():
    """The matrix means something: drafts are accepted and rejected, and sequences outrun the windows."""
    target, draft = pair("Mistral")
    with torch.inference_mode():
        c = SpeculativeDecoder(target, draft, SpecConfig(3, archs.NEW_TOKENS), SamplingConfig(), set()).generate(
            archs.PROMPTS[0]).counters
    assert 0 < c.total_accepted < c.total_drafted
    assert min(map(len, archs.PROMPTS)) + archs.NEW_TOKENS > 2 * archs.WINDOW


@pytest.mark.parametrize("draft_name,target_name", archs.FUSION_PAIRS)
def test_fusion_across_families_keeps_the_output_and_changes_the_drafts(draft_name, target_name):
    """A draft of one architecture fused from a target of another (one tokenizer, different heads,
    head sizes and layer counts): the output is the target's, and fusion changes what the draft proposes."""
    target = archs.build_model(archs.BY_NAME[target_name], seed=1)
    draft = archs.build_model(archs.BY_NAME[draft_name], seed=2)
    fuser = archs.open_fuser(draft, target)
    prompt = archs.PROMPTS[0]
    want = archs.hf_greedy(target, prompt)
    drafted = []
    with torch.inference_mode():
        for f in (None, fuser):
            rounds = []
            got = SpeculativeDecoder(target, draft, SpecConfig(3, archs.NEW_TOKENS), SamplingConfig(), set(), fuser=f,
                                     on_round=rounds.append).generate(prompt)
            assert got.output_ids == want
            drafted.append([r.drafted_ids for r in rounds])
    assert drafted[0] != drafted[1]


@pytest.mark.parametrize("name", ["Gemma 2", "GPT-2"])
def test_sampled_rounds_follow_the_targets_distribution(name):
    """Whole sampled runs (gamma 2, top-k 3): the first two tokens after a 14-token prompt (past the
    sliding window) follow the target's exact joint distribution, computed from its logits; the
    second is a speculative round's. Failure odds for a correct engine: under 1e-6 (chi-square, fixed seed)."""
    from c2c.core import cache as kv
    from c2c.core.sampling import probabilities

    target, draft = pair(name)
    prompt, cfg = [5, 9, 33, 7, 100, 2, 44, 61, 17, 4, 250, 251, 12, 8], SamplingConfig(temperature=1.0, top_k=3)

    def next_probs(ids):
        with torch.inference_mode():
            return probabilities(kv.forward(target, torch.tensor([ids]), kv.new_cache(target), 0, logits_to_keep=1)[0, -1], cfg)

    p1 = next_probs(prompt)
    cells = {(t1, t2): p1[t1].item() * p2
             for t1 in torch.nonzero(p1).flatten().tolist()
             for t2, p2 in enumerate(next_probs(prompt + [t1]).tolist()) if p2 > 0}
    keys = list(cells)
    counts = torch.zeros(len(keys))
    gen = torch.Generator().manual_seed(11)
    with torch.inference_mode():
        decoder = SpeculativeDecoder(target, draft, SpecConfig(2, 2), cfg, set(), generator=gen)
        for _ in range(600):
            out = decoder.generate(prompt).output_ids
            counts[keys.index(tuple(out))] += 1
    assert chi2(counts, torch.tensor([cells[k] for k in keys])) < chi2_critical(len(keys) - 1)


# ---------------------------------------------------------------- the generic demo on saved pairs


@pytest.fixture
def saved(saved_arch_pairs):
    return saved_arch_pairs


def demo_args(target, draft, prompts, out, *extra):
    return ["--base_model", str(draft), "--teacher_model", str(target), "--prompts", str(prompts), "--max_new_tokens", "20",
            "--device", "cpu", "--no_warmup", "--threads", "1", "--save_results", "--output_dir", str(out), "--lang", "en", *extra]


@pytest.fixture
def two_turns(tmp_path):
    path = tmp_path / "questions.jsonl"
    rows = [{"question_id": 81, "category": "writing", "turns": ["The quick brown fox", "What is 1 + 1?"]},
            {"question_id": 7, "category": "math", "turns": ["What is the sum of all integers from 1 to 100?"]}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("name,extra", [("GPT-2", ()), ("Gemma 2", ("--tree_budget", "8", "--tree_depth", "3", "--tree_topk", "2"))])
def test_generic_demo_runs_any_architecture_with_two_turn_questions(saved, two_turns, tmp_path, capsys, name, extra):
    target, draft = saved[name]
    assert generic.main(demo_args(target, draft, two_turns, tmp_path / "out", *extra)) == 0
    printed = capsys.readouterr().out
    assert "| writing | 2 |" in printed and "| math | 1 |" in printed  # the per-category table
    results = json.loads(next((tmp_path / "out").glob("results_*.json")).read_text())
    assert [(e["question_id"], e["turn"]) for e in results["prompts"]] == [(81, 1), (81, 2), (7, 1)]
    assert all(e["comparison"]["outputs_match"] for e in results["prompts"])
    second = results["prompts"][1]
    assert second["prompt"] == "What is 1 + 1?" and second["prompt_tokens"] > results["prompts"][0]["prompt_tokens"]
    assert set(results["summary_by_category"]) == {"writing", "math"}
    assert results["config"]["fusion"]["enabled"] is False  # no fuser named: fusion off, no warning hunt


def test_generic_demo_tree_on_alibi_is_one_error_line_before_loading(saved, two_turns, tmp_path, capsys, monkeypatch):
    from c2c.app import runner

    def never(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(runner, "load_model", never)
    target, draft = saved["BLOOM"]
    code = generic.main(demo_args(target, draft, two_turns, tmp_path / "out", "--tree_budget", "8"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: --tree_budget can't run on the target") and "ALiBi" in err[-1]
    assert "--tree_budget 0" in err[-1] and not list((tmp_path / "out").glob("results_*"))


def test_generic_demo_needs_both_models(capsys):
    assert generic.main(["--threads", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --base_model and --teacher_model are required") and "\n" not in err


@pytest.fixture
def other_tokenizer_draft(tmp_path):
    """A GPT-2 draft whose tokenizer is not the tiny one (same size, other ids)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path / "other-draft"
    archs.build_model(archs.BY_NAME["GPT-2"]).save_pretrained(folder)
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(tiny.VOCAB)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="t1").save_pretrained(folder)
    return folder


def test_pairs_with_different_tokenizers_are_one_error_line(saved, two_turns, tmp_path, capsys, other_tokenizer_draft):
    target, _ = saved["GPT-2"]
    code = generic.main(demo_args(target, other_tokenizer_draft, two_turns, tmp_path / "out"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: the draft") and "different tokenizers" in err[-1]


def trainer_args(draft, target, tmp_path):
    tmp_path.mkdir(exist_ok=True)
    data = tmp_path / "data.txt"
    data.write_text(" ".join(["the quick brown fox jumps over the lazy dog"] * 100), encoding="utf-8")
    return ["--base_model", str(draft), "--teacher_model", str(target), "--data", str(data), "--output_dir",
            str(tmp_path / "fuser"), "--batch_size", "2", "--seq_len", "24", "--hidden_dim", "16", "--intermediate_dim", "16",
            "--eval_every", "2", "--save_every", "2", "--device", "cpu", "--no_progress", "--steps", "2", "--threads", "1"]


def test_the_trainer_takes_a_cross_family_pair_of_one_tokenizer(saved, tmp_path, capsys, other_tokenizer_draft):
    from c2c.tools import train_fuser

    (target, _), (_, draft) = saved["Gemma 2"], saved["GPT-2"]  # a GPT-2 draft, a Gemma 2 target
    assert train_fuser.main(trainer_args(draft, target, tmp_path)) == 0
    assert train_fuser.main(trainer_args(other_tokenizer_draft, target, tmp_path / "other")) == 2
    assert "different tokenizers" in capsys.readouterr().err.strip().splitlines()[-1]


def test_a_padded_embedding_runs_cut_to_the_shared_rows(saved, two_turns, tmp_path, capsys):
    """As Qwen2.5-0.5B (151936 rows) with 7B (152064): one tokenizer, embeddings of different sizes; the
    demo and the trainer run both models cut to the shared rows, and say so."""
    target, draft = saved["GPT-2"]
    padded = tmp_path / "padded-target"
    model = archs.build_model(archs.BY_NAME["GPT-2"])
    model.resize_token_embeddings(tiny.VOCAB + 16)
    model.save_pretrained(padded)
    tiny.build_tokenizer().save_pretrained(padded)
    assert generic.main(demo_args(padded, draft, two_turns, tmp_path / "out")) == 0
    assert "the target's embedding has 336 rows" in capsys.readouterr().err
    results = json.loads(next((tmp_path / "out").glob("results_*.json")).read_text())
    assert all(e["comparison"]["outputs_match"] for e in results["prompts"])
    from c2c.tools import train_fuser

    assert train_fuser.main(trainer_args(draft, padded, tmp_path / "train")) == 0  # the trainer too
    assert "the target's embedding has 336 rows" in capsys.readouterr().err


# ---------------------------------------------------------------- the page


def test_the_architectures_page_is_what_the_matrix_declares():
    """docs/architectures.md is generated (python -m tests.archs --write); regenerate it when ARCHS changes."""
    page = archs.PAGE.read_text(encoding="utf-8")
    assert page == archs.render({a.name: archs.declared(a) for a in archs.ARCHS}), \
        "docs/architectures.md is stale: run python -m tests.archs --write"
