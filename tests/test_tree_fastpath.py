"""Tree rounds on the fast path: static caches, the draft's growth and the verify with the walk and
both caches' compaction as compiled calls. Greedy output is the target's for many shapes, with and
without fusion; the counters equal the eager run's; a seeded sampled run repeats the eager one; after
every round both caches hold the committed sequence; a full round is three compiled calls, greedy
or sampled, with a few pinned launches between them."""

import sys
from pathlib import Path

import pytest
import torch

from c2c.core import cache as kv
from c2c.core.engine import CompiledSteps, SpecConfig, SpeculativeDecoder, standard_generate
from c2c.core.sampling import SamplingConfig
from c2c.core.tree import TreeShape

PROMPTS = ([5, 9, 33, 7, 100, 2], [250, 251, 252, 3, 3, 3, 40, 41])
SHAPES = [(8, 4, 2), (16, 5, 3), (4, 4, 1), (12, 2, 6), (6, 1, 6)]


@pytest.fixture(scope="module")
def traced():
    """Dynamo tracing with the eager backend: the compiled plumbing without C++ code generation."""
    return CompiledSteps(backend="eager")


def spec(shape, max_new=30) -> SpecConfig:
    return SpecConfig(gamma=4, max_new_tokens=max_new, tree=TreeShape(*shape))


COUNTED = ("draft_calls", "target_calls", "rounds", "total_drafted", "total_accepted", "rejections", "fused_tokens",
           "nodes_verified", "drafted_at", "accepted_at", "tokens_per_round")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fused", [False, True])
def test_compiled_tree_rounds_give_the_targets_ids_and_the_eager_counters(target, draft, fuser, traced, shape, fused):
    with torch.inference_mode():
        for prompt in PROMPTS:
            want = standard_generate(target, prompt, 30, SamplingConfig(), set()).output_ids
            f = fuser if fused else None
            eager = SpeculativeDecoder(target, draft, spec(shape), SamplingConfig(), set(), fuser=f).generate(prompt)
            rounds = []
            fast = SpeculativeDecoder(target, draft, spec(shape), SamplingConfig(), set(), fuser=f, compiled=traced,
                                      on_round=rounds.append).generate(prompt)
            assert fast.output_ids == eager.output_ids == want, (shape, prompt)
            for name in COUNTED:
                assert getattr(fast.counters, name) == getattr(eager.counters, name), name
            # the write positions the graphs set on the device follow the host's bookkeeping
            assert all(r.target_cache == r.committed - 1 and r.draft_cache <= r.committed for r in rounds)


def test_a_compiled_sampled_tree_run_repeats_the_eager_one(target, draft, fuser, traced):
    """The round's uniforms are drawn once per round with the user's generator and passed into the
    verify graph, so a seeded compiled run draws exactly what the eager one draws."""
    sampling = SamplingConfig(temperature=0.8, top_k=40)

    def run(compiled, seed):
        with torch.inference_mode():
            return SpeculativeDecoder(target, draft, spec((12, 4, 3)), sampling, set(), fuser=fuser,
                                      generator=torch.Generator().manual_seed(seed), compiled=compiled).generate(PROMPTS[0]).output_ids

    assert run(traced, 5) == run(None, 5)
    assert len({tuple(run(traced, s)) for s in range(4)}) > 1  # the seed matters: it is really sampled


def test_after_every_compiled_round_the_caches_hold_the_committed_sequence(target, draft, traced):
    """The static caches' first positions equal a fresh prefill of the committed tokens (the target's:
    all but the pending one; the draft's: what it holds), after every round (1e-5)."""
    prompt, emitted, checked = PROMPTS[0], [], []
    decoder = SpeculativeDecoder(target, draft, spec((16, 5, 3), 24), SamplingConfig(), set(), compiled=traced)

    def hook(info):
        emitted.extend(info.tokens)
        seq = prompt + emitted
        for model, cache, held in ((target, decoder.target_cache, info.target_cache),
                                   (draft, decoder.draft_cache, info.draft_cache)):
            fresh = kv.new_cache(model)
            kv.forward(model, torch.tensor([seq[:held]]), fresh, 0)
            for layer in range(kv.num_layers(fresh)):
                for a, b in zip(kv.read_kv(fresh, layer, 0, held), kv.read_kv(cache, layer, 0, held)):
                    assert torch.allclose(a, b, atol=1e-5), (info.round, layer)
        checked.append(info.round)

    decoder.on_round = hook
    with torch.inference_mode():
        result = decoder.generate(prompt)
    assert emitted == result.output_ids and len(checked) == result.counters.rounds + 1 and result.counters.rounds > 3


def test_forced_tree_rounds_accept_the_deepest_path(target, draft, traced):
    """Timing only: a forced chain-shaped tree accepts every draft, like a forced chain round."""
    with torch.inference_mode():
        result = SpeculativeDecoder(target, draft, spec((4, 4, 1), 21), SamplingConfig(), set(), compiled=traced,
                                    force_accept=True).generate(PROMPTS[0])
    assert result.counters.tokens_per_round == {5: 4}  # 1 + 4 rounds x (4 + 1)


@pytest.mark.parametrize("temperature, extra", [(0.0, {}), (0.8, {"aten::rand": 1})])
def test_a_compiled_tree_round_is_three_calls_and_a_few_launches(target, draft, fuser, traced, temperature, extra):
    """bench/round_ops.py's tree count with the traced backend: the draft's growth, the verify with
    the walk and compaction, the fusion window; between them the two output copies and the fusion's
    positions and keep-mask; a sampled round adds the draw of its uniforms, nothing else."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    from round_ops import VIEWS, count_tree_round_ops

    with torch.inference_mode():
        calls, ops = count_tree_round_ops(target, draft, fuser, traced, TreeShape(16, 4, 4), PROMPTS[0],
                                          SamplingConfig(temperature=temperature), rounds=6)
    launches = {k: v for k, v in ops.items() if k not in VIEWS}
    assert calls == 3
    assert launches == {"aten::clone": 2, "aten::arange": 1, "aten::clamp_min": 1, "aten::ge": 1, **extra}


def test_inductor_compiled_tree_rounds_give_the_targets_ids(target, draft, fuser):
    """The real default backend (C++ code generation on CPU, CUDA graphs on GPU), from a clean dynamo state."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    with torch.inference_mode():
        want = standard_generate(target, PROMPTS[0], 30, SamplingConfig(), set()).output_ids
        result = SpeculativeDecoder(target, draft, spec((8, 3, 2)), SamplingConfig(), set(), fuser=fuser,
                                    compiled=CompiledSteps()).generate(PROMPTS[0])
    assert result.output_ids == want
    assert counters["stats"]["unique_graphs"] >= 3  # the growth, the verify and the fusion window really were compiled


def test_auto_with_compile_builds_every_graph_before_the_timed_runs():
    """--tree_budget auto chooses its shape in the warm-up, then builds that shape's graphs at the cache
    sizes the timed runs use (a smaller shape can put a prompt in a smaller static cache than the
    largest tree's did: 180 + 32 tokens, 256 positions instead of 512): the timed runs compile nothing."""
    from torch._dynamo.utils import counters

    from c2c.app import runner
    from c2c.app.presets import preset_defaults

    v = preset_defaults("tiny")
    cfg = runner.RunConfig(draft_model=v["base_model"], target_model=v["teacher_model"], fuser_checkpoint=v["fuser_checkpoint"],
                           device="cpu", dtype="float32", compile=True, max_new_tokens=32, tree_budget=runner.AUTO,
                           tree_depth=5, tree_topk=4)
    session = runner.prepare(cfg, log=lambda m: None)
    session.compiled = CompiledSteps(backend="eager")  # traced: the same guards and graphs, no code generation
    words = "the king is dead long live the king and all his men".split()

    def prompt_of(n):
        text, i = "", 0
        while len(runner.encode(session, text)) < n:
            text, i = text + words[i % len(words)] + " ", i + 1
        return text

    prompts = [prompt_of(180), prompt_of(220)]
    runner.warmup(session, prompts, run_standard=True)
    assert session.tree_auto is not None
    for prompt in prompts:
        before = counters["stats"]["unique_graphs"]
        record = runner.run_prompt(session, prompt, run_standard=True)
        assert counters["stats"]["unique_graphs"] == before, session.config.tree
        assert record["speculative"]["output_ids"] == record["standard"]["output_ids"]
