"""MT-Bench: the real question and judge-prompt files, prompt filling, judge parsing, and a scripted full flow."""
import json

import pytest

from evals.mtbench import (Answer, MTBenchError, Question, category_table, evaluate_mtbench, format_table,
                           generate_answers,
                           judge_pairwise, judge_single, load_judge_prompts, load_questions, pairwise_messages,
                           parse_rating, parse_verdict, read_answers, single_messages, write_answers)

CATEGORIES = ["coding", "extraction", "humanities", "math", "reasoning", "roleplay", "stem", "writing"]


@pytest.fixture
def real(fixtures_dir):
    folder = fixtures_dir / "mt-bench"
    return load_questions(str(folder / "question.jsonl")), load_judge_prompts(str(folder / "judge_prompts.jsonl"))


def test_real_files_parse(real):
    questions, prompts = real
    assert len(questions) == 80 and sorted({q.category for q in questions}) == CATEGORIES
    assert all(len(q.turns) == 2 for q in questions)
    assert sum(bool(q.reference) for q in questions if q.category == "math") == 10
    assert set(prompts) == {"pair-v2", "pair-v2-multi-turn", "pair-math-v1", "pair-math-v1-multi-turn",
                            "single-v1", "single-math-v1", "single-v1-multi-turn", "single-math-v1-multi-turn"}
    assert prompts["pair-math-v1"].fields == {"question", "ref_answer_1", "answer_a", "answer_b"}


def test_every_placeholder_is_filled_for_every_question_and_turn(real):
    questions, prompts = real
    a = Answer(0, "a", ["A-one {x}", "A-two"])  # braces in answers must survive formatting
    b = Answer(0, "b", ["B-one", "B-two"])
    placeholders = {"{" + name for prompt in prompts.values() for name in prompt.fields}
    for q in questions:
        for turn in (1, 2):
            for messages in (single_messages(prompts, q, a, turn), pairwise_messages(prompts, q, a, b, turn)):
                text = messages[1]["content"]
                assert not any(p in text for p in placeholders) and q.turns[turn - 1] in text
                assert "A-one {x}" in text and (turn == 1 or "A-two" in text)
            if q.category in ("math", "reasoning", "coding") and q.reference:
                assert q.reference[0] in single_messages(prompts, q, a, turn)[1]["content"]
    coding_without_reference = [q for q in questions if q.category == "coding" and not q.reference]
    assert len(coding_without_reference) == 1  # judged with the general prompt
    assert "Reference" not in single_messages(prompts, coding_without_reference[0], a, 1)[1]["content"]


def test_principles_reach_the_pairwise_judge(real):
    questions, prompts = real
    a, b = Answer(81, "a", ["x", "y"]), Answer(81, "b", ["z", "w"])
    system = pairwise_messages(prompts, questions[0], a, b, 1, principles="1. Be concise.\n2. Be honest.")[0]
    assert system["content"].startswith(prompts["pair-v2"].system_prompt)
    assert system["content"].endswith("1. Be concise.\n2. Be honest.")


@pytest.mark.parametrize("judgment, rating", [
    ("The response is accurate and well organised, but misses one attraction.\n\nRating: [[8]]", 8.0),
    ("The assistant's answer is incorrect: the reference gives 40. Rating: [[2.5]]", 2.5),
    ("Decent answer. Rating: [7]", 7.0),
    ("I would rate this response highly.", None),
    ("Rating: [[11]]", None),
])
def test_parse_rating(judgment, rating):
    assert parse_rating(judgment) == rating


@pytest.mark.parametrize("judgment, verdict", [
    ("Assistant A follows the instructions more closely and is more accurate.\n\n[[A]]", 1.0),
    ("Both contain errors, but B's is minor. Final verdict: [[B]]", 0.0),
    ("Both responses are equally helpful. [[C]]", 0.5),
    ('Following the format "[[A]]" if A is better... After comparison, my verdict is [[B]]', 0.0),
    ("Assistant A is better.", None),
])
def test_parse_verdict(judgment, verdict):
    assert parse_verdict(judgment) == verdict


def test_answer_files_round_trip_in_fastchat_format(tmp_path):
    path = tmp_path / "model_answer" / "sami.jsonl"
    write_answers(str(path), [Answer(82, "sami", ["b1", "b2"]), Answer(81, "sami", ["a1", "a2"])])
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["question_id"] for r in rows] == [81, 82]
    assert set(rows[0]) == {"question_id", "answer_id", "model_id", "choices", "tstamp"}
    assert rows[0]["choices"] == [{"index": 0, "turns": ["a1", "a2"]}]
    assert read_answers(str(path))[82].turns == ["b1", "b2"]
    (tmp_path / "bad.jsonl").write_text('{"question_id": 1}\n')
    with pytest.raises(MTBenchError, match="bad.jsonl line 1: not a FastChat answer record"):
        read_answers(str(tmp_path / "bad.jsonl"))
    with pytest.raises(MTBenchError, match="question file .*missing.jsonl does not exist"):
        load_questions(str(tmp_path / "missing.jsonl"))


def test_turn_two_sees_turn_one_answer():
    questions = [Question(1, "writing", ("Write a poem.", "Now shorten it.")),
                 Question(2, "math", ("What is 2+2?",))]
    batches = []

    def generate(prompts):
        batches.append(prompts)
        return [f" reply{len(batches)}-{i} " for i in range(len(prompts))]

    answers = generate_answers(generate, questions, "m", system="1. Be kind.")
    assert [len(b) for b in batches] == [2, 1]  # one batch per turn; one-turn questions stop early
    assert batches[1][0] == ("### System:\n1. Be kind.\n\n### User:\nWrite a poem.\n\n### Assistant:\nreply1-0"
                             "\n\n### User:\nNow shorten it.\n\n### Assistant:\n")
    assert answers[0].turns == ["reply1-0", "reply2-0"] and answers[1].turns == ["reply1-1"]


class ScriptedJudge:
    """A chat client standing in for GPT-4: rates by a marker in the judged answer, prefers "GOOD" answers."""

    def __init__(self):
        self.calls = 0

    def complete(self, messages):
        self.calls += 1
        text = messages[1]["content"]
        if "[[rating]]" in messages[0]["content"] + text:  # single grading (multi-turn puts it in the system)
            return "Explanation of the grade. Rating: [[9]]" if "GOOD" in text else "Weak. Rating: [[3]]"
        a = text.split("Assistant A's Answer]\n")[1].split("\n[The End")[0]
        b = text.split("Assistant B's Answer]\n")[1].split("\n[The End")[0]
        if ("GOOD" in a) == ("GOOD" in b):
            return "Both are similar. [[C]]"
        return "A is better. [[A]]" if "GOOD" in a else "B is better. [[B]]"


def test_full_flow_with_scripted_generator_and_judge(real, tmp_path):
    questions, prompts = real
    # The test model writes GOOD answers on math and writing only; the baseline never does.
    good = {"math", "writing"}
    by_prompt = {q.turns[0]: q for q in questions}

    def test_model(prompts_):
        return [("GOOD " if by_prompt[p.split("### User:\n")[1].split("\n\n###")[0]].category in good else "meh ")
                + "answer" for p in prompts_]

    test = generate_answers(test_model, questions, "sami")
    baseline = generate_answers(lambda ps: ["plain answer"] * len(ps), questions, "base")
    write_answers(str(tmp_path / "sami.jsonl"), test)
    test_answers = read_answers(str(tmp_path / "sami.jsonl"))
    baseline_answers = {a.question_id: a for a in baseline}

    judge = ScriptedJudge()
    single = judge_single(judge, prompts, questions, test_answers, turns=(1,))
    table = category_table(single)
    assert table["math"] == {"n": 10, "unparsed": 0, "mean": 9.0}
    assert table["coding"]["mean"] == 3.0
    assert table["overall"]["mean"] == pytest.approx((2 * 9 + 6 * 3) / 8)
    assert list(table)[-1] == "overall" and "math" in format_table(table)

    pairwise = judge_pairwise(judge, prompts, questions, test_answers, baseline_answers,
                              principles="1. Be helpful.")
    win = category_table(pairwise)
    assert win["writing"]["mean"] == 1.0 and win["stem"]["mean"] == 0.5
    assert win["overall"]["mean"] == pytest.approx((2 * 1.0 + 6 * 0.5) / 8)
    assert judge.calls == 80 + 2 * 80  # single, then both orders per pair


def test_position_biased_judge_is_neutralised_by_swap(real):
    questions, prompts = real

    class AlwaysA:
        def complete(self, messages):
            return "[[A]]"

    answers = {q.question_id: Answer(q.question_id, "m", ["x", "y"]) for q in questions}
    assert {r["score"] for r in judge_pairwise(AlwaysA(), prompts, questions, answers, answers)} == {0.5}
    assert {r["score"] for r in judge_pairwise(AlwaysA(), prompts, questions, answers, answers, swap=False)} == {1.0}


def test_evaluate_mtbench_end_to_end(real, tmp_path):
    questions, prompts = real
    baseline = {q.question_id: Answer(q.question_id, "base", ["plain", "plain"]) for q in questions}
    result = evaluate_mtbench(lambda ps: ["GOOD answer"] * len(ps), ScriptedJudge(), questions, prompts, "sami",
                              str(tmp_path), baseline=baseline, principles="1. Be helpful.")
    assert len(read_answers(str(tmp_path / "sami.jsonl"))) == 80
    assert result["single"]["turn_1"]["overall"] == {"n": 80, "unparsed": 0, "mean": 9.0}
    assert result["single"]["turn_2"]["overall"]["n"] == 80
    assert result["pairwise"]["overall"]["mean"] == 1.0
