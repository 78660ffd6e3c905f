"""The principle writer: where a run's principles come from, and the constitutions it serves per query.

Sources: a curated principle file, the built-in world, or an instruct LM (any OpenAI-compatible endpoint,
as the paper used a hosted model, or a local HF model) prompted as in the paper's appendix A.12 to write
principles *and* their antitheses. LM output must parse and validate; a malformed answer is retried up to
`max_retries` times, then the run stops with the count of rejected answers. Whatever was used is saved
in the run directory (`principles.yaml`) and reused on resume, so every iteration can be reproduced.
"""
from __future__ import annotations

import json
import os
import random
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

import ray

from pipelines.config import PrinciplesConfig, WriterConfig
from pipelines.constitutions import Constitution, sample_constitutions
from pipelines.principles import Principle, PrincipleError, load_principles, save_principles, validate_principles

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


class OpenAIChatClient:
    """POST {base_url}/chat/completions on an OpenAI-compatible server (a hosted API, `vllm serve`, ...).

    The key is read from the environment variable named `api_key_env` at call time and only ever goes into
    the Authorization header: no error message, log line or repr contains it. Connection failures, timeouts,
    429 and 5xx answers are retried with exponential backoff; other 4xx answers fail at once.
    """

    def __init__(self, base_url: str, model: str, api_key_env: str, timeout: float = 60.0, retries: int = 3,
                 backoff: float = 1.0):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key_env = model, api_key_env
        self.timeout, self.retries, self.backoff = timeout, retries, backoff

    def __repr__(self) -> str:
        return f"OpenAIChatClient(url={self.url!r}, model={self.model!r}, key from ${self.api_key_env})"

    def complete(self, messages: list[dict], temperature: float = 0.0, max_tokens: int = 1024) -> str:
        body = json.dumps({"model": self.model, "messages": messages, "temperature": temperature,
                           "max_tokens": max_tokens}).encode()
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        problem = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(self.backoff * 2 ** (attempt - 1), 30.0))
            try:
                request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return json.loads(response.read())["choices"][0]["message"]["content"]
            except urllib.error.HTTPError as e:
                problem = f"HTTP {e.code} {e.reason}"
                if e.code in (401, 403):
                    problem += f" (is ${self.api_key_env} set to a valid key?)"
                if e.code != 429 and e.code < 500:
                    break  # a request or credential problem: retrying will not help
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                problem = f"cannot reach the endpoint ({getattr(e, 'reason', e)})"
            except (KeyError, IndexError, TypeError, json.JSONDecodeError):
                problem = "the answer is not an OpenAI chat completion (no choices[0].message.content)"
        raise WriterError(f"principle writer: {self.url} failed after {attempt + 1} attempt(s): {problem}")


class HFChatClient:
    """A local instruct model through transformers (its chat template when it has one)."""

    def __init__(self, model: str, trust_remote_code: bool = False):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
        self.model = AutoModelForCausalLM.from_pretrained(model, trust_remote_code=trust_remote_code).eval()

    def complete(self, messages: list[dict], temperature: float = 0.0, max_tokens: int = 1024) -> str:
        if self.tokenizer.chat_template:
            prompt = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            prompt = "\n\n".join(m["content"] for m in messages) + "\n\n"
        ids = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        out = self.model.generate(**ids, max_new_tokens=max_tokens, do_sample=temperature > 0,
                                  temperature=temperature or None, pad_token_id=self.tokenizer.eos_token_id)
        return self.tokenizer.decode(out[0, ids.input_ids.shape[1]:], skip_special_tokens=True)


def make_chat_client(cfg: WriterConfig):
    """openai: any OpenAI-compatible endpoint; vllm: a `vllm serve` endpoint (the same protocol); hf: a local model."""
    if not cfg.model:
        raise WriterError("principles.writer.model is not set (the writer model's name or path)")
    if cfg.backend in ("openai", "vllm"):
        if not cfg.base_url:
            raise WriterError(f"principles.writer.backend is {cfg.backend!r} but principles.writer.base_url is not "
                              f"set (e.g. http://127.0.0.1:8000/v1)")
        return OpenAIChatClient(cfg.base_url, cfg.model, cfg.api_key_env)
    return HFChatClient(cfg.model)


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


class PrincipleWriterCore:
    """Principles for a run, saved in `run_dir`; constitutions per query, deterministic per (seed, query id)."""

    def __init__(self, cfg: PrinciplesConfig, run_dir: str | Path, client=None):
        self.cfg, self.path, self.client = cfg, Path(run_dir) / "principles.yaml", client
        self._principles: list[Principle] | None = None
        self.rejected = 0

    def prepare(self) -> dict:
        """Write (or reuse) the run's principles; returns what happened, for the logs."""
        if self._principles is not None:
            return {"principles": len(self._principles), "rejected": self.rejected, "source": "memory"}
        if self.path.is_file():
            self._principles = load_principles(self.path)
            source = "saved"
        elif self.cfg.source == "file":
            self._principles = load_principles(self.cfg.path)
            source = "file"
        elif self.cfg.source == "world":
            from pipelines.world import PRINCIPLES

            self._principles, source = list(PRINCIPLES), "world"
        else:
            self._principles, self.rejected = write_principles(self.cfg.writer, self.client or make_chat_client(self.cfg.writer))
            source = "writer"
        save_principles(self._principles, self.path)
        return {"principles": len(self._principles), "rejected": self.rejected, "source": source}

    def principles(self) -> list[Principle]:
        if self._principles is None:
            self.prepare()
        return self._principles

    def constitutions(self, query_ids: list[str], seed: int) -> list[list[Constitution]]:
        p = self.cfg
        heldout = tuple(p.heldout)
        if p.source == "world" and not heldout:
            from pipelines.world import HELDOUT_PRINCIPLES

            heldout = HELDOUT_PRINCIPLES
        return [
            sample_constitutions(self.principles(), p.num_constitutions, p.mode, random.Random(f"{seed}/{q}"),
                                 k=p.principles_per_constitution, heldout=heldout)
            for q in query_ids
        ]


PrincipleWriterActor = ray.remote(PrincipleWriterCore)


def principle_writer_actor():
    """The Ray actor class (kept for callers that ask for it by function)."""
    return PrincipleWriterActor
