"""Prompt templates per task: a generation prompt (with a format block, as in the paper) used to sample
responses, and a training prompt (no format block) under which SAMI scores them.

The format block shows the model where its answer goes; the leak patterns in `FilterConfig`
("[insert", "Human:", "###") catch samples that copy it instead of answering.

That is the paper's format, for base models (`prompt.template: base`). An instruct model is asked through its
tokenizer's chat template instead (`prompt.template: chat`, `ChatPrompts`): the constitution in the system message,
the query as the user's, one prompt for generation and scoring alike.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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


# The chat template's system message per task: the instruction of the base format's System line, then the constitution.
CHAT_SYSTEM = {
    "dialogue": "Write a response for the assistant that follows the principles in the constitution.",
    "summarization": "Write a summary of the post that follows the principles in the constitution.",
    "world": "Write a response that follows the principles in the constitution.",
}
CHAT_USER = {"dialogue": "{query}", "summarization": "POST: {query}\n\nTL;DR:", "world": "{query}"}


@dataclass(frozen=True)
class ChatPrompts:
    """`prompt.template: chat`: a task's prompts through a tokenizer's chat template (`apply_chat_template`, with the
    generation prompt appended), the constitution as the system message. Built in each process that renders prompts,
    from the tokenizer it already holds; what travels is the rendered text."""

    task: str
    tokenizer: Any = field(compare=False, repr=False)

    def messages(self, constitution_text: str, query: str) -> list[dict[str, str]]:
        return [{"role": "system", "content": f"{CHAT_SYSTEM[self.task]}\n\nConstitution:\n{constitution_text}"},
                {"role": "user", "content": CHAT_USER[self.task].format(query=query.strip())}]

    def render(self, constitution_text: str, query: str) -> str:
        return self.tokenizer.apply_chat_template(self.messages(constitution_text, query), tokenize=False,
                                                  add_generation_prompt=True)


def prompt_format(task: str, template: str, tokenizer=None) -> str | ChatPrompts:
    """What `generation_prompt` and `training_prompt` take: the task's name (the paper's base format), or its
    `ChatPrompts` over `tokenizer` (`template` "chat"; a tokenizer without a chat template is refused)."""
    _template(task)
    if template == "base":
        return task
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("prompt.template is 'chat' but the model's tokenizer has no chat template "
                         "(tokenizer_config.json's chat_template, or chat_template.jinja): use prompt.template=base")
    return ChatPrompts(task, tokenizer)


def _template(task: str) -> PromptTemplate:
    if task not in TEMPLATES:
        raise ValueError(f"unknown task {task!r}; known tasks: {sorted(TEMPLATES)}")
    return TEMPLATES[task]


def generation_prompt(task: str | ChatPrompts, constitution_text: str, query: str) -> str:
    if isinstance(task, ChatPrompts):
        return task.render(constitution_text, query)
    return _template(task).generation.format(constitution=constitution_text, query=query.strip())


def training_prompt(task: str | ChatPrompts, constitution_text: str, query: str) -> str:
    if isinstance(task, ChatPrompts):  # a chat model needs no format block: it samples under the prompt it is scored on
        return task.render(constitution_text, query)
    return _template(task).training.format(constitution=constitution_text, query=query.strip())
