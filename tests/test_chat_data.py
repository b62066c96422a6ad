"""Chat training data: OpenAI and ShareGPT records, the loss on assistant tokens only, prompts answered
by the target in padded batches."""

import json

import pytest
import torch

from c2c.tools import chat_data, train_data, train_fuser
from c2c.core.engine import standard_generate
from c2c.errors import UserInputError
from c2c.core.sampling import SamplingConfig
from tests import tiny

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
                {"role": "assistant", "content": "It is 4."}, {"role": "user", "content": "And 3+3?"},
                {"role": "assistant", "content": "It is 6."}]


def test_openai_and_sharegpt_records_read_the_same(tmp_path):
    path = tmp_path / "chat.jsonl"
    sharegpt = [{"from": {"system": "system", "user": "human", "assistant": "gpt"}[t["role"]], "value": t["content"]}
                for t in CONVERSATION]
    path.write_text("\n".join([json.dumps({"messages": CONVERSATION}), json.dumps({"conversations": sharegpt}),
                               json.dumps({"prompt": "hi"}), json.dumps({"messages": CONVERSATION[:2]})]) + "\n")
    records = chat_data.read_records(path)
    assert records[0] == records[1] and records[0].is_chat and not records[0].needs_answer
    assert records[2].text == "hi" and not records[2].is_chat
    assert records[3].needs_answer


@pytest.mark.parametrize("line, words", [('{"messages": []}', "non-empty"), ('{"messages": [{"role": "cat", "content": "x"}]}', "role"),
                                         ('{"conversations": [{"from": "gpt"}]}', "value"), ('{"other": 1}', "messages")])
def test_bad_records_name_the_line_and_the_fix(tmp_path, line, words):
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(UserInputError, match=words) as e:
        chat_data.read_records(path)
    assert "bad.jsonl:1" in str(e.value)


def test_each_assistant_turn_is_one_item_supervised_on_its_own_tokens():
    tok = tiny.build_tokenizer()
    eos = set(tiny.eos_ids())
    items = chat_data.assistant_items(tok, CONVERSATION, eos)
    assert len(items) == 2
    for (ids, n0), answer in zip(items, ("It is 4.", "It is 6.")):
        assert tok.decode(ids[n0:]) == answer + "<|im_end|>"  # the content and its end token, nothing else
        assert ids[-1] in eos
    first, second = items
    assert second[0][: len(first[0])] == first[0]  # the second turn's prefix holds the first answer


def test_padded_greedy_batch_equals_the_reference_loop_per_prompt(target):
    prompts = [[5, 9, 33], [100, 2], [11, 12, 13, 14, 15, 16, 17], [7], [8, 8, 8, 8]]  # all lengths differ
    eos = {42, 57}
    with torch.inference_mode():
        want = [standard_generate(target, p, 10, SamplingConfig(), eos).output_ids for p in prompts]
    assert train_data.greedy_batch(target, prompts, 10, eos, batch_size=3) == want
    assert train_data.greedy_batch(target, prompts, 10, eos, batch_size=5) == want


def test_trainer_reads_chat_data_and_answers_prompts(saved_models, tmp_path, capsys):
    lines = [json.dumps({"messages": CONVERSATION})] * 6 + [json.dumps({"messages": CONVERSATION[:2]})] * 2
    lines += [json.dumps({"conversations": [{"from": "human", "value": "Tell me"}, {"from": "gpt", "value": "No."}]})] * 4
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(lines) + "\n")
    common = ["--base_model", str(saved_models / "draft"), "--teacher_model", str(saved_models / "target"),
              "--data", str(data), "--steps", "3", "--batch_size", "2", "--gamma", "2", "--hidden_dim", "16",
              "--intermediate_dim", "16", "--eval_every", "3", "--eval_tokens", "8", "--device", "cpu",
              "--threads", "1", "--no_progress", "--heldout_fraction", "0.2"]
    rc = train_fuser.main([*common, "--output_dir", str(tmp_path / "f")])
    err = capsys.readouterr().err
    assert rc == 2 and "have no answer" in err and "--generate_from_target" in err
    rc = train_fuser.main([*common, "--output_dir", str(tmp_path / "f"), "--generate_from_target", "5"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "target answering 2 prompts" in err and "answers (the loss on assistant tokens only)" in err
    config = json.loads((tmp_path / "f" / "config.json").read_text())
    # 6 x 2 turns + 2 answered prompts + 4 turns = 18 items of 12 conversations; 2 conversations (one turn each) held out whole
    assert config["sequences"] == {"train": 16, "heldout": 2}
