"""Chat clients shared by the principle writer and the evaluation job's judges: `complete(messages) -> str`.

- `OpenAIChatClient`: any OpenAI-compatible endpoint (a hosted API, `vllm serve`, our Ray Serve app).
- `HFChatClient`: a local model through transformers.
"""
from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request


class ChatClientError(RuntimeError):
    """An endpoint could not be used; the message names who asked (`purpose`), the URL and what went wrong."""


class OpenAIChatClient:
    """POST {base_url}/chat/completions on an OpenAI-compatible server.

    The key is read from the environment variable named `api_key_env` at call time and only ever goes into
    the Authorization header: no error message, log line or repr contains it. Connection failures, timeouts,
    429 and 5xx answers are retried with exponential backoff; other 4xx answers fail at once.
    """

    def __init__(self, base_url: str, model: str, api_key_env: str, timeout: float = 60.0, retries: int = 3,
                 backoff: float = 1.0, purpose: str = "chat client"):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key_env, self.purpose = model, api_key_env, purpose
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
        raise ChatClientError(f"{self.purpose}: {self.url} failed after {attempt + 1} attempt(s): {problem}")


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


def make_chat_client(cfg, *, field_prefix: str, purpose: str):
    """A client for a `sami.config.ChatClientConfig` section (the writer's or the judge's). openai / vllm: an
    OpenAI-compatible endpoint (`vllm serve` speaks the same protocol); hf: a local model. Missing settings
    are reported by their config field (`field_prefix`.model, ...)."""
    problems = cfg.problems(field_prefix)
    if problems:
        raise ChatClientError(f"{purpose}: " + "; ".join(problems))
    if cfg.backend in ("openai", "vllm"):
        return OpenAIChatClient(cfg.base_url, cfg.model, cfg.api_key_env, timeout=cfg.timeout, retries=cfg.retries,
                                purpose=purpose)
    return HFChatClient(cfg.model)


def check_endpoint(cfg, *, field_prefix: str, purpose: str, retries: int | None = None) -> None:
    """One cheap request (a one-token answer) to an OpenAI-compatible endpoint, so a down or misnamed endpoint
    stops a job before it starts any work; `retries` overrides the section's. Raises ChatClientError."""
    if cfg.backend not in ("openai", "vllm"):
        return  # a local model: nothing to reach
    if retries is not None:
        cfg = cfg.model_copy(update={"retries": retries})
    make_chat_client(cfg, field_prefix=field_prefix, purpose=purpose).complete(
        [{"role": "user", "content": "Answer with one word: OK"}], 0.0, 1)
