"""The principle writer: where a run's principles come from, and the constitutions it serves per query.

Sources: a curated principle file, the built-in world, or an instruct LM (any OpenAI-compatible endpoint,
as the paper used a hosted model, or a local HF model) prompted as in the paper's appendix A.12 to write
principles *and* their antitheses. LM output must parse and validate; a malformed answer is retried up to
`max_retries` times, then the run stops with the count of rejected answers. Whatever was used is saved
in the run directory (`principles.yaml`) and reused on resume, so every iteration can be reproduced.
"""
from __future__ import annotations

import re
from pathlib import Path

from sami.chat_clients import make_chat_client
from sami.config import PrinciplesConfig, WriterConfig
from sami.constitutions import Constitution
from sami.groups import draw_constitutions
import sami.world.rules  # noqa: F401  registers the built-in world's principle library (`principles.source: world`)
from sami.principles import (Principle, PrincipleError, builtin_library, load_principles, save_principles,
                             validate_principles)
from sami.run_dir import RunDir

WRITER_PROMPT = """I am writing a constitution for how to {task}. Here are some principles I already have:
{seeds}
Write {n} principles in total, each with a short name and a good definition, and, in the same format, their
antitheses to use as a contrastive prompt. Answer with exactly {n} blocks of three lines and nothing else:

Principle: <short name>
Definition: <one sentence>
Antithesis: <one sentence saying the opposite>"""

_FIELDS = ("Principle", "Definition", "Antithesis")


class WriterError(RuntimeError):
    """The writer could not produce usable principles (endpoint down, or malformed answers only)."""


def parse_principles(text: str, expected: int) -> list[Principle]:
    """Strictly parse the writer's answer; raise PrincipleError on anything malformed.

    Every line that starts with a field label must come in the order Principle, Definition, Antithesis;
    other lines (a polite preamble, blank lines) are ignored. Names become snake_case identifiers.
    """
    blocks: list[dict] = []
    for number, line in enumerate(text.splitlines(), 1):
        label, sep, value = line.strip().strip("*").partition(":")
        label = label.strip("* ")
        if not sep or label not in _FIELDS:
            continue
        want = _FIELDS[len(blocks[-1])] if blocks and len(blocks[-1]) < 3 else "Principle"
        if label != want:
            raise PrincipleError(f"writer answer line {number}: expected '{want}:', got '{label}:'")
        if label == "Principle":
            blocks.append({})
        blocks[-1][label] = value.strip().strip("*").strip()
    if blocks and len(blocks[-1]) < 3:
        raise PrincipleError(f"writer answer: the last block ({blocks[-1].get('Principle')!r}) is incomplete")
    if len(blocks) != expected:
        raise PrincipleError(f"writer answer: expected {expected} principle blocks, found {len(blocks)}")
    entries = [{"name": re.sub(r"\W+", "_", b["Principle"].lower()).strip("_"), "definition": b["Definition"],
                "antithesis": b["Antithesis"]} for b in blocks]
    return validate_principles(entries, "writer answer")


def chat_client_for(cfg: WriterConfig):
    return make_chat_client(cfg, field_prefix="principles.writer", purpose="principle writer")


def write_principles(cfg: WriterConfig, client) -> tuple[list[Principle], int]:
    """(principles, rejected answers): retry malformed answers up to max_retries times, never use them."""
    seeds = "\n".join(f"- {s}" for s in cfg.seed_principles) or "- (none yet)"
    prompt = WRITER_PROMPT.format(task=cfg.task_description, seeds=seeds, n=cfg.num_principles)
    rejected, problems = 0, []
    for _ in range(cfg.max_retries + 1):
        answer = client.complete([{"role": "user", "content": prompt}], cfg.temperature, cfg.max_new_tokens)
        try:
            return parse_principles(answer, cfg.num_principles), rejected
        except PrincipleError as e:
            rejected += 1
            problems.append(str(e))
    raise WriterError(f"the principle writer gave {rejected} malformed answer(s) (principles.writer.max_retries="
                      f"{cfg.max_retries}), none used; last problem: {problems[-1]}")


def configured_library(cfg: PrinciplesConfig) -> list[Principle] | None:
    """The principle library a config names, the one loader of training and evaluation: its file or a built-in
    library (the world's); None when an LM is to write them. Raises PrincipleError on a malformed file."""
    if cfg.source == "file":
        return load_principles(cfg.path)
    if cfg.source == "writer":
        return None
    return list(builtin_library(cfg.source).principles)


class PrincipleWriterCore:
    """Principles for a run, saved in `run_dir`; constitutions per query, deterministic per (seed, query id)."""

    def __init__(self, cfg: PrinciplesConfig, run_dir: str | Path, client=None):
        self.cfg, self.path, self.client = cfg, RunDir(run_dir).principles, client
        self._principles: list[Principle] | None = None
        self.rejected = 0

    def prepare(self) -> dict:
        """Write (or reuse) the run's principles; returns what happened, for the logs."""
        if self._principles is not None:
            return {"principles": len(self._principles), "rejected": self.rejected, "source": "memory"}
        self._principles, source = self.read_library()
        if self._principles is None:
            self._principles, self.rejected = write_principles(self.cfg.writer, self.client or chat_client_for(self.cfg.writer))
        save_principles(self._principles, self.path)
        return {"principles": len(self._principles), "rejected": self.rejected, "source": source}

    def read_library(self) -> tuple[list[Principle] | None, str]:
        """(principles, source) without writing anything: the run's saved library, the file or a built-in library
        (the world's); (None, "writer") when an LM is to write them. Raises PrincipleError on a malformed library."""
        if self.path.is_file():
            return load_principles(self.path), "saved"
        return configured_library(self.cfg), self.cfg.source

    def principles(self) -> list[Principle]:
        if self._principles is None:
            self.prepare()
        return self._principles

    def constitutions(self, query_ids: list[str], seed: int) -> list[list[Constitution]]:
        return draw_constitutions(self.principles(), self.cfg, query_ids, seed)

    def iteration_constitutions(self, query_ids: list[str], seed: int) -> tuple[list[Principle], list[list[Constitution]]]:
        """(the principle library, each query's C constitutions): what one iteration needs, in one call."""
        return self.principles(), self.constitutions(query_ids, seed)
