"""GSM8K grading against OpenAI's labels, gold extraction on the real test split, pass@k, prompts, the loop."""
import itertools
import json

import pytest

from evals.gsm8k import (GSM8KError, build_prompt, evaluate_gsm8k, extract_answer, gold_answer, is_correct,
                         load_gsm8k, normalize_number, pass_at_k)


@pytest.mark.parametrize("text, expected", [
    ("1,000", "1000"), ("$1,000", "1000"), ("1000.", "1000"), ("18.0", "18"), ("18.50", "37/2"),
    ("-5", "-5"), ("3/4", "3/4"), ("0.75", "3/4"), (".5", "1/2"), ("$ 20", "20"), ("abc", None), ("1/0", None),
])
def test_normalize_number(text, expected):
    assert normalize_number(text) == expected


@pytest.mark.parametrize("completion, strict, flexible", [
    ("She makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18", "18", "18"),
    ("So she earns $1,234.50 in total. The answer is $1,234.50.", "2469/2", "2469/2"),
    ("He loses 7 dollars.\nThe answer is -7.", "-7", "-7"),
    ("Half of it: 1/2 of 3/2 is 3/4. The answer is: 3/4", "3/4", "3/4"),
    ("9 eggs at $2 each\nA: 18", "18", "18"),
    ("There are 3 cats and 4 dogs, so 7 pets.", None, "7"),
    ("No number here.", None, None),
    # Calculator notes are not answers; a few-shot model running on into the next question is cut there.
    ("16 - 3 = <<16-3=13>>13 eggs left", None, "13"),
    ("So 5 apples. The answer is 5.\n\nQuestion: Tom has 8 pens. The answer is 8.", "5", "5"),
])
def test_extract_answer(completion, strict, flexible):
    assert extract_answer(completion, flexible=False) == strict
    assert extract_answer(completion, flexible=True) == flexible


def test_is_correct_with_gold_forms():
    assert is_correct("The answer is 70,000.", "Profit is 70000.\n#### 70000")
    assert is_correct("The answer is 18.00", 18)
    assert is_correct("The answer is 0.5", "1/2")
    assert not is_correct("The answer is 17", "#### 18")
    assert not is_correct("I cannot tell.", "#### 18")
    with pytest.raises(GSM8KError, match="no gold answer"):
        gold_answer("no answer marker")


def test_pass_at_k_matches_brute_force_over_subsets():
    for n in range(1, 8):
        for c in range(n + 1):
            samples = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(samples, k))
                expected = sum(any(s) for s in subsets) / len(subsets)
                assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12), (n, c, k)
    assert pass_at_k(200, 1, 1) == pytest.approx(1 / 200)
    assert 0 < pass_at_k(1000, 3, 10) < 1  # the product form stays finite where C(n, k) overflows floats
    with pytest.raises(ValueError, match="n=3, c=4"):
        pass_at_k(3, 4, 1)


def test_grader_agrees_with_openai_labels(fixtures_dir):
    rows = [json.loads(line) for line in (fixtures_dir / "gsm8k" / "example_model_solutions.jsonl").open()]
    labelled = [(solution["solution"], row["ground_truth"], solution["is_correct"])
                for row in rows for solution in row.values() if isinstance(solution, dict)]
    assert len(labelled) == 5276
    agree = sum(is_correct(text, gold) == label for text, gold, label in labelled)
    assert agree / len(labelled) >= 0.995  # measured: 5276 / 5276


def test_every_test_item_has_a_gold_answer(fixtures_dir):
    items = load_gsm8k(str(fixtures_dir / "gsm8k" / "test.jsonl"))
    assert len(items) == 1319
    golds = [gold_answer(item["answer"]) for item in items]
    assert golds[0] == "18" and all(g is not None for g in golds)


def test_load_errors_name_the_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "q", "answer": "#### 1"}\n{"question": "q"}\n')
    with pytest.raises(GSM8KError, match=r"bad.jsonl line 2: expected an object with 'question' and 'answer'"):
        load_gsm8k(str(path))
    assert load_gsm8k(str(path), limit=1) == [{"question": "q", "answer": "#### 1"}]
    with pytest.raises(GSM8KError, match="does not exist"):
        load_gsm8k(str(tmp_path / "missing.jsonl"))


def test_prompts_zero_and_few_shot():
    shot = {"question": "Ann has 2 apples and buys 3. How many?", "answer": "2 + 3 = <<2+3=5>>5\n#### 5"}
    zero = build_prompt("What is 6 * 7?")
    assert zero.endswith("Question: What is 6 * 7?\nAnswer:") and "The answer is N" in zero
    few = build_prompt("What is 6 * 7?", shots=[shot])
    assert "Answer: 2 + 3 = 5\nThe answer is 5.\n\nQuestion: What is 6 * 7?\nAnswer:" in few
    assert "<<" not in few and "####" not in few


def test_evaluate_gsm8k_greedy_and_pass_at_k():
    items = [{"question": f"What is {a} + {a}?", "answer": f"#### {2 * a}"} for a in (1, 2, 3)]
    calls = []

    def generate(prompts, greedy):
        calls.append((len(prompts), greedy))
        outputs = []
        for i, prompt in enumerate(prompts):
            a = int(prompt.split("What is ")[-1].split(" +")[0])
            if greedy:  # right on 1 and 2, wrong on 3
                outputs.append(f"The answer is {2 * a if a < 3 else 0}.")
            else:  # of 4 samples per problem: problem a gets (a - 1) right
                outputs.append(f"The answer is {2 * a if i % 4 < a - 1 else -1}.")
        return outputs

    result = evaluate_gsm8k(generate, items, n_samples=4, k_values=(1, 2))
    assert calls == [(3, True), (12, False)]
    assert result["greedy_accuracy"] == pytest.approx(2 / 3)
    assert [r["samples_correct"] for r in result["items"]] == [0, 1, 2]
    assert result["pass_at_k"][1] == pytest.approx((0 + 1 / 4 + 2 / 4) / 3)
    assert result["pass_at_k"][2] == pytest.approx((0 + pass_at_k(4, 1, 2) + pass_at_k(4, 2, 2)) / 3)
    with pytest.raises(GSM8KError, match=r"k_values \[10\] exceed n_samples=4"):
        evaluate_gsm8k(generate, items, n_samples=4, k_values=(1, 10))
