"""The trainer on real chat data: batches of distinct rows of any length, the draft K/V decoding gives
the fuser, the same noise on 1 or N processes, clean checkpoints after --overwrite, inference weights
that follow the fuser, malformed data files as one error line, and the engine's own figure on
held-out prompts. Each test fails on the trainer as it was before (issue 21)."""

import json
import random

import pytest
import torch
from torch import nn

from c2c.core import cache as kv
from c2c.tools import chat_data, run_folder, train_data, train_fuser, train_objective, training
from c2c.core.engine import SpecConfig, SpeculativeDecoder, standard_generate
from c2c.errors import UserInputError
from c2c.core.fuser import StackedProjectors, StepNoise
from c2c.core.sampling import SamplingConfig
from tests import test_training, test_training_scale, tiny


def distinct_length_answers(count: int, prompt: int = 5, seed: int = 0) -> list[tuple[list[int], int]]:
    """`count` sequences whose answers all differ in length (3, 4, ... tokens)."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(3, 300, (prompt + 3 + k,), generator=g).tolist(), prompt) for k in range(count)]


# ---------------------------------------------------------------- batches


@pytest.mark.parametrize("objective", ["all", "one"])
def test_a_batch_of_answers_of_distinct_lengths_holds_distinct_rows(objective):
    data = train_data.SplitData.from_answers(distinct_length_answers(50), gamma=3)
    rng = random.Random(0)
    for _ in range(50):
        batch = data.sample_blocks(rng, 8) if objective == "all" else data.sample(rng, 8)
        assert batch.distinct == 8 and len(set(batch.lengths)) == 8
        for row, i in enumerate(batch.rows):  # each row is its sequence, then padding; supervised inside its span
            n = batch.lengths[row]
            assert batch.x[row, :n].tolist() == data.rows[i].tolist() and (batch.x[row, n:] == train_data.PAD_ID).all()
            lo, hi = data.spans[i]
            sup = batch.supervised[row].nonzero().flatten()
            assert sup.numel() >= 1 and lo <= int(sup.min()) and int(sup.max()) < hi
        assert batch.padding == batch.x.numel() - sum(batch.lengths) > 0


def test_a_length_sorted_pool_cuts_the_padding_and_keeps_rows_distinct():
    data = train_data.SplitData.from_answers(distinct_length_answers(200), gamma=3)
    padding = {}
    for pool in (1, 16):
        rng, pads, total = random.Random(0), 0, 0
        for _ in range(100):
            batch = data.sample_blocks(rng, 8, pool)
            assert batch.distinct == 8
            pads, total = pads + batch.padding, total + batch.x.numel()
        padding[pool] = pads / total
    assert padding[16] < 0.5 * padding[1]
    # every row is as likely as without the pool: it is drawn into the pool uniformly and its chunk is drawn uniformly
    counts = [0] * len(data)
    rng = random.Random(1)
    for _ in range(2000):
        for i in data.sample_blocks(rng, 8, 16).rows:
            counts[i] += 1
    # seeded; were the draw uniform, each count is binomial(16000, 1/200): mean 80, sd 8.9, and 40..130 lies 4.5 sd out
    assert 40 < min(counts) and max(counts) < 130


def test_fewer_sequences_than_the_batch_repeat_only_beyond_each_one_once():
    data = train_data.SplitData.from_answers(distinct_length_answers(3), gamma=3)
    batch = data.sample_blocks(random.Random(1), 8)
    assert batch.distinct == 3 and sorted(batch.rows[:3]) == [0, 1, 2]


@pytest.mark.parametrize("draft_kv", ["decode", "plain"])
def test_a_padded_row_computes_what_it_computes_alone(target, draft, fuser, draft_kv):
    data = train_data.SplitData.from_answers(distinct_length_answers(4, prompt=6), gamma=3)
    batch = data.sample_blocks(random.Random(2), 4)
    with torch.no_grad():
        t_batch, d_batch = train_objective.all_position_logits(fuser, target, draft, batch.x, batch.starts, draft_kv=draft_kv)
        for row, n in enumerate(batch.lengths):
            t_one, d_one = train_objective.all_position_logits(fuser, target, draft, batch.x[row : row + 1, :n],
                                                               batch.starts[row : row + 1, :n], draft_kv=draft_kv)
            assert torch.allclose(d_batch[row, :n], d_one[0], atol=1e-5, rtol=0)
            assert torch.allclose(t_batch[row, :n], t_one[0], atol=1e-5, rtol=0)


# ---------------------------------------------------------------- the K/V decoding gives the fuser


def decoded_round_by_round(fuser, target, draft, x: torch.Tensor, starts: torch.Tensor, lo: int, hi: int) -> dict[int, torch.Tensor]:
    """The reference: what the engine computes when its rounds are the blocks. The draft prefills the
    prompt, the prompt is fused; then per block the draft runs over the block on the fused cache and
    the block's positions are fused (decode fusion) before the next. Logits (V,) per supervised position."""
    with torch.no_grad():
        tcache, dcache = kv.new_cache(target), kv.new_cache(draft)
        kv.forward(target, x, tcache, 0)
        kv.forward(draft, x[:, :lo], dcache, 0)

        def fuse(start, end):
            for layer, (target_layer, _) in fuser.layer_map.items():
                k, v = fuser.fuse_layer(layer, kv.read_kv(tcache, target_layer, start, end), kv.read_kv(dcache, layer, start, end))
                kv.write_kv(dcache, layer, start, k, v)

        fuse(0, lo)
        logits, m = {}, lo
        while m < hi:
            end = m + int(((starts[0] == m) & (torch.arange(x.shape[1]) < hi)).sum())
            out = kv.forward(draft, x[:, m:end], dcache, m)  # (1, end-m, V)
            for j in range(end - m):
                logits[m + j] = out[0, j]
            fuse(m, end)
            m = end
    return logits


@pytest.mark.parametrize("seed", [0, 1])
def test_decode_kv_is_what_the_engine_computes_round_by_round(target, draft, fuser, seed):
    """draft_kv="decode" equals the round-by-round reference at every supervised position (1e-5);
    the plain pass's K/V (the earlier objective) do not, from the draft's second layer on."""
    assert draft.config.num_hidden_layers >= 2  # with one layer the two are the same by construction
    L, lo = 30, 7
    x = torch.randint(3, 300, (1, L), generator=torch.Generator().manual_seed(seed))
    starts, supervised = train_data.block_layout(L, lo, L - 1, 4, seed % 4)
    want = decoded_round_by_round(fuser, target, draft, x, starts.unsqueeze(0), lo, L - 1)
    with torch.no_grad():
        decode = train_objective.all_position_logits(fuser, target, draft, x, starts.unsqueeze(0), draft_kv="decode")[1][0]
        plain = train_objective.all_position_logits(fuser, target, draft, x, starts.unsqueeze(0), draft_kv="plain")[1][0]
    positions = supervised.nonzero().flatten().tolist()
    assert sorted(want) == positions
    for p in positions:
        assert torch.allclose(decode[p], want[p], atol=1e-5, rtol=0), p
    first_block = [p for p in positions if starts[p] == lo]
    later = [p for p in positions if p not in first_block]
    assert all(torch.allclose(plain[p], want[p], atol=1e-5) for p in first_block)  # only the prompt is fused there
    assert max(float((plain[p] - want[p]).abs().max()) for p in later) > 1e-3


def test_the_trainer_trains_on_decode_kv_by_default():
    assert training.TrainConfig("d", "t", "x", "o").draft_kv == "decode"
    with pytest.raises(UserInputError, match="--draft_kv"):
        training.TrainConfig("d", "t", "x", "o", draft_kv="fused")


# ---------------------------------------------------------------- the same fuser on 1 or N processes


def test_step_noise_depends_on_the_row_not_on_who_holds_it():
    whole, mine = StepNoise(3, "cpu"), StepNoise(3, "cpu")
    whole.begin(5, [0, 1, 2, 3], [10, 6, 9, 7])
    mine.begin(5, [1, 3], [6, 7])  # a second process holding rows 1 and 3, padded to 7 positions
    full, part = whole.rand((4, 10, 5), seq_dim=1), mine.rand((2, 7, 5), seq_dim=1)
    assert torch.equal(part[0, :6], full[1, :6]) and torch.equal(part[1, :7], full[3, :7])
    assert (part[0, 6:] == 0).all() and (full[1, 6:] == 0).all()  # padding positions get none
    assert torch.equal(mine.rand((2, 3, 7, 1), seq_dim=2)[:, :, :6], whole.rand((4, 3, 10, 1), seq_dim=2)[[1, 3], :, :6])
    again = StepNoise(3, "cpu")
    again.begin(6, [0, 1, 2, 3], [10, 6, 9, 7])
    assert not torch.equal(again.rand((4, 10, 5), seq_dim=1), full)  # another step, other numbers


def answers_data(windows) -> train_data.SplitData:
    """Sequences of different lengths cut from the trainer tests' windows (structured text)."""
    return train_data.SplitData.from_answers([(w[: 14 + (k * 5) % 18].tolist(), 8) for k, w in enumerate(windows)], gamma=3)


def first_step_gradient(cfg, target, draft, data, processes, monkeypatch) -> torch.Tensor:
    caught = []
    monkeypatch.setattr(training.Processes, "total", lambda self, value: value)  # no process group here
    monkeypatch.setattr(training.Processes, "sum_gradients", lambda self, params: caught.append(
        torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros(p.numel()) for p in params])))
    trainer = training.FuserTrainer(cfg, target, draft, data, data, torch.device("cpu"), processes)
    trainer.train_step()
    return caught[0]


@pytest.mark.parametrize("suffixes", ["all", "one"])
def test_the_shares_of_two_processes_add_up_to_one_process(tmp_path, target, draft, windows, monkeypatch, suffixes):
    cfg = test_training.config(tmp_path, dropout=0.1, gate_noise="gumbel", batch_size=6, suffixes=suffixes)
    data = answers_data(windows)
    one = first_step_gradient(cfg, target, draft, data, training.Processes(0, 1), monkeypatch)
    two = sum(first_step_gradient(cfg, target, draft, data, training.Processes(r, 2), monkeypatch) for r in (0, 1))
    assert one.abs().max() > 0 and torch.allclose(one, two, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("cod_rate", [0.0, 0.7])
def test_the_parallel_shares_of_two_processes_add_up_to_one_process(tmp_path, target, draft, windows, monkeypatch, cod_rate):
    """Parallel drafting, with COD and without: each process's rows are cut to their own longest
    (Batch.share), so COD's kept queries, drawn for the whole batch, must be re-indexed for that width."""
    import copy

    cfg = test_training.config(tmp_path, batch_size=6, suffixes="all", parallel_drafts=3, draft_adapter="lora",
                               adapter_rank=2, mask_id=5, cod_rate=cod_rate, length_pool=1)
    data = answers_data(windows)  # rows of different lengths: the shares are narrower than the batch
    # a fresh copy of the draft per trainer: each attaches its adapter's hooks to the draft it is given
    one = first_step_gradient(cfg, target, copy.deepcopy(draft), data, training.Processes(0, 1), monkeypatch)
    two = sum(first_step_gradient(cfg, target, copy.deepcopy(draft), data, training.Processes(r, 2), monkeypatch)
              for r in (0, 1))
    assert one.abs().max() > 0 and torch.allclose(one, two, atol=1e-6, rtol=1e-4)


def test_a_chain_checkpoint_from_before_cod_resumes_with_default_flags(tmp_path):
    """--cod_rate/--cod_floor only act with --parallel_drafts: a chain run's checkpoint recorded before
    they existed resumes with today's defaults (no '--cod_rate 0.0 in the checkpoint, 0.7 now')."""
    chain = test_training.config(tmp_path)
    saved = run_folder.run_flags(chain)
    del saved["cod_rate"], saved["cod_floor"]
    assert run_folder.changed_flags(saved, chain) == []
    parallel = test_training.config(tmp_path, suffixes="all", parallel_drafts=3, draft_adapter="lora")
    saved = run_folder.run_flags(parallel)
    del saved["cod_rate"], saved["cod_floor"]
    assert run_folder.changed_flags(saved, parallel) == ["--cod_rate 0.0 in the checkpoint, 0.7 now"]


def test_resume_repeats_the_uninterrupted_run_with_default_noise(tmp_path, target, draft, windows):
    cfg = test_training.config(tmp_path, steps=6, dropout=0.1, gate_noise="gumbel")
    data = answers_data(windows)

    def new():
        return training.FuserTrainer(cfg, target, draft, data, data, torch.device("cpu"))

    straight = new()
    for _ in range(6):
        straight.train_step()
    first = new()
    for _ in range(3):
        first.train_step()
    torch.rand(100)  # the global generator moves on: nothing in training may depend on it
    first.save_checkpoint(tmp_path / "ckpt")
    resumed = new()
    resumed.load_checkpoint(tmp_path / "ckpt")
    for _ in range(3):
        resumed.train_step()
    for (name, a), b in zip(straight.fuser.state_dict().items(), resumed.fuser.state_dict().values()):
        assert torch.equal(a, b), name


# ---------------------------------------------------------------- checkpoints and metrics


def steps_in_metrics(out) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_overwrite_starts_clean_and_resume_continues_this_run(tmp_path, capsys):
    out = tmp_path / "f"
    args = test_training_scale.arith_command(out, "--eval_every", "2", "--save_every", "2")
    assert train_fuser.main(args + ["--steps", "8"]) == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000006", "step_000008"]  # the last step too
    capsys.readouterr()
    assert train_fuser.main(args + ["--steps", "3", "--overwrite"]) == 0
    assert "removed the previous run's checkpoints/step_000006" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000002", "step_000003"]  # this run's only
    assert steps_in_metrics(out) == [2, 3]
    assert train_fuser.main(args + ["--steps", "6", "--resume"]) == 0  # a finished run extends from its end
    assert f"resumed from {out / 'checkpoints' / 'step_000003'} (step 3)" in capsys.readouterr().err
    assert steps_in_metrics(out) == [2, 3, 4, 6]


def test_metrics_hold_each_step_once_after_a_resume(tmp_path, capsys, monkeypatch):
    out = tmp_path / "f"
    args = test_training_scale.arith_command(out, "--eval_every", "3", "--save_every", "4", "--steps", "9")
    real = test_training_scale.interrupt_at(monkeypatch, 7)
    assert train_fuser.main(args) == 130
    assert "--resume continues from" in capsys.readouterr().err and steps_in_metrics(out) == [3, 6]
    monkeypatch.setattr(training.FuserTrainer, "train_step", real)
    assert train_fuser.main(args + ["--resume"]) == 0  # from step 4: step 6 is evaluated again
    assert steps_in_metrics(out) == [3, 6, 9]


def test_checkpoints_are_pruned_and_found_by_step_number(tmp_path):
    folder = tmp_path / "checkpoints"
    for step in (8, 10, 900, 1_000_000):
        (folder / f"step_{step:06d}").mkdir(parents=True)
        (folder / f"step_{step:06d}" / "trainer_state.pt").write_bytes(b"")
    assert training.latest_checkpoint(tmp_path).name == "step_1000000"
    training.prune_checkpoints(folder, 2)
    assert sorted(p.name for p in folder.iterdir()) == ["step_000900", "step_1000000"]


# ---------------------------------------------------------------- inference weights follow the fuser


def fuse_both_ways(fuser, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = len(fuser.layer_map)
    tk, tv = (torch.randn(n, 1, 2, 5, 16, generator=g, dtype=torch.float64).to(torch.float32) for _ in range(2))
    dk, dv = (torch.randn(n, 1, 1, 5, 32, generator=g, dtype=torch.float64).to(torch.float32) for _ in range(2))
    pack = fuser.batched()
    assert isinstance(pack, StackedProjectors)
    return pack.fuse_layers(tk, tv, dk, dv), fuser.fuse_layers(tk, tv, dk, dv)


@pytest.mark.parametrize("change", ["assign", "new_parameter", "to_double", "in_place"])
def test_the_stacked_weights_follow_the_fuser(target, draft, change):
    fuser = tiny.open_fuser(target, draft)
    before = fuse_both_ways(fuser)[0]
    other = tiny.open_fuser(target, draft, seed=7)
    if change == "assign":
        fuser.load_state_dict(other.state_dict(), assign=True)
        fuser.requires_grad_(False)
    elif change == "new_parameter":
        old = fuser.projectors[1].value_proj_out.weight
        fuser.projectors[1].value_proj_out.weight = nn.Parameter(old.detach() * 3 + 1, requires_grad=False)
    elif change == "to_double":
        fuser.to(torch.float64)
    else:
        fuser.load_state_dict(other.state_dict())  # copies into the stacks' views
    (bk, bv), (rk, rv) = fuse_both_ways(fuser)
    assert torch.allclose(bk, rk, atol=1e-5) and torch.allclose(bv, rv, atol=1e-5)
    if change != "to_double":
        assert not torch.allclose(before[1], bv, atol=1e-3)  # the weights did change


def test_a_decoder_fuses_with_the_weights_the_fuser_holds_now(target, draft):
    fuser, other = tiny.open_fuser(target, draft), tiny.open_fuser(target, draft, seed=7)
    prompt, spec, eos = [5, 9, 33, 7, 100, 2], SpecConfig(gamma=3, max_new_tokens=24), set()
    decoder = SpeculativeDecoder(target, draft, spec, SamplingConfig(), eos, fuser=fuser)
    decoder.generate(prompt)
    fuser.load_state_dict(other.state_dict(), assign=True)
    fuser.requires_grad_(False)
    again = decoder.generate(prompt)
    fresh = SpeculativeDecoder(target, draft, spec, SamplingConfig(), eos, fuser=other).generate(prompt)
    assert again.output_ids == fresh.output_ids
    assert (again.counters.total_accepted, again.counters.rounds) == (fresh.counters.total_accepted, fresh.counters.rounds)


def test_the_engine_skips_a_fuser_with_every_gate_closed(target, draft):
    fuser = tiny.open_fuser(target, draft)
    for p in fuser.projectors:
        p.key_gate_logit.data.fill_(-1.0)
        p.value_gate_logit.data.fill_(-1.0)
    prompt, spec = [5, 9, 33, 7, 100, 2], SpecConfig(gamma=3, max_new_tokens=24)
    closed = SpeculativeDecoder(target, draft, spec, SamplingConfig(), set(), fuser=fuser).generate(prompt)
    plain = SpeculativeDecoder(target, draft, spec, SamplingConfig(), set()).generate(prompt)
    assert closed.counters.fused_tokens == 0 and "fusion" not in closed.counters.times
    assert closed.output_ids == plain.output_ids == standard_generate(target, prompt, 24, SamplingConfig(), set()).output_ids


# ---------------------------------------------------------------- data files


@pytest.mark.parametrize("line, expected", [
    ('{"messages": [{"role": ["user"], "content": "hi"}]}', "'role' (a string"),
    ('{"messages": [{"role": {"a": 1}, "content": "hi"}]}', "'role' (a string"),
    ('{"text": ""}', "non-empty string"),
    ('{"prompt": 5}', "non-empty string"),
])
def test_a_malformed_record_is_one_error_naming_file_line_and_fix(tmp_path, line, expected):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(UserInputError, match="d.jsonl:2") as e:
        chat_data.read_records(path)
    assert expected in str(e.value)


def test_a_line_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(UserInputError, match=r"d.jsonl:2: not UTF-8 .*re-save the file as UTF-8"):
        chat_data.read_records(path)
    (tmp_path / "d.txt").write_bytes(b"caf\xe9")
    with pytest.raises(UserInputError, match="not UTF-8"):
        chat_data.read_records(tmp_path / "d.txt")


def test_a_json_array_of_conversations_is_read_as_conversations(tmp_path):
    convs = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": f"a{k}"}]} for k in range(3)]
    (tmp_path / "d.json").write_text(json.dumps(convs), encoding="utf-8")
    records = chat_data.read_records(tmp_path / "d.json")
    assert len(records) == 3 and all(r.is_chat and not r.needs_answer for r in records)
    (tmp_path / "bad.json").write_text("[1, 2", encoding="utf-8")
    with pytest.raises(UserInputError, match="bad.json:1: not JSON"):
        chat_data.read_records(tmp_path / "bad.json")


QWEN3_LIKE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' and loop.last %}<|im_start|>assistant\n<think>\n\n</think>\n\n"
    "{{ m['content'] }}<|im_end|>\n{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and enable_thinking is false %}"
    "<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


@pytest.mark.parametrize("thinking", [True, False])
def test_the_empty_thinking_block_is_not_supervised(thinking):
    tok = tiny.build_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<think>", "</think>"]})
    tok.chat_template = QWEN3_LIKE
    messages = ({"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 4."})
    eos = {tok.convert_tokens_to_ids("<|im_end|>")}
    [(ids, n0)] = chat_data.assistant_items(tok, messages, eos, enable_thinking=thinking)
    assert tok.decode(ids[n0:]) == "It is 4.<|im_end|>"  # the answer and its end token, no think block
    assert "</think>" in tok.decode(ids[:n0])


def test_a_conversation_ending_with_a_user_turn_keeps_its_earlier_answers(tmp_path, target):
    tok = tiny.build_tokenizer()
    path = tmp_path / "d.jsonl"
    conv = {"messages": [{"role": "user", "content": "the quick"}, {"role": "assistant", "content": "brown fox jumps"},
                         {"role": "user", "content": "over the"}]}
    path.write_text(json.dumps(conv) + "\n", encoding="utf-8")
    records = chat_data.read_records(path)
    cfg = training.TrainConfig("d", "t", str(path), "o", generate_from_target=5)
    (items,) = train_fuser.answer_groups(cfg, records, tok, target, set(tiny.eos_ids()), training.Processes(), lambda *a: None)
    assert len(items) == 2
    earlier, answered = items
    assert tok.decode(earlier[0][earlier[1]:]).startswith("brown fox jumps")
    assert len(answered[0]) > len(earlier[0])  # the target's answer to the last user turn


# ---------------------------------------------------------------- figures that predict the engine


def test_the_trainer_reports_the_engines_tokens_per_target_call(tmp_path, target, draft, windows):
    cfg = test_training.config(tmp_path, eval_prompts=3, eval_new_tokens=12)
    data = answers_data(windows)
    trainer = training.FuserTrainer(cfg, target, draft, data, data, torch.device("cpu"), eos_ids=set())
    trainer.train_step()
    figures = trainer.evaluate()
    fuser = trainer.fuser
    tokens = calls = plain_tokens = plain_calls = 0
    for prompt in data.prompts(3):
        spec = SpecConfig(gamma=cfg.gamma, max_new_tokens=12)
        fused = SpeculativeDecoder(target, draft, spec, SamplingConfig(), set(), fuser=fuser).generate(prompt)
        plain = SpeculativeDecoder(target, draft, spec, SamplingConfig(), set()).generate(prompt)
        assert fused.output_ids == plain.output_ids  # lossless, both
        tokens, calls = tokens + len(fused.output_ids), calls + fused.counters.target_calls
        plain_tokens, plain_calls = plain_tokens + len(plain.output_ids), plain_calls + plain.counters.target_calls
    assert figures["tokens_per_call_fused"] == tokens / calls
    assert figures["tokens_per_call_unfused"] == plain_tokens / plain_calls and figures["engine_prompts"] == 3
    line = trainer.metrics_line(figures)
    assert line["tokens_per_call_fused"] == tokens / calls and line["heldout_sequences"] == figures["heldout_sequences"] >= 2


def test_the_summary_says_when_fusion_lowers_tokens_per_call_or_no_gate_opens():
    cfg = training.TrainConfig("d", "t", "x", "o")
    last = {"agreement_fused": 0.68, "agreement_unfused": 0.66, "heldout_tokens": 2048, "heldout_sequences": 40,
            "won": 129, "lost": 87, "open_gates": 0, "gates": 56, "tokens_per_call_fused": 2.02,
            "tokens_per_call_unfused": 2.21, "engine_prompts": 16, "engine_wins": 2, "engine_losses": 13,
            "engine_ratio": 0.914, "engine_ratio_low": 0.87, "engine_ratio_high": 0.96}
    lines, warnings = train_fuser.summary(cfg, "out/final", last)
    assert "2.020 tokens per target call fused vs 2.210 unfused" in lines[1]
    assert any("fusion lowers the engine's tokens per target call" in w for w in warnings)
    assert any("no gate is open" in w and "--initial_gate_logit" in w for w in warnings)
    good = last | {"tokens_per_call_fused": 2.5, "open_gates": 3, "engine_ratio_low": 1.05, "engine_ratio_high": 1.2}
    assert train_fuser.summary(cfg, "out/final", good)[1] == []


def test_a_warmup_longer_than_the_run_is_a_warning(tmp_path, target, draft, windows):
    trainer = test_training.new_trainer(test_training.config(tmp_path, steps=30, warmup_steps=50), target, draft, windows)
    [warning] = trainer.warnings()
    assert "--warmup_steps 50" in warning and "--steps 30" in warning
    assert test_training.new_trainer(test_training.config(tmp_path, steps=30, warmup_steps=3), target, draft, windows).warnings() == []


# ---------------------------------------------------------------- real chat data, end to end


def chat_conversations(count: int, seed: int = 0) -> list[dict]:
    """Conversations of varied lengths from the tiny corpus's words (one or two exchanges each)."""
    rng = random.Random(seed)
    words = " ".join(tiny.CORPUS[:4]).split()
    say = lambda lo, hi: " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi)))  # noqa: E731
    out = []
    for _ in range(count):
        turns = [{"role": "user", "content": say(2, 8)}, {"role": "assistant", "content": say(3, 30)}]
        if rng.random() < 0.3:
            turns += [{"role": "user", "content": say(2, 6)}, {"role": "assistant", "content": say(3, 20)}]
        out.append({"messages": turns})
    return out


def test_chat_conversations_of_varied_lengths_train_end_to_end(saved_models, tmp_path, capsys):
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in chat_conversations(200)), encoding="utf-8")
    out = tmp_path / "fuser"
    rc = train_fuser.main(["--base_model", str(saved_models / "draft"), "--teacher_model", str(saved_models / "target"),
                           "--data", str(data), "--output_dir", str(out), "--batch_size", "8", "--steps", "6",
                           "--eval_every", "3", "--eval_tokens", "256", "--eval_prompts", "4", "--eval_new_tokens", "16",
                           "--hidden_dim", "16", "--intermediate_dim", "16", "--warmup_steps", "2", "--device", "cpu",
                           "--threads", "1", "--no_progress"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-2000:]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [3, 6]
    for line in lines:
        assert line["distinct_rows_min"] == 8 == line["batch_rows"]  # every batch: 8 different conversations
        assert 0 < line["padding_share"] < 1 and line["heldout_sequences"] >= 5 and line["engine_prompts"] == 4
        assert line["tokens_per_call_fused"] >= 1 and line["tokens_per_call_unfused"] >= 1
    assert "engine on 4 held-out prompts (greedy, gamma 4;" in captured.out and "too few held-out prompts" in captured.out
    assert "supervised positions" in captured.err


def test_a_fresh_run_refuses_an_earlier_runs_checkpoints(tmp_path, capsys):
    out = tmp_path / "f"
    (out / "checkpoints" / "step_000006").mkdir(parents=True)
    (out / "checkpoints" / "step_000006" / "trainer_state.pt").write_bytes(b"")
    (out / run_folder.MARKER).write_text("{}")
    rc = train_fuser.main(test_training_scale.arith_command(out))
    err = capsys.readouterr().err
    assert rc == 2 and "earlier run's checkpoints (newest step_000006)" in err and "--resume" in err and "--overwrite" in err


def test_overwrite_removes_the_earlier_fuser_before_training(tmp_path):
    out = tmp_path / "f"
    for name in ("final", "draft_adapter", "checkpoints/step_000002"):
        (out / name).mkdir(parents=True)
    (out / "final" / "projector_0.json").write_text("{}")
    (out / "config.json").write_text("{}")
    removed = run_folder.clear_run(out)
    assert not (out / "final").exists() and not (out / "config.json").exists() and not (out / "draft_adapter").exists()
    assert "final/" in removed and "config.json" in removed and "checkpoints/step_000002" in removed


def test_a_half_written_metrics_line_is_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 3}\n{"step": 6}\n{"st', encoding="utf-8")
    training.keep_metrics(path, 6)
    assert path.read_text() == '{"step": 3}\n{"step": 6}\n'
    training.keep_metrics(path, 0)  # a run from step 0 starts its own
    assert path.read_text() == ""


def test_resume_with_steps_not_past_the_checkpoint_is_an_error(tmp_path, capsys):
    out = tmp_path / "f"
    assert train_fuser.main(test_training_scale.arith_command(out, "--steps", "4", "--save_every", "2")) == 0
    capsys.readouterr()
    assert train_fuser.main(test_training_scale.arith_command(out, "--steps", "4", "--resume")) == 2
    assert "--steps 4 is not past the checkpoint's step 4" in capsys.readouterr().err


def test_upper_case_suffixes_and_a_byte_order_mark_are_read(tmp_path):
    conv = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
    (tmp_path / "UP.JSONL").write_bytes(b"\xef\xbb\xbf" + conv.encode() + b"\n" + conv.encode() + b"\n")
    assert [r.is_chat for r in chat_data.read_records(tmp_path / "UP.JSONL")] == [True, True]
    (tmp_path / "UP.JSON").write_bytes(b"\xef\xbb\xbf[" + conv.encode() + b"]")
    assert [r.is_chat for r in chat_data.read_records(tmp_path / "UP.JSON")] == [True]
