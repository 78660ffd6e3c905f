"""Prompt templates per task: a generation prompt (with a format block, as in the paper) used to sample
responses, and a training prompt (no format block) under which SAMI scores them.

The format block shows the model where its answer goes; the leak patterns in `FilterConfig`
("[insert", "Human:", "###") catch samples that copy it instead of answering.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PromptTemplate:
    generation: str
    training: str


_DIALOGUE_SYSTEM = "System: Write a response for the assistant that follows the principles in the constitution."
_SUMMARY_SYSTEM = "System: Write a summary of the post that follows the principles in the constitution."

TEMPLATES: dict[str, PromptTemplate] = {
    # Anthropic/hh-rlhf: the query is the first "Human:" turn.
    "dialogue": PromptTemplate(
        generation=(
            f"{_DIALOGUE_SYSTEM}\n\n### Example Format\nAssistant Constitution:\n[insert constitution here]\n\n"
            "Human: [insert query here]\n\nAssistant: [insert response here]\n\nHuman: [insert next query here]\n\n"
            "### Main Task\nAssistant Constitution:\n{constitution}\n\nHuman: {query}\n\nAssistant:"
        ),
        training="{system}\n\nAssistant Constitution:\n{constitution}\n\nHuman: {query}\n\nAssistant:".replace(
            "{system}", _DIALOGUE_SYSTEM
        ),
    ),
    # openai/summarize_from_feedback (TL;DR): the query is the Reddit post.
    "summarization": PromptTemplate(
        generation=(
            f"{_SUMMARY_SYSTEM}\n\n### Example Format\nSummary Constitution:\n[insert constitution here]\n\n"
            "POST: [insert post here]\n\nTL;DR: [insert summary here]\n\n"
            "### Main Task\nSummary Constitution:\n{constitution}\n\nPOST: {query}\n\nTL;DR:"
        ),
        training="{system}\n\nSummary Constitution:\n{constitution}\n\nPOST: {query}\n\nTL;DR:".replace(
            "{system}", _SUMMARY_SYSTEM
        ),
    ),
    # The built-in world: its tiny base model was pretrained on exactly this format, so both prompts match.
    "world": PromptTemplate(
        generation="Constitution:\n{constitution}\n\nQuery: {query}\nResponse:",
        training="Constitution:\n{constitution}\n\nQuery: {query}\nResponse:",
    ),
}


def _template(task: str) -> PromptTemplate:
    if task not in TEMPLATES:
        raise ValueError(f"unknown task {task!r}; known tasks: {sorted(TEMPLATES)}")
    return TEMPLATES[task]


def generation_prompt(task: str, constitution_text: str, query: str) -> str:
    return _template(task).generation.format(constitution=constitution_text, query=query.strip())


def training_prompt(task: str, constitution_text: str, query: str) -> str:
    return _template(task).training.format(constitution=constitution_text, query=query.strip())
