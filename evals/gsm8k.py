"""GSM8K: answer extraction and grading, unbiased pass@k, the test split, prompts, and the evaluation loop.

Grading compares numbers, not strings: "1,000", "$1000", "1000.", "1000.00" and "1000" are the same answer,
"0.5" equals "1/2". A completion's answer is found strictly ("#### N", "The answer is N", a final "A: N"
line, the formats of the data set, of chain-of-thought prompts and of OpenAI's example solutions) or, in
flexible mode, as the last number when no strict pattern matches. Calculator annotations "<<3*4=12>>" are
removed first, and a few-shot model that runs on into the next "Question:" is cut there.

The multi-task SAMI paper reports greedy (zero-shot) accuracy and success within 10 attempts; `pass_at_k` is
the unbiased estimator of Chen et al. (2021): 1 - C(n-c, k) / C(n, k) for c correct of n samples.
"""
from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from pathlib import Path
from typing import Callable

import numpy as np

from sami.jsonl import read_jsonl

HUB_NAME = "openai/gsm8k"
INSTRUCTION = "Solve the math problem step by step. End with \"The answer is N.\" where N is a number."

_NUMBER = r"-?\$?\s?\d[\d,]*(?:\.\d+)?(?:\s?/\s?\d+)?|-?\$?\.\d+"
_STRICT = [
    re.compile(r"####\s*(" + _NUMBER + ")"),
    re.compile(r"answer is[:\s]*\**\s*(" + _NUMBER + ")", re.IGNORECASE),
    re.compile(r"(?:^|\n)\s*A:\s*(" + _NUMBER + r")[\s.]*$"),
]
_ANY_NUMBER = re.compile(_NUMBER)
_CALCULATOR = re.compile(r"<<[^>]*>>")
_RUN_ON = re.compile(r"\n\s*(?:Question|Q):", re.IGNORECASE)


class GSM8KError(ValueError):
    pass


def normalize_number(text: str) -> str | None:
    """A canonical form of a number: "-1,234.50" -> "-2469/2"; "$18" -> "18"; None if not a number."""
    cleaned = text.strip().rstrip(".").replace(",", "").replace("$", "").replace(" ", "")
    try:
        if "/" in cleaned:
            numerator, denominator = cleaned.split("/")
            value = Fraction(Decimal(numerator)) / Fraction(Decimal(denominator))
        else:
            value = Fraction(Decimal(cleaned))
    except (InvalidOperation, ValueError, ZeroDivisionError):
        return None
    return str(value)


def extract_answer(text: str, flexible: bool = True) -> str | None:
    """The normalised final answer of a completion (or of a gold solution), or None."""
    text = _CALCULATOR.sub("", _RUN_ON.split(text, maxsplit=1)[0])
    for pattern in _STRICT:
        matches = pattern.findall(text)
        if matches:
            return normalize_number(matches[-1])
    if flexible:
        numbers = _ANY_NUMBER.findall(text)
        if numbers:
            return normalize_number(numbers[-1])
    return None


def gold_answer(gold: str | int | float) -> str:
    """The normalised gold answer from a test-split answer ("... #### 18") or from the number itself."""
    answer = normalize_number(str(gold)) if isinstance(gold, (int, float)) else extract_answer(gold, flexible=False)
    if answer is None and isinstance(gold, str):
        answer = normalize_number(gold)
    if answer is None:
        raise GSM8KError(f"no gold answer in {str(gold)[-80:]!r}; expected text ending in '#### N' or a number")
    return answer


def is_correct(completion: str, gold: str | int | float, flexible: bool = True) -> bool:
    return extract_answer(completion, flexible) == gold_answer(gold)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k)/C(n, k), as a stable product."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def load_gsm8k(source: str = HUB_NAME, split: str = "test", limit: int | None = None) -> list[dict]:
    """Items {"question", "answer"} from a local JSONL file, or from the hub (config "main") by name."""
    path = Path(source)
    if path.suffix == ".jsonl" or path.exists():
        if not path.is_file():
            raise GSM8KError(f"GSM8K file {source} does not exist")
        items = []
        for number, row in enumerate(read_jsonl(path), start=1):
            if not isinstance(row, dict) or "question" not in row or "answer" not in row:
                raise GSM8KError(f"{source} line {number}: expected an object with 'question' and 'answer'")
            items.append({"question": row["question"], "answer": row["answer"]})
            if limit is not None and len(items) >= limit:
                break
        return items
    from datasets import load_dataset

    dataset = load_dataset(source, "main", split=split)
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    return [{"question": row["question"], "answer": row["answer"]} for row in dataset]


def _worked_solution(answer: str) -> str:
    """A data-set solution as a chain-of-thought demonstration: no calculator notes, "The answer is N."."""
    reasoning, _, final = _CALCULATOR.sub("", answer).rpartition("####")
    return f"{reasoning.strip()}\nThe answer is {final.strip()}."


def build_prompt(question: str, shots: list[dict] = (), instruction: str = INSTRUCTION) -> str:
    """Zero-shot (no shots) or few-shot prompt; shots are items with data-set answers ("... #### N")."""
    blocks = [instruction] if instruction else []
    blocks += [f"Question: {s['question']}\nAnswer: {_worked_solution(s['answer'])}" for s in shots]
    blocks.append(f"Question: {question}\nAnswer:")
    return "\n\n".join(blocks)


def evaluate_gsm8k(generate_fn: Callable[[list[str], bool], list[str]], items: list[dict], n_samples: int = 0,
                   k_values: tuple[int, ...] = (1, 10), shots: list[dict] = (), flexible: bool = True) -> dict:
    """Greedy accuracy and pass@k over n_samples sampled completions per problem.

    generate_fn(prompts, greedy) returns one completion per prompt; sampled prompts are sent as one batch
    with each prompt repeated n_samples times. Returns {"n", "greedy_accuracy", "n_samples", "pass_at_k"
    ({k: value}, k <= n_samples only), "items" (per problem: gold, greedy answer and correctness, samples
    correct, distinct samples)}.
    """
    if not items:
        raise GSM8KError("no GSM8K items to evaluate")
    too_large = [k for k in k_values if k > n_samples]
    if n_samples and too_large:
        raise GSM8KError(f"k_values {too_large} exceed n_samples={n_samples}")
    prompts = [build_prompt(item["question"], shots) for item in items]
    golds = [gold_answer(item["answer"]) for item in items]
    greedy = generate_fn(prompts, True)
    records = [{"gold": gold, "greedy_answer": extract_answer(text, flexible),
                "greedy_correct": extract_answer(text, flexible) == gold} for gold, text in zip(golds, greedy)]
    result = {"n": len(items), "greedy_accuracy": float(np.mean([r["greedy_correct"] for r in records])),
              "n_samples": n_samples, "pass_at_k": {}, "items": records}
    if n_samples:
        samples = generate_fn([p for p in prompts for _ in range(n_samples)], False)
        for i, record in enumerate(records):
            chunk = samples[i * n_samples:(i + 1) * n_samples]
            record["samples_correct"] = sum(extract_answer(t, flexible) == record["gold"] for t in chunk)
            record["distinct_samples"] = len(set(chunk))  # fewer than n: the engine repeated a sample
        result["pass_at_k"] = {k: float(np.mean([pass_at_k(n_samples, r["samples_correct"], k) for r in records]))
                               for k in k_values}
    return result
