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

_BLOCK = re.compile(r"Principle:\s*(.+?)\s*\n\s*Definition:\s*(.+?)\s*\n\s*Antithesis:\s*(.+?)\s*(?:\n|$)", re.S)


class WriterError(RuntimeError):
    pass


def parse_principles(text: str, expected: int) -> list[Principle]:
    """Strictly parse the writer's answer; raise PrincipleError on anything malformed."""
    blocks = _BLOCK.findall(text)
    if len(blocks) != expected:
        raise PrincipleError(f"writer answer: expected {expected} principle blocks, found {len(blocks)}")
    entries = [{"name": n.strip().lower().replace(" ", "_"), "definition": d, "antithesis": a} for n, d, a in blocks]
    return validate_principles(entries, "writer answer")


class OpenAIChatClient:
    """POST /chat/completions on an OpenAI-compatible server; the key comes from the environment, never logs."""

    def __init__(self, base_url: str, model: str, api_key_env: str, timeout: float = 60.0, retries: int = 3):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key_env, self.timeout, self.retries = model, api_key_env, timeout, retries

    def complete(self, messages: list[dict], temperature: float = 0.0, max_tokens: int = 1024) -> str:
        body = json.dumps({"model": self.model, "messages": messages, "temperature": temperature,
                           "max_tokens": max_tokens}).encode()
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        last = None
        for attempt in range(self.retries + 1):
            try:
                request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return json.loads(response.read())["choices"][0]["message"]["content"]
            except (urllib.error.URLError, TimeoutError, KeyError, json.JSONDecodeError) as e:
                last = e
                if isinstance(e, urllib.error.HTTPError) and e.code in (400, 401, 403, 404):
                    break  # a request or credential problem: retrying will not help
                time.sleep(min(2**attempt * 0.5, 8.0))
        raise WriterError(f"chat endpoint {self.url} failed after {self.retries + 1} attempt(s): {_safe(last)}")


def _safe(error) -> str:
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}"
    return type(error).__name__ + (f": {error.reason}" if hasattr(error, "reason") else f": {error}")


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
    if not cfg.model:
        raise WriterError("principles.writer.model is not set")
    if cfg.backend == "openai":
        if not cfg.base_url:
            raise WriterError("principles.writer.backend is 'openai' but principles.writer.base_url is not set")
        return OpenAIChatClient(cfg.base_url, cfg.model, cfg.api_key_env)
    return HFChatClient(cfg.model)  # "vllm" writers are served over HTTP (vllm serve / cluster.serve_app)


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
    raise WriterError(f"the principle writer gave {rejected} malformed answer(s) in a row; last problem: {problems[-1]}")


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


def principle_writer_actor():
    import ray

    return ray.remote(PrincipleWriterCore)
