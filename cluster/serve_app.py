"""Serve an exported checkpoint as an OpenAI-compatible endpoint (for people, or as another job's judge or
principle writer):

    serve run cluster.serve_app:build_app model_path=/mnt/efs/sami/runs/hh_mistral7b/iteration-3/hf
    curl -s 127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"messages": [{"role": "user", "content": "How do I bake bread?"}], "max_tokens": 64}'

Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models. The constitution travels as the
`system` message (chat) or a `system` field (completions); `constitution=...` (text or a file) is the default
when a request brings none. A model with a chat template (an instruct model) gets its template; a base or
SAMI-trained model gets the project's generation prompt for `task` (sami/prompts.py). Engines are the
rollout engines (sami/rollout_engines.py): vLLM on a GPU (`engine=vllm`, import-guarded), HF generate on
CPU; `engine=auto` reserves a vLLM engine's GPUs for each replica when the cluster has GPUs, and each replica
picks vLLM where it sees a GPU and vLLM, HF otherwise. Serve's HTTP proxy binds 127.0.0.1 unless
the cluster's Serve config says otherwise.
"""
# No `from __future__ import annotations`: FastAPI reads the handlers' `Request` annotations at runtime.

import threading
import time
import uuid
from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sami.config import EngineConfig, ModelConfig, SamplingConfig, format_validation_error


class ServeArgs(BaseModel):
    """`serve run cluster.serve_app:build_app key=value ...` arguments (strings, validated here)."""

    model_config = ConfigDict(extra="forbid")
    model_path: str
    model_name: Optional[str] = None  # the name clients send as "model"; defaults to model_path
    engine: Literal["auto", "hf", "vllm"] = "auto"
    tensor_parallel_size: int = Field(1, ge=1)
    gpu_memory_utilization: float = Field(0.85, gt=0.0, le=1.0)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    task: Literal["dialogue", "summarization", "world"] = "dialogue"
    constitution: Optional[str] = None  # default system text, or a path to a file holding it
    max_prompt_tokens: int = Field(2048, ge=8)
    max_tokens_limit: int = Field(1024, ge=1)  # a request's max_tokens is capped at this
    max_n: int = Field(8, ge=1)  # choices per chat request; more is a 400
    max_prompts: int = Field(64, ge=1)  # prompts per completions request; more is a 400
    num_replicas: int = Field(1, ge=1)
    trust_remote_code: bool = False


def pick_engine(requested: str) -> str:
    """The engine a replica runs, decided inside the replica: `auto` is vLLM where this process sees a GPU and
    vLLM is installed, HF generate otherwise."""
    if requested != "auto":
        return requested
    import importlib.util

    import torch

    return "vllm" if torch.cuda.is_available() and importlib.util.find_spec("vllm") else "hf"


def cluster_view() -> tuple[bool, Optional[dict]]:
    """(whether the Ray cluster the replicas run on has GPUs, the label selector of its rollout nodes: None where it
    has no role labels, actors/placement.py). `serve run` builds the app on its own host (often a CPU head node)
    before it connects, so this host's devices say nothing about the replicas'."""
    import ray

    from actors.placement import ROLLOUT, role_selector

    def seen() -> tuple[bool, Optional[dict]]:
        return ray.cluster_resources().get("GPU", 0) > 0, role_selector(ROLLOUT)

    if ray.is_initialized():  # `serve deploy`: the app is built inside the cluster
        return seen()
    try:
        ray.init(address="auto", log_to_driver=False)  # the running cluster `serve run` is about to join
    except ConnectionError:  # none: `serve run` starts a local one on this host (no labels)
        import torch

        return torch.cuda.is_available(), None
    try:
        return seen()
    finally:
        ray.shutdown()  # `serve run` connects itself, with its namespace and runtime env


class RequestError(ValueError):
    """A bad request; answered with HTTP 400 and this message."""


def int_field(request: dict, name: str, default: int, low: int, high: int) -> int:
    """An integer request field within [low, high]; anything else (text, 2.5, true) is a RequestError (400)."""
    value = request.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{name} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise RequestError(f"{name} must be between {low} and {high}, got {value}")
    return value


def text_field(value, name: str, allow_empty: bool = False) -> str:
    """Text a request brings for the tokenizer: a string, not blank (an empty prompt fails inside the engine),
    UTF-8 (JSON's "\\ud800" decodes to a lone surrogate, which no tokenizer encodes)."""
    if not isinstance(value, str):
        raise RequestError(f"{name} must be a string, got {value!r}"[:200])
    if not allow_empty and not value.strip():
        raise RequestError(f"{name} is empty")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RequestError(f"{name} holds a lone surrogate ({value[e.start]!r} at character {e.start})") from None
    return value


def body_object(request) -> dict:
    if not isinstance(request, dict):
        raise RequestError(f"the body must be a JSON object, got {type(request).__name__} {request!r}"[:200])
    return request


def stop_strings(request: dict) -> list[str]:
    """`stop`: absent, a string or a list of strings (as OpenAI takes it)."""
    stops = request.get("stop")
    if stops is None:
        return []
    if isinstance(stops, str):
        stops = [stops]
    if not isinstance(stops, list):
        raise RequestError(f"stop must be a string or a list of strings, got {stops!r}"[:200])
    return [text_field(stop, f"stop[{i}]", allow_empty=True) for i, stop in enumerate(stops)]


class CompletionCore:
    """Request dicts in, OpenAI-shaped response dicts out; no web framework (unit-testable as is)."""

    def __init__(self, args: ServeArgs, engine=None):
        from sami.rollout_engines import make_engine

        self.args = args
        self.name = args.model_name or args.model_path
        constitution = args.constitution
        if constitution and Path(constitution).is_file():
            constitution = Path(constitution).read_text().strip()
        self.constitution = constitution
        model_cfg = ModelConfig(name_or_path=args.model_path, dtype=args.dtype, max_prompt_tokens=args.max_prompt_tokens,
                                max_response_tokens=args.max_tokens_limit, trust_remote_code=args.trust_remote_code)
        engine_cfg = EngineConfig(engine=pick_engine(args.engine), tensor_parallel_size=args.tensor_parallel_size,
                                  gpu_memory_utilization=args.gpu_memory_utilization)
        self.engine = engine or make_engine(args.model_path, engine_cfg, model_cfg)
        self.tokenizer = self.engine.tokenizer
        self.lock = threading.Lock()  # one generate at a time per replica; replicas scale out

    # --- prompts ---
    def chat_prompt(self, messages: list[dict]) -> str:
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise RequestError("messages must be a non-empty list of {role, content} objects with string content")
        for i, m in enumerate(messages):
            text_field(m.get("content"), f"messages[{i}].content")
        system = next((m["content"] for m in messages if m.get("role") == "system"), self.constitution)
        turns = [m for m in messages if m.get("role") != "system"]
        if not turns or turns[-1].get("role") != "user":
            raise RequestError("the last message must have role 'user'")
        if getattr(self.tokenizer, "chat_template", None):
            if system:
                # Templates without a system role (e.g. Mistral-Instruct) get it in the first user turn.
                try:
                    return self.tokenizer.apply_chat_template([{"role": "system", "content": system}, *turns],
                                                              tokenize=False, add_generation_prompt=True)
                except Exception:
                    turns = [{"role": "user", "content": f"{system}\n\n{turns[0]['content']}"}, *turns[1:]]
            return self.tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        return self.plain_prompt(system, turns[-1]["content"])

    def plain_prompt(self, system: Optional[str], text: str) -> str:
        if not system:
            return text
        from sami.prompts import generation_prompt

        return generation_prompt(self.args.task, system, text)

    # --- generation ---
    def _generate(self, prompts: list[str], request: dict, seed: int) -> list:
        try:
            sampling = SamplingConfig(temperature=request.get("temperature", 1.0), top_p=request.get("top_p", 1.0),
                                      max_new_tokens=min(int_field(request, "max_tokens", 128, 1, 2**31),
                                                         self.args.max_tokens_limit),
                                      batch_size=max(len(prompts), 1))
        except ValidationError as e:
            raise RequestError(format_validation_error(e, "request")) from None
        stops = stop_strings(request)
        with self.lock:
            completions = self.engine.generate(prompts, sampling, seed)
        results = []
        for c in completions:
            text, reason = c.text, c.finish_reason
            cut = min((text.find(s) for s in stops if s and s in text), default=-1)
            if cut >= 0:
                text, reason = text[:cut], "stop"
            results.append((text, reason, len(c.token_ids)))
        return results

    def _envelope(self, kind: str, choices: list[dict], prompt_tokens: int, completion_tokens: int) -> dict:
        return {"id": f"{kind}-{uuid.uuid4().hex[:24]}", "object": kind, "created": int(time.time()), "model": self.name,
                "choices": choices, "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                              "total_tokens": prompt_tokens + completion_tokens}}

    def _count(self, prompts: list[str]) -> int:
        return sum(len(self.tokenizer(p, add_special_tokens=False).input_ids) for p in prompts)

    def chat(self, request: dict) -> dict:
        request = body_object(request)
        prompt = self.chat_prompt(request.get("messages"))
        n = int_field(request, "n", 1, 1, self.args.max_n)
        results = self._generate([prompt] * n, request, int_field(request, "seed", 0, 0, 2**63 - 1))
        choices = [{"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": reason}
                   for i, (text, reason, _) in enumerate(results)]
        return self._envelope("chat.completion", choices, self._count([prompt]), sum(r[2] for r in results))

    def complete(self, request: dict) -> dict:
        raw = body_object(request).get("prompt")
        prompts = [raw] if isinstance(raw, str) else raw
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise RequestError("prompt must be a string or a non-empty list of strings")
        if len(prompts) > self.args.max_prompts:
            raise RequestError(f"prompt has {len(prompts)} entries; this server takes at most {self.args.max_prompts}")
        for i, p in enumerate(prompts):
            text_field(p, "prompt" if isinstance(raw, str) else f"prompt[{i}]")
        system = request.get("system", self.constitution)
        if system is not None:
            text_field(system, "system", allow_empty=True)
        prompts = [self.plain_prompt(system, p) for p in prompts]
        results = self._generate(prompts, request, int_field(request, "seed", 0, 0, 2**63 - 1))
        choices = [{"index": i, "text": text, "finish_reason": reason} for i, (text, reason, _) in enumerate(results)]
        return self._envelope("text_completion", choices, self._count(prompts), sum(r[2] for r in results))

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.name, "object": "model", "owned_by": "sami-on-ray"}]}


def _deployment():
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from ray import serve

    api = FastAPI(title="SAMI checkpoint")

    @serve.deployment(max_ongoing_requests=16)
    @serve.ingress(api)
    class OpenAICompatible:
        def __init__(self, args: ServeArgs):
            self.core = CompletionCore(args)

        async def _call(self, method, request: Request):
            try:
                body = await request.json()
            except ValueError:
                return JSONResponse({"error": {"message": "the body is not JSON"}}, status_code=400)
            try:
                import asyncio

                return await asyncio.to_thread(method, body)
            except RequestError as e:
                return JSONResponse({"error": {"message": str(e)}}, status_code=400)

        @api.post("/v1/chat/completions")
        async def chat(self, request: Request):
            return await self._call(self.core.chat, request)

        @api.post("/v1/completions")
        async def completions(self, request: Request):
            return await self._call(self.core.complete, request)

        @api.get("/v1/models")
        def models(self):
            return self.core.models()

    return OpenAICompatible


def build_app(raw_args: dict):
    """Serve's app builder: `serve run cluster.serve_app:build_app model_path=...`."""
    try:
        args = ServeArgs.model_validate(raw_args)
    except ValidationError as e:
        raise ValueError(format_validation_error(e, "serve arguments", ServeArgs)) from None
    return _deployment().options(**replica_options(args)).bind(args)


def replica_options(args: ServeArgs) -> dict:
    """Each replica's Ray resources. A vLLM replica (and an `auto` one on a cluster with GPUs, which picks its
    engine where it runs) is the holder actor of its engine's placement group, the one the rollout actors get
    (`actors.rollout.vllm_bundles`): Serve schedules the replica in bundle 0."""
    from actors.rollout import VLLM_PLACEMENT_STRATEGY, vllm_bundles, vllm_holder_options

    has_gpus, selector = cluster_view()  # replicas on `role: rollout` nodes where the cluster has roles
    if args.engine == "hf" or (args.engine == "auto" and not has_gpus):
        return {"num_replicas": args.num_replicas,
                "ray_actor_options": {"num_cpus": 1, **({"label_selector": selector} if selector else {})}}
    tp = args.tensor_parallel_size
    return {"num_replicas": args.num_replicas, "ray_actor_options": vllm_holder_options(tp),
            "placement_group_bundles": vllm_bundles(tp), "placement_group_strategy": VLLM_PLACEMENT_STRATEGY,
            **({"placement_group_bundle_label_selector": [dict(selector) for _ in range(tp)]} if selector else {})}
