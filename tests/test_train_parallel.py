"""The parallel-drafting objective (c2c.tools.train_parallel): the attention layout checked query by
query against visible sets built by hand; without fusion every query's logits equal the draft run on
[x_0..x_anchor, j masks] as parallel drafting runs it; block 0 equals the all-position objective."""

import copy
import dataclasses

import pytest
import torch

from c2c.core import cache as kv
from c2c.tools import train_data, train_objective
from c2c.tools.train_parallel import MaskEmbedding, parallel_logits, supervised_blocks, visible
from tests import tiny


def hand_visible(starts: list[int], k: int) -> list[set[tuple[str, int, int]]]:
    """Per query (j, p) in block-major order, the set of keys it may see, as (kind, block, position)."""
    L, out = len(starts), []
    for j in range(k):
        for p in range(L):
            a = p - j
            if a < 0:
                out.append({("own", j, p)})
                continue
            seen = {("fused", 0, q) for q in range(starts[a])}
            seen |= {("own", 0, q) for q in range(starts[a], a + 1)}
            seen |= {("own", i, a + i) for i in range(1, j + 1)}
            out.append(seen)
    return out


def key_name(index: int, L: int) -> tuple[str, int, int]:
    if index < L:
        return ("fused", 0, index)
    if index < 2 * L:
        return ("own", 0, index - L)
    rest = index - 2 * L
    return ("own", 1 + rest // L, rest % L)


@pytest.mark.parametrize("k, width, offset", [(3, 4, 0), (4, 5, 2), (2, 3, 1), (5, 6, 3)])
def test_the_layout_is_what_each_block_may_see_by_hand(k, width, offset):
    L, lo = 14, 3
    starts, supervised = train_data.block_layout(L, lo, L - 1, width, offset)
    got = visible(starts.view(1, -1), k)[0]
    want = hand_visible(starts.tolist(), k)
    for index, keys in enumerate(want):
        row = {key_name(i, L) for i in torch.nonzero(got[index]).flatten().tolist()}
        assert row == keys, (index // L, index % L)
    sup = supervised_blocks(supervised.view(1, -1), k)[0].view(k, L)
    for j in range(k):
        for p in range(L):
            assert bool(sup[j, p]) == bool(supervised[p] and p - j >= 0 and supervised[p - j]), (j, p)


def test_without_fusion_each_query_is_the_draft_run_on_its_anchor_and_masks(target, draft):
    torch.manual_seed(0)
    L, k = 12, 4
    x = torch.randint(0, tiny.VOCAB - 8, (2, L))
    starts = torch.stack([train_data.block_layout(L, 2, L - 1, k + 1, o)[0] for o in (0, 2)])
    mask = MaskEmbedding(draft, tiny.VOCAB - 1)
    with torch.no_grad():
        mask.vector.add_(torch.randn_like(mask.vector))  # a trained vector, not the row it started from
        _, logits = parallel_logits(None, target, draft, x, starts, mask, k, fuse=False)
        logits = logits.view(2, k, L, -1)
        for b in range(2):
            for j in range(k):
                for p in range(j, L):
                    a = p - j
                    emb = torch.cat([draft.get_input_embeddings()(x[b : b + 1, : a + 1]), mask.vector.view(1, 1, -1).expand(1, j, -1)], 1)
                    want = draft(inputs_embeds=emb).logits[0, -1]
                    assert torch.allclose(logits[b, j, p], want, atol=1e-4), (b, j, p)


def test_block_zero_is_the_all_position_objective(target, draft, fuser):
    torch.manual_seed(1)
    L = 16
    x = torch.randint(0, tiny.VOCAB - 8, (1, L))
    starts = train_data.block_layout(L, 2, L - 1, 5, 1)[0].view(1, -1)
    with torch.no_grad():
        t_all, d_all = train_objective.all_position_logits(fuser, target, draft, x, starts)
        t_par, d_par = parallel_logits(fuser, target, draft, x, starts, MaskEmbedding(draft, tiny.VOCAB - 1), 3)
    assert torch.allclose(t_all, t_par) and torch.allclose(d_all, d_par[:, :L], atol=1e-4)


def test_the_mask_embedding_merges_into_its_row(draft):
    import copy

    copy_ = copy.deepcopy(draft)
    mask = MaskEmbedding(copy_, 5)
    with torch.no_grad():
        mask.vector.fill_(0.5)
    mask.merge_into(copy_)
    assert torch.equal(copy_.get_input_embeddings().weight[5], torch.full_like(mask.vector, 0.5))
    assert kv.cache_keyword(copy_)  # still a model


# ---------------------------------------------------------------- the trainer's command line, files, export


def train(saved_models, root, *extra):
    from c2c.tools import train_fuser

    data = root / "data.txt"
    data.write_text(" ".join(["the quick brown fox jumps over the lazy dog"] * 200), encoding="utf-8")
    return train_fuser.main([
        "--base_model", str(saved_models / "draft"), "--teacher_model", str(saved_models / "target"), "--data", str(data),
        "--output_dir", str(root / "out"), "--batch_size", "2", "--seq_len", "24", "--hidden_dim", "16",
        "--intermediate_dim", "16", "--eval_every", "4", "--save_every", "100", "--steps", "4", "--device", "cpu",
        "--no_progress", "--draft_adapter", "lora", "--adapter_rank", "2", "--adapter_lr", "0.05",
        "--parallel_drafts", "3", "--eval_prompts", "2", "--eval_new_tokens", "12", *extra])


@pytest.fixture(scope="module")
def parallel_fuser(saved_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel")
    assert train(saved_models, root) == 0
    return root / "out"


def test_the_trainer_writes_the_mask_beside_the_adapter_and_reports_each_offset(parallel_fuser):
    import json

    meta = json.loads((parallel_fuser / "draft_adapter" / "adapter.json").read_text())
    assert meta["parallel_drafts"] == 3 and meta["mask_id"] == tiny.VOCAB - 1  # the tokenizer never makes it
    assert (parallel_fuser / "draft_adapter" / "mask_embedding.safetensors").is_file()
    line = json.loads((parallel_fuser / "metrics.jsonl").read_text().splitlines()[-1])
    assert len(line["parallel_agreement_fused"]) == 3 and all(0 <= a <= 1 for a in line["parallel_agreement_fused"])
    assert line["parallel_tokens_per_call_fused"] >= 1 and line["parallel_tokens_per_call_unfused"] >= 1


def test_the_demo_drafts_in_parallel_with_the_trained_adapter_lossless(parallel_fuser, saved_models):
    from c2c.app import runner

    cfg = runner.RunConfig(draft_model=str(saved_models / "draft"), target_model=str(saved_models / "target"),
                           fuser_checkpoint=str(parallel_fuser), fuser_explicit=True, device="cpu", dtype="float32",
                           max_new_tokens=24, gamma=3, parallel_drafting=True)
    session = runner.prepare(cfg, log=lambda *_: None)
    assert session.masks == [tiny.VOCAB - 1] and session.parallel_draft is session.fused_draft
    unfused = cfg.spec.__class__(3, 24, False, False, parallel=True)
    assert runner.decoder(session, unfused).draft is session.fused_draft  # the plain draft never learnt the mask
    for prompt in ("hello there", "What is 1 + 1?"):
        entry = runner.run_prompt(session, prompt, run_standard=True)
        assert entry["comparison"]["outputs_match"] and entry["speculative"]["draft_mode"] == "parallel"


def test_no_fusion_exports_a_pard_folder_that_loads_back_with_the_same_outputs(saved_models, tmp_path):
    import json

    from c2c.app import runner
    from c2c.core.engine import SpecConfig, SpeculativeDecoder
    from c2c.core.sampling import SamplingConfig

    assert train(saved_models, tmp_path, "--no-fusion") == 0
    exported = tmp_path / "out" / "pard_draft"
    assert json.loads((exported / "config.json").read_text())["pard_token"] == tiny.VOCAB - 1
    cfg = runner.RunConfig(draft_model=str(exported), target_model=str(saved_models / "target"), fuser_checkpoint="none",
                           fuser_explicit=True, device="cpu", dtype="float32", max_new_tokens=24, gamma=3,
                           parallel_drafting=True)
    session = runner.prepare(cfg, log=lambda *_: None)
    assert session.masks == [tiny.VOCAB - 1]
    # the same draft rebuilt from the adapter files: the exported folder drafts exactly as it does
    from c2c.core.adapter import load_adapter, load_mask

    plain = runner.load_model(str(saved_models / "draft"), "draft", torch.float32, torch.device("cpu"))
    adapter = load_adapter(tmp_path / "out" / "draft_adapter", plain)
    rebuilt = adapter.merged_copy(plain)
    load_mask(tmp_path / "out" / "draft_adapter", rebuilt)
    spec = SpecConfig(3, 24, parallel=True)
    for prompt in ([5, 9, 33, 7], [17, 4, 100]):
        a = SpeculativeDecoder(session.target, session.draft, spec, SamplingConfig(), set(), masks=session.masks).generate(prompt)
        b = SpeculativeDecoder(session.target, rebuilt, spec, SamplingConfig(), set(), masks=session.masks).generate(prompt)
        assert a.output_ids == b.output_ids and a.counters.accepted_at == b.counters.accepted_at


def test_fusion_trains_on_top_of_a_pard_draft_from_its_own_mask(saved_models, tmp_path, capsys):
    """PARD first, then fusion: a draft whose config.json names a mask id (here the trainer's own export)
    is trained further with fusion from that id and its trained row; the demo then drafts in parallel
    with that draft and the new fuser, lossless."""
    import json

    from c2c.app import runner
    from c2c.tools import train_fuser
    from c2c.tools.train_parallel import check_mask_id

    (tmp_path / "pard").mkdir()
    assert train(saved_models, tmp_path / "pard", "--no-fusion") == 0
    exported = tmp_path / "pard" / "out" / "pard_draft"
    pard = runner.load_model(str(exported), "draft", torch.float32, torch.device("cpu"))
    config = json.loads((exported / "config.json").read_text())
    config["pard_token"] = 7  # another id than the default free row, to see the config's id win
    (exported / "config.json").write_text(json.dumps(config))
    pard.config.pard_token = 7
    said = []
    assert check_mask_id(-1, pard, None, said.append) == 7 and "config.json names" in said[0]
    row = pard.get_input_embeddings().weight[7].clone()
    assert torch.equal(MaskEmbedding(pard, 7).vector, row)  # training starts from the PARD draft's mask row

    argv = ["--base_model", str(exported), "--teacher_model", str(saved_models / "target"), "--data",
            str(tmp_path / "pard" / "data.txt"), "--output_dir", str(tmp_path / "fused"), "--batch_size", "2",
            "--seq_len", "24", "--hidden_dim", "16", "--intermediate_dim", "16", "--eval_every", "4", "--steps", "4",
            "--device", "cpu", "--no_progress", "--draft_adapter", "lora", "--adapter_rank", "2", "--parallel_drafts", "3",
            "--eval_prompts", "2", "--eval_new_tokens", "12"]
    assert train_fuser.main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out  # the closing lines: per offset, the parallel round, and how to run it
    assert "parallel drafting, K 3: held-out agreement at offsets 1..3 fused " in out
    assert "the engine's parallel round (gamma 3)" in out
    assert (f"run it: python qwen3_14b_speculative_demo.py --base_model {exported} --teacher_model "
            f"{saved_models / 'target'} --fuser_checkpoint {tmp_path / 'fused'} --parallel_drafting --gamma 3") in out
    assert json.loads((tmp_path / "fused" / "draft_adapter" / "adapter.json").read_text())["mask_id"] == 7
    cfg = runner.RunConfig(draft_model=str(exported), target_model=str(saved_models / "target"),
                           fuser_checkpoint=str(tmp_path / "fused"), fuser_explicit=True, device="cpu", dtype="float32",
                           max_new_tokens=24, gamma=3, parallel_drafting=True)
    session = runner.prepare(cfg, log=lambda *_: None)
    assert session.masks == [7] and session.parallel_draft is session.fused_draft
    entry = runner.run_prompt(session, "hello there", run_standard=True)
    assert entry["comparison"]["outputs_match"]
    # the same fuser with the draft the PARD export came from: its adapter was not trained on that one
    from c2c.errors import UserInputError

    with pytest.raises(UserInputError, match="was trained on .*pard_draft.*--base_model"):
        runner.prepare(dataclasses.replace(cfg, draft_model=str(saved_models / "draft")), log=lambda *_: None)
    config["pard_token"] = [7, 8]  # one mask id per offset: the trainer trains one, and says how to choose
    (exported / "config.json").write_text(json.dumps(config))
    argv[argv.index("--output_dir") + 1] = str(tmp_path / "fused2")
    assert train_fuser.main(argv) == 2 and "names 2 mask ids" in capsys.readouterr().err


def test_parallel_drafts_need_an_adapter_and_a_matching_gamma(saved_models, tmp_path, capsys):
    from c2c.tools import train_fuser

    base = ["--base_model", str(saved_models / "draft"), "--teacher_model", str(saved_models / "target"), "--data",
            str(tmp_path / "d.txt"), "--output_dir", str(tmp_path / "o"), "--parallel_drafts", "3", "--device", "cpu"]
    (tmp_path / "d.txt").write_text("a b c " * 100)
    assert train_fuser.main(base) == 2 and "--draft_adapter lora" in capsys.readouterr().err
    assert train_fuser.main(base + ["--draft_adapter", "lora", "--gamma", "5"]) == 2
    assert "--parallel_drafts 3 drafts rounds of that many tokens" in capsys.readouterr().err


def test_with_fusion_a_query_is_the_draft_reading_a_fused_prefix_then_its_window_and_masks(target, draft, fuser):
    """A prefix laid out as one block from position 0 (as a prompt: the draft's own causal pass, then
    fused at once) then a window [m, a] and j masks: the objective's logits equal the engine's way,
    prefill + prefill fusion of [0, m), then one forward of [x_m..x_a, j masks] through that cache."""
    from c2c.core.engine import fuse_positions

    torch.manual_seed(2)
    L, k, m = 14, 4, 6
    x = torch.randint(0, tiny.VOCAB - 8, (1, L))
    starts = torch.where(torch.arange(L) < m, 0, m).view(1, L)  # the prompt [0, m), then one round's window from m
    starts[0, :m] = 0
    mask = MaskEmbedding(draft, tiny.VOCAB - 1)
    with torch.no_grad():
        mask.vector.add_(torch.randn_like(mask.vector))
        _, logits = parallel_logits(fuser, target, draft, x, starts, mask, k)
        logits = logits.view(k, L, -1)
        # starts of prompt positions are 0: a query there reads the whole prefix as its own (prefill); the
        # window's queries read [0, m) fused. Only anchors in the window are checked.
        for j in range(k):
            for a in range(m, L - j):
                tcache, dcache = kv.new_cache(target), kv.new_cache(draft)
                kv.forward(target, x[:, :m], tcache, 0)
                kv.forward(draft, x[:, :m], dcache, 0)
                fuse_positions(fuser, tcache, dcache, 0, m)
                emb = torch.cat([draft.get_input_embeddings()(x[:, m : a + 1]), mask.vector.view(1, 1, -1).expand(1, j, -1)], 1)
                positions = torch.arange(m, a + 1 + j).view(1, -1)
                want = draft(inputs_embeds=emb, position_ids=positions, past_key_values=dcache, use_cache=True).logits[0, -1] \
                    if kv.cache_keyword(draft) == "past_key_values" else \
                    draft(inputs_embeds=emb, position_ids=positions, cache=dcache, use_cache=True).logits[0, -1]
                assert torch.allclose(logits[j, a + j], want, atol=1e-4), (j, a)


def test_a_parallel_run_resumes_with_the_same_command_and_overwrite_clears_its_export(saved_models, tmp_path, capsys):
    """The mask id is chosen the same way on --resume (the flag stays -1 in the run record); --overwrite
    removes an exported pard_draft/ with the rest of the run."""
    assert train(saved_models, tmp_path, "--no-fusion", "--save_every", "2") == 0
    assert train(saved_models, tmp_path, "--no-fusion", "--save_every", "2", "--steps", "6", "--resume") == 0, \
        capsys.readouterr().err
    assert (tmp_path / "out" / "pard_draft").is_dir()
    from c2c.tools import train_fuser

    data = tmp_path / "data.txt"
    assert train_fuser.main(["--base_model", str(saved_models / "draft"), "--teacher_model", str(saved_models / "target"),
                             "--data", str(data), "--output_dir", str(tmp_path / "out"), "--batch_size", "2", "--seq_len", "24",
                             "--hidden_dim", "16", "--intermediate_dim", "16", "--eval_every", "2", "--steps", "2",
                             "--eval_prompts", "0", "--device", "cpu", "--no_progress", "--overwrite"]) == 0
    assert not (tmp_path / "out" / "pard_draft").exists()


@pytest.mark.parametrize("flags, expected", [(["--parallel_drafts", "3", "--draft_adapter", "lora", "--mask_id", "99999"],
                                              "--mask_id 99999 is outside the draft's"),
                                             (["--mask_id", "5"], "--mask_id 5 is parallel drafting's mask")])
def test_bad_mask_ids_are_one_error_line(saved_models, tmp_path, capsys, flags, expected):
    from c2c.tools import train_fuser

    (tmp_path / "d.txt").write_text("a b c " * 100)
    rc = train_fuser.main(["--base_model", str(saved_models / "draft"), "--teacher_model", str(saved_models / "target"),
                           "--data", str(tmp_path / "d.txt"), "--output_dir", str(tmp_path / "o"), "--device", "cpu",
                           "--no_progress", *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: ") and expected in err[-1], err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_cod_keeps_block_0_whole_and_each_kept_mask_with_its_diagonal():
    """COD's kept queries: block 0 whole; a kept mask query of anchor a in block j has the masks of a in
    blocks 1..j-1 kept too (the keys it attends to); block j keeps about max(rate**j, floor) of its
    anchors; the same seed draws the same set, and rate 0 keeps everything."""
    from c2c.tools.train_parallel import cod_queries

    L, k, rate, floor = 60, 5, 0.7, 0.2
    assert cod_queries(L, k, 0.0, floor, (0, 1)) is None
    counts = [0] * k
    for step in range(400):
        kept = cod_queries(L, k, rate, floor, (3, step))
        assert torch.equal(kept[:L], torch.arange(L))
        s = set(kept.tolist())
        for q in kept[L:].tolist():
            j, p = divmod(q, L)
            assert p - j >= 0 and all((i * L + p - j + i) in s for i in range(1, j)), (j, p)
        for j in range(1, k):
            counts[j] += sum(1 for q in kept.tolist() if q // L == j)
    for j in range(1, k):
        share = counts[j] / (400 * (L - j))
        assert abs(share - max(rate**j, floor)) < 0.02, (j, share)
    assert torch.equal(cod_queries(L, k, rate, floor, (3, 7)), cod_queries(L, k, rate, floor, (3, 7)))
    assert not torch.equal(cod_queries(L, k, rate, floor, (3, 7)), cod_queries(L, k, rate, floor, (3, 8)))


@pytest.mark.parametrize("fuse", [False, True])
def test_cod_logits_are_the_full_passs_at_the_kept_queries(target, draft, fuser, fuse):
    """Every key a kept query attends to is kept, so its logits equal the full pass's at that query."""
    from c2c.tools.train_parallel import cod_queries

    torch.manual_seed(4)
    L, k = 18, 4
    x = torch.randint(0, tiny.VOCAB - 8, (2, L))
    starts = torch.stack([train_data.block_layout(L, 3, L - 1, k + 1, o)[0] for o in (0, 2)])
    mask = MaskEmbedding(draft, tiny.VOCAB - 1)
    queries = cod_queries(L, k, 0.6, 0.2, (0, 5))
    assert L < queries.numel() < k * L
    with torch.no_grad():
        _, full = parallel_logits(fuser, target, draft, x, starts, mask, k, fuse=fuse)
        _, thin = parallel_logits(fuser, target, draft, x, starts, mask, k, fuse=fuse, queries=queries)
    assert thin.shape[1] == queries.numel()
    assert torch.allclose(thin, full[:, queries], atol=1e-5)


def test_cod_trains_from_the_command_line_and_bad_rates_are_one_error_line(saved_models, tmp_path, capsys):
    assert train(saved_models, tmp_path, "--cod_rate", "0.5") == 0, capsys.readouterr().err
    assert (tmp_path / "out" / "draft_adapter" / "mask_embedding.safetensors").is_file()
    for bad in (["--cod_rate", "1.5"], ["--cod_rate", "0.7", "--cod_floor", "0"]):
        (tmp_path / "o2").mkdir(exist_ok=True)
        assert train(saved_models, tmp_path / "o2", *bad) == 2
        assert "--cod_rate must be in [0, 1)" in capsys.readouterr().err


def test_a_checkpoint_from_before_cod_resumes_as_it_ran(saved_models, tmp_path, capsys):
    """A parallel checkpoint whose run record has no cod_rate (written before COD existed) trained every
    query: resuming it with today's default (COD on) is an error naming the flag; --cod_rate 0 resumes."""
    import json

    from c2c.tools.run_folder import RUN_FILE

    assert train(saved_models, tmp_path, "--no-fusion", "--save_every", "2", "--cod_rate", "0") == 0
    records = list((tmp_path / "out" / "checkpoints").rglob(RUN_FILE))
    assert records
    for record in records:
        flags = json.loads(record.read_text())
        flags["run"].pop("cod_rate")
        record.write_text(json.dumps(flags))
    capsys.readouterr()
    assert train(saved_models, tmp_path, "--no-fusion", "--save_every", "2", "--steps", "6", "--resume") == 2
    assert "--cod_rate 0.0 in the checkpoint, 0.7 now" in capsys.readouterr().err
    assert train(saved_models, tmp_path, "--no-fusion", "--save_every", "2", "--steps", "6", "--resume", "--cod_rate", "0") == 0


def test_cod_queries_stay_inside_a_row_shorter_than_k():
    """A row of L < K positions: mask block j has anchors only for p >= j, none when j >= L."""
    from c2c.tools.train_parallel import cod_queries

    for L in range(1, 6):
        for step in range(5):
            kept = cod_queries(L, 5, 0.99, 0.9, (0, step))
            assert kept.max() < 5 * L and torch.equal(kept[:L], torch.arange(L)), (L, kept)
            assert all(q % L >= q // L for q in kept.tolist()), (L, kept)  # every kept mask query has an anchor


def test_cod_queries_narrowed_to_a_share_are_the_same_queries():
    """One process's share of the batch is cut to its longest row: the kept queries re-indexed for that
    width are the global ones inside it, block 0 whole and first."""
    from c2c.tools.train_parallel import cod_queries, narrowed

    L, W, k = 20, 13, 4
    kept = cod_queries(L, k, 0.7, 0.2, (1, 3))
    local = narrowed(kept, L, W)
    assert torch.equal(local[:W], torch.arange(W)) and local.max() < k * W
    assert {(q // W, q % W) for q in local.tolist()} == {(q // L, q % L) for q in kept.tolist() if q % L < W}
    assert narrowed(kept, L, L) is kept and narrowed(None, L, W) is None


@pytest.mark.parametrize("name", ["Gemma 2", "Gemma 3", "Llama"])
def test_the_trained_mask_is_what_decoding_feeds_on_scaled_embeddings(name):
    """Gemma's embedding layers scale every row by sqrt(hidden): the trainer's mask vector, written into
    its row at inference and looked up by id, must reach the draft at that scale while training too."""
    from tests import archs

    target, draft = archs.build_pair(archs.BY_NAME[name])
    torch.manual_seed(0)
    L, k, mask_id = 8, 3, tiny.VOCAB - 1
    x = torch.randint(3, tiny.VOCAB - 8, (1, L))
    starts = torch.zeros(1, L, dtype=torch.long)  # all prompt: the draft's own causal pass
    mask = MaskEmbedding(draft, mask_id)
    with torch.no_grad():
        mask.vector.add_(torch.randn_like(mask.vector))
        _, logits = parallel_logits(None, target, draft, x, starts, mask, k, fuse=False)
        logits = logits.view(k, L, -1)
        merged = copy.deepcopy(draft)
        mask.merge_into(merged)
        for j, p in ((1, 4), (2, 5), (2, 7)):
            ids = torch.cat([x[0, : p - j + 1], torch.full((j,), mask_id)]).view(1, -1)  # as decoding feeds ids
            assert torch.allclose(logits[j, p], merged(input_ids=ids).logits[0, -1], atol=1e-4), (name, j, p)
