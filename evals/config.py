"""The evaluation job's config: which checkpoints, on which held-out queries, judged by whom, and which
benchmarks. Same conventions as training (YAML, `key=value` overrides, errors that name the field)."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from sami.config import (ChatClientConfig, DataConfig, EngineConfig, PrinciplesConfig, SamplingConfig, Section,
                         TrackingConfig)


class EvalRunConfig(Section):
    name: str = "eval"
    output_dir: str = "runs/eval"
    seed: int = 0


class EvalModel(Section):
    name: str = Field(min_length=1)  # how the report calls it: "base", "sami-iter1", ...
    path: str = Field(min_length=1)  # an HF folder (training exports iteration-k/hf) or a hub name


class GenerationConfig(EngineConfig):
    """The shared engine section, plus how each model's generation actor is sized."""

    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_prompt_tokens: int = Field(1024, ge=8)
    trust_remote_code: bool = False
    # Ray resources of each model's generation actor; with engine vllm it must equal tensor_parallel_size (the
    # engine's placement group holds them)
    gpus_per_model: float = Field(0.0, ge=0.0)
    cpus_per_model: float = Field(1.0, gt=0.0)

    @model_validator(mode="after")
    def _vllm_gpus(self):
        if self.engine == "vllm" and self.gpus_per_model != self.tensor_parallel_size:
            raise ValueError(f"generation.engine is 'vllm': generation.gpus_per_model ({self.gpus_per_model:g}) must equal "
                             f"generation.tensor_parallel_size ({self.tensor_parallel_size}), the GPUs of one engine")
        return self


class JudgeConfig(ChatClientConfig):
    # The chat-client section the principle writer uses, plus world: the built-in world's rule judge (exact,
    # for the world's data only).
    backend: Literal["openai", "vllm", "hf", "world"] = "openai"
    max_tokens: int = Field(512, ge=1)
    concurrency: int = Field(8, ge=1)  # requests in flight
    swap: bool = False  # judge every pair in both orders; disagreement is a tie (FastChat's rule)

    @model_validator(mode="after")
    def _backend_needs(self):
        if self.backend != "world" and self.problems("judge"):
            raise ValueError("; ".join(self.problems("judge")))
        return self


class WinRateConfig(Section):
    enabled: bool = True
    bootstrap: int = Field(2000, ge=1)


class MIBoundConfig(Section):
    enabled: bool = True


class AdherenceConfig(Section):
    """The built-in world's rule adherence (data and principles from the world): per item the share of stated
    principles followed, per principle, well-formed; and on `heldout_principle_queries` more held-out queries
    (after the `num_queries` ones) whose positive constitution also states the held-out principle(s)."""

    enabled: bool = False
    heldout_principle_queries: int = Field(0, ge=0)


class MTBenchConfig(Section):
    enabled: bool = False
    questions: Optional[str] = None  # FastChat's question.jsonl; None: the hub copy
    judge_prompts: Optional[str] = None  # FastChat's judge_prompts.jsonl
    max_questions: Optional[int] = Field(None, ge=1)
    # the multi-task SAMI paper's protocol: the pairwise judge also sees the principles
    principle_conditioned: bool = True
    max_new_tokens: int = Field(512, ge=1)

    @model_validator(mode="after")
    def _needs_prompts(self):
        if self.enabled and not self.judge_prompts:
            raise ValueError("mtbench.enabled but mtbench.judge_prompts (FastChat's judge_prompts.jsonl) is not set")
        return self


class GSM8KConfig(Section):
    enabled: bool = False
    source: str = "openai/gsm8k"  # a hub name (config "main") or a local JSONL with question/answer
    split: str = "test"
    max_items: Optional[int] = Field(None, ge=1)
    num_samples: int = Field(0, ge=0)  # n sampled completions per problem for pass@k; 0: greedy only
    k: list[int] = Field(default_factory=lambda: [1])
    temperature: float = Field(0.7, gt=0.0, le=2.0)  # vLLM refuses > 2
    max_new_tokens: int = Field(256, ge=1)

    @model_validator(mode="after")
    def _k_within_n(self):
        too_large = [k for k in self.k if k > self.num_samples]
        if self.num_samples and too_large:
            raise ValueError(f"gsm8k.k {too_large} exceed gsm8k.num_samples={self.num_samples}")
        return self


class EvalConfig(Section):
    run: EvalRunConfig = Field(default_factory=EvalRunConfig)
    models: list[EvalModel] = Field(min_length=1)
    baseline: Optional[str] = None  # the model every other one is compared with; default: the first
    # Held-out queries: with data.heldout_queries = N, the last N rows exactly as training cut them off;
    # with 0, every row loaded (point data.split at a test split).
    data: DataConfig = Field(default_factory=DataConfig)
    num_queries: Optional[int] = Field(None, ge=1)
    principles: PrinciplesConfig = Field(default_factory=PrinciplesConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    judge: JudgeConfig = Field(default_factory=lambda: JudgeConfig(backend="world"))
    win_rates: WinRateConfig = Field(default_factory=WinRateConfig)
    mi_bound: MIBoundConfig = Field(default_factory=MIBoundConfig)
    adherence: AdherenceConfig = Field(default_factory=AdherenceConfig)
    mtbench: MTBenchConfig = Field(default_factory=MTBenchConfig)
    gsm8k: GSM8KConfig = Field(default_factory=GSM8KConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _cross_checks(self):
        names = [m.name for m in self.models]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"models: names must be unique, {duplicates} repeat")
        if self.baseline is not None and self.baseline not in names:
            raise ValueError(f"baseline {self.baseline!r} is not one of the models {names}")
        if self.principles.source == "writer":
            raise ValueError("principles.source 'writer' is for training; evaluate with the principles the run saved: "
                             "principles.source=file principles.path=<run>/principles.yaml")
        if self.win_rates.enabled and self.judge.backend == "world" and self.data.source != "world":
            raise ValueError(f"judge.backend 'world' judges the built-in world only, but data.source is {self.data.source!r}")
        if self.adherence.enabled and (self.data.source, self.principles.source) != ("world", "world"):
            raise ValueError("adherence.enabled checks the built-in world's rules: data.source and principles.source "
                             f"must be 'world', got {self.data.source!r} and {self.principles.source!r}")
        if self.adherence.heldout_principle_queries and not self.adherence.enabled:
            raise ValueError("adherence.heldout_principle_queries needs adherence.enabled")
        if self.adherence.heldout_principle_queries and self.num_queries is None:
            raise ValueError("adherence.heldout_principle_queries takes the held-out queries after the first "
                             "num_queries ones: set num_queries")
        if self.mtbench.enabled and self.judge.backend == "world":
            raise ValueError("mtbench.enabled needs a language-model judge (judge.backend openai, vllm or hf), not 'world'")
        return self

    @property
    def needs_queries(self) -> bool:
        """Held-out queries are answered for the win rates, the MI bound and adherence only."""
        return self.win_rates.enabled or self.mi_bound.enabled or self.adherence.enabled

    @property
    def baseline_name(self) -> str:
        return self.baseline or self.models[0].name
