"""Spec-Bench-style prompt files: JSONL with turns, category and question_id; the shipped set covers
Spec-Bench's six task families; bad lines are one error line; the benchmark times every turn of a
two-turn question (the later one after the target's own answer) with a per-category table and plot."""

import json
from pathlib import Path

import pytest

import speculative_benchmark as bench
from c2c.app.prompts import Question, conversation, read_questions
from c2c.errors import UserInputError

ROOT = Path(__file__).resolve().parent.parent


def test_the_shipped_set_covers_spec_benchs_six_families_and_multi_turn():
    questions = read_questions(ROOT / "prompts" / "spec_bench_mini.jsonl")
    families = {q.category for q in questions}
    assert families == {"mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag"}
    assert all(sum(q.category == f for q in questions) >= 3 for f in families)
    assert all(len(q.turns) == 2 for q in questions if q.category == "mt_bench")
    assert len({q.question_id for q in questions}) == len(questions)


def test_plain_files_are_one_turn_questions_and_mt_bench_lines_parse(tmp_path):
    plain = tmp_path / "p.txt"
    plain.write_text("# c\nFirst\n\nSecond\n", encoding="utf-8")
    assert read_questions(plain) == [Question(("First",), None, 1), Question(("Second",), None, 2)]
    mt = tmp_path / "question"  # no .jsonl suffix: told by its first line
    mt.write_text('{"question_id": 81, "category": "writing", "turns": ["a", "b"], "reference": ["x"]}\n\n', encoding="utf-8")
    assert read_questions(mt) == [Question(("a", "b"), "writing", 81)]
    assert conversation(["a", "b"], ["A"]) == [{"role": "user", "content": "a"}, {"role": "assistant", "content": "A"},
                                               {"role": "user", "content": "b"}]


@pytest.mark.parametrize("line,message", [
    ("not json", "line 2 is not JSON"),
    ('{"question_id": 3}', 'line 2: "turns" must be a non-empty list'),
    ('{"turns": []}', 'line 2: "turns" must be a non-empty list'),
    ('{"turns": ["ok", ""]}', 'line 2: "turns" must be a non-empty list'),
])
def test_a_bad_jsonl_line_is_one_error_naming_it(tmp_path, line, message):
    path = tmp_path / "q.jsonl"
    path.write_text('{"turns": ["fine"]}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(UserInputError, match=message):
        read_questions(path)


def test_the_benchmark_times_both_turns_with_a_per_category_table_and_plot(saved_arch_pairs, tmp_path, capsys):
    target, draft = saved_arch_pairs["GPT-2"]
    questions = tmp_path / "q.jsonl"
    questions.write_text("\n".join(json.dumps(q) for q in [
        {"question_id": 1, "category": "writing", "turns": ["The quick brown fox", "What is 1 + 1?"]},
        {"question_id": 2, "category": "math", "turns": ["What is the sum of all integers from 1 to 100?"]}]) + "\n")
    out = tmp_path / "bench"
    code = bench.main(["--base_model", str(draft), "--teacher_model", str(target), "--fuser_checkpoint", "none",
                       "--prompts", str(questions), "--modes", "target", "speculative", "--gammas", "2", "--repeats", "1",
                       "--warmup", "0", "--max_new_tokens", "12", "--device", "cpu", "--threads", "1", "--output_dir", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| mode | gamma | writing | math | overall |" in printed
    results = json.loads(next(out.glob("benchmark_*.json")).read_text())
    assert results["config"]["num_prompts"] == 3 and results["config"]["num_questions"] == 2  # every turn timed
    spec = next(r for r in results["rows"] if r["mode"] == "speculative")
    assert spec["outputs_match_target"] is True and len(spec["output_ids"]) == 3  # both turns the target's own
    assert spec["by_category"]["writing"]["prompts"] == 2 and spec["by_category"]["math"]["prompts"] == 1
    assert spec["by_category"]["writing"]["speedup_vs_target"] > 0
    assert any(p.endswith("speedup_by_category.png") for p in results["plots"])
