"""MT-Bench: questions, two-turn answer generation, FastChat answer files, LLM-judge scoring, per-category tables.

Follows FastChat's llm_judge: single-answer grading (a 1-10 rating in "[[rating]]") and pairwise comparison
("[[A]]", "[[B]]", "[[C]]" for a tie), with the judge prompts of its judge_prompts.jsonl; questions in the
math, reasoning and coding categories are judged against their reference answer (the `reference` field of
question.jsonl; a question there without one falls back to the general prompt). Pairwise judging runs both
orders by default and, as in FastChat, two verdicts that disagree count as a tie.

The multi-task SAMI paper (Govande, arXiv 2410.01704) evaluates first-turn answers pairwise with a judge that
also sees the principles the answers should follow: `judge_pairwise(..., principles=...)` adds them to the
pair-v2 judge's instructions.

Pieces are plain functions over callables so they run without a model or a network:
- generate_fn(prompts: list[str]) -> list[str], one completion per prompt (e.g. evals.generate.generate
  bound to a model path and sampling settings); conversations become prompts through `render` (default: a
  plain "### User / ### Assistant" transcript; pass a tokenizer's chat template for instruct models);
- client: anything with complete(messages: list[dict]) -> str (evals.judges.ChatClient).
"""
from __future__ import annotations

import re
import string
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from evals.win_rates import combine_swapped
from sami.jsonl import read_jsonl, write_jsonl

NEED_REF_CATEGORIES = ("math", "reasoning", "coding")
HUB_NAME = "HuggingFaceH4/mt_bench_prompts"
PRINCIPLES_BLOCK = ("\n\nThe assistants were asked to follow these principles. Judge which response answers the "
                    "user question better while following them:\n{principles}")

_RATING = re.compile(r"\[\[(\d+\.?\d*)\]\]")
_RATING_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")
_VERDICT = re.compile(r"\[\[([ABC])\]\]")
_VERDICT_SCORE = {"A": 1.0, "B": 0.0, "C": 0.5}


class MTBenchError(ValueError):
    pass


@dataclass(frozen=True)
class Question:
    question_id: int
    category: str
    turns: tuple[str, ...]
    reference: tuple[str, ...] = ()


@dataclass(frozen=True)
class JudgePrompt:
    name: str
    type: str
    system_prompt: str
    prompt_template: str
    output_format: str

    @property
    def fields(self) -> set[str]:
        return {name for _, name, _, _ in string.Formatter().parse(self.prompt_template) if name}

    def format(self, **values: str) -> str:
        missing = self.fields - set(values)
        if missing:
            raise MTBenchError(f"judge prompt {self.name!r} needs {sorted(missing)}")
        return self.prompt_template.format(**values)


@dataclass
class Answer:
    """One model's answer to one question, FastChat's answer-file record."""

    question_id: int
    model_id: str
    turns: list[str]
    answer_id: str = field(default_factory=lambda: uuid.uuid4().hex[:22])
    tstamp: float = field(default_factory=time.time)

    def to_json(self) -> dict:
        return {"question_id": self.question_id, "answer_id": self.answer_id, "model_id": self.model_id,
                "choices": [{"index": 0, "turns": self.turns}], "tstamp": self.tstamp}


# ---- reading ----

def _read_jsonl(path: Path, what: str) -> list[dict]:
    if not path.is_file():
        raise MTBenchError(f"{what} file {path} does not exist")
    return read_jsonl(path)


def _question(row: dict, where: str) -> Question:
    turns = row.get("turns", row.get("prompt"))
    qid = row.get("question_id", row.get("prompt_id"))
    if qid is None or not isinstance(turns, list) or not turns or "category" not in row:
        raise MTBenchError(f"{where}: expected 'question_id', 'category' and a non-empty 'turns' list")
    return Question(int(qid), row["category"], tuple(turns), tuple(row.get("reference") or ()))


def load_questions(path: str | None = None, hub_name: str = HUB_NAME) -> list[Question]:
    """FastChat's question.jsonl from a local path; without a path, the questions from the hub by name."""
    if path is not None:
        return [_question(row, f"{path} line {i + 1}") for i, row in enumerate(_read_jsonl(Path(path), "question"))]
    from datasets import load_dataset

    return [_question(dict(row), f"{hub_name} row {i}") for i, row in enumerate(load_dataset(hub_name, split="train"))]


def load_judge_prompts(path: str) -> dict[str, JudgePrompt]:
    prompts = {}
    for i, row in enumerate(_read_jsonl(Path(path), "judge prompts")):
        try:
            prompts[row["name"]] = JudgePrompt(row["name"], row["type"], row["system_prompt"],
                                               row["prompt_template"], row["output_format"])
        except KeyError as error:
            raise MTBenchError(f"{path} line {i + 1}: missing field {error}") from None
    return prompts


def write_answers(path: str, answers: list[Answer]) -> None:
    write_jsonl(path, [answer.to_json() for answer in sorted(answers, key=lambda a: a.question_id)])


def read_answers(path: str) -> dict[int, Answer]:
    answers = {}
    for i, row in enumerate(_read_jsonl(Path(path), "answer")):
        try:
            answers[row["question_id"]] = Answer(row["question_id"], row["model_id"], row["choices"][0]["turns"],
                                                 row["answer_id"], row["tstamp"])
        except (KeyError, IndexError, TypeError):
            raise MTBenchError(f"{path} line {i + 1}: not a FastChat answer record") from None
    return answers


# ---- generation ----

def plain_transcript(messages: list[dict]) -> str:
    """A conversation as a base-model prompt, ending where the assistant speaks next."""
    parts = [f"### {m['role'].capitalize()}:\n{m['content']}" for m in messages]
    return "\n\n".join(parts + ["### Assistant:\n"])


def generate_answers(generate_fn: Callable[[list[str]], list[str]], questions: list[Question], model_id: str,
                     render: Callable[[list[dict]], str] = plain_transcript, system: str | None = None,
                     num_turns: int = 2) -> list[Answer]:
    """Answer every question turn by turn, one batch per turn; turn t sees the model's earlier answers.

    `system` (e.g. a rendered constitution) opens every conversation as a system message.
    """
    conversations = [[{"role": "system", "content": system}] if system else [] for _ in questions]
    answers = [[] for _ in questions]
    for turn in range(num_turns):
        active = [i for i, q in enumerate(questions) if turn < len(q.turns)]
        for i in active:
            conversations[i].append({"role": "user", "content": questions[i].turns[turn]})
        outputs = generate_fn([render(conversations[i]) for i in active])
        if len(outputs) != len(active):
            raise MTBenchError(f"generate_fn returned {len(outputs)} completions for {len(active)} prompts")
        for i, text in zip(active, outputs):
            text = text.strip()
            conversations[i].append({"role": "assistant", "content": text})
            answers[i].append(text)
    return [Answer(q.question_id, model_id, a) for q, a in zip(questions, answers)]


# ---- judging ----

def parse_rating(judgment: str) -> float | None:
    """FastChat's rule: "[[r]]", else "[r]"; None when absent or outside 1-10."""
    match = _RATING.search(judgment) or _RATING_BACKUP.search(judgment)
    if not match:
        return None
    rating = float(match.group(1))
    return rating if 1 <= rating <= 10 else None


def parse_verdict(judgment: str) -> float | None:
    """1.0 "[[A]]", 0.0 "[[B]]", 0.5 "[[C]]"; the last verdict counts (judges sometimes restate the format
    before deciding); None when there is none."""
    verdicts = _VERDICT.findall(judgment)
    return _VERDICT_SCORE[verdicts[-1]] if verdicts else None


def _uses_reference(question: Question, turn: int) -> bool:
    return question.category in NEED_REF_CATEGORIES and len(question.reference) >= turn


def _prompt_name(kind: str, question: Question, turn: int) -> str:
    math = _uses_reference(question, turn)
    if kind == "single":
        name = "single-math-v1" if math else "single-v1"
    else:
        name = "pair-math-v1" if math else "pair-v2"
    return name + ("-multi-turn" if turn == 2 else "")


def _reference_fields(question: Question, turn: int) -> dict:
    return {f"ref_answer_{t + 1}": question.reference[t] for t in range(turn)} if _uses_reference(question, turn) else {}


def single_messages(prompts: dict[str, JudgePrompt], question: Question, answer: Answer, turn: int) -> list[dict]:
    prompt = prompts[_prompt_name("single", question, turn)]
    if turn == 1:
        values = {"question": question.turns[0], "answer": answer.turns[0]}
    else:
        values = {"question_1": question.turns[0], "answer_1": answer.turns[0],
                  "question_2": question.turns[1], "answer_2": answer.turns[1]}
    values |= _reference_fields(question, turn)
    return [{"role": "system", "content": prompt.system_prompt}, {"role": "user", "content": prompt.format(**values)}]


def pairwise_messages(prompts: dict[str, JudgePrompt], question: Question, answer_a: Answer, answer_b: Answer,
                      turn: int, principles: str | None = None) -> list[dict]:
    prompt = prompts[_prompt_name("pairwise", question, turn)]
    if turn == 1:
        values = {"question": question.turns[0], "answer_a": answer_a.turns[0], "answer_b": answer_b.turns[0]}
    else:
        values = {"question_1": question.turns[0], "question_2": question.turns[1],
                  "answer_a_1": answer_a.turns[0], "answer_a_2": answer_a.turns[1],
                  "answer_b_1": answer_b.turns[0], "answer_b_2": answer_b.turns[1]}
    values |= _reference_fields(question, turn)
    system = prompt.system_prompt + (PRINCIPLES_BLOCK.format(principles=principles) if principles else "")
    return [{"role": "system", "content": system}, {"role": "user", "content": prompt.format(**values)}]


def judge_single(client, prompts: dict[str, JudgePrompt], questions: list[Question], answers: dict[int, Answer],
                 turns: tuple[int, ...] = (1, 2)) -> list[dict]:
    """One record per (question, turn): {"question_id", "category", "turn", "score" (None if unparseable),
    "judgment"}."""
    records = []
    for question in questions:
        for turn in turns:
            if turn > len(question.turns):
                continue
            judgment = client.complete(single_messages(prompts, question, answers[question.question_id], turn))
            records.append({"question_id": question.question_id, "category": question.category, "turn": turn,
                            "score": parse_rating(judgment), "judgment": judgment})
    return records


def judge_pairwise(client, prompts: dict[str, JudgePrompt], questions: list[Question], test: dict[int, Answer],
                   baseline: dict[int, Answer], turn: int = 1, swap: bool = True,
                   principles: str | None = None) -> list[dict]:
    """Test model vs baseline, one record per question: {"question_id", "category", "turn", "score"} with the
    score from the test model's side (1 win, 0 loss, 0.5 tie, disagreement between orders, or unparseable)."""
    records = []
    for question in questions:
        t, b = test[question.question_id], baseline[question.question_id]
        first = parse_verdict(client.complete(pairwise_messages(prompts, question, t, b, turn, principles)))
        score = 0.5 if first is None else first
        if swap:
            second = parse_verdict(client.complete(pairwise_messages(prompts, question, b, t, turn, principles)))
            score = float(combine_swapped([score], [0.5 if second is None else 1.0 - second])[0])
        records.append({"question_id": question.question_id, "category": question.category, "turn": turn,
                        "score": score})
    return records


def evaluate_mtbench(generate_fn: Callable[[list[str]], list[str]], client, questions: list[Question],
                     prompts: dict[str, JudgePrompt], model_id: str, answer_dir: str,
                     baseline: dict[int, Answer] | None = None, principles: str | None = None,
                     render: Callable[[list[dict]], str] = plain_transcript, system: str | None = None) -> dict:
    """Generate both turns, write `{answer_dir}/{model_id}.jsonl`, grade each turn 1-10, and, given baseline
    answers, judge first turns pairwise (principle-conditioned when `principles` is set).
    Returns {"single": category table per turn ("turn_1", "turn_2"), "pairwise": category table or None}."""
    answers = generate_answers(generate_fn, questions, model_id, render=render, system=system)
    write_answers(str(Path(answer_dir) / f"{model_id}.jsonl"), answers)
    by_id = {a.question_id: a for a in answers}
    single = judge_single(client, prompts, questions, by_id)
    result = {"single": {f"turn_{t}": category_table([r for r in single if r["turn"] == t]) for t in (1, 2)},
              "pairwise": None}
    if baseline is not None:
        result["pairwise"] = category_table(judge_pairwise(client, prompts, questions, by_id, baseline,
                                                           principles=principles))
    return result


# ---- tables ----

def category_table(records: list[dict]) -> dict[str, dict]:
    """{category: {"n", "mean"}} plus "overall"; records whose score is None are counted as "unparsed"."""
    groups: dict[str, list] = defaultdict(list)
    for record in records:
        groups[record["category"]].append(record["score"])
        groups["overall"].append(record["score"])
    table = {}
    for category in sorted(groups, key=lambda c: (c == "overall", c)):
        scores = [s for s in groups[category] if s is not None]
        table[category] = {"n": len(scores), "unparsed": len(groups[category]) - len(scores),
                           "mean": float(np.mean(scores)) if scores else float("nan")}
    return table


def format_table(table: dict[str, dict], value: str = "mean score") -> str:
    lines = [f"{'category':<12} {'n':>4} {value:>12}"]
    lines += [f"{c:<12} {row['n']:>4} {row['mean']:>12.3f}" for c, row in table.items()]
    return "\n".join(lines)
