"""One typed config for the training job, loaded from YAML with `key.path=value` overrides.

Every section is a pydantic model with `extra="forbid"`, so a typo in a YAML key is an error that names
the key, and every validation error names the dotted field and the bad value (see `ConfigError`).
"""
from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any, Literal, Optional, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sami.principles import builtin_library


class ConfigError(ValueError):
    """A user mistake in a config file or an override; the message is meant to be printed as is."""


class Section(BaseModel):
    # allow_inf_nan=False: `optim.lr=.inf` or `nan` is refused, never trained on
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class RunConfig(Section):
    name: str = "sami"
    output_dir: str = "runs/sami"
    seed: int = 0
    iterations: int = Field(2, ge=1)


# The ranks vLLM 0.33 accepts as `max_lora_rank` (vllm/config/lora.py MaxLoRARanks): a vLLM engine serves an adapter
# under the smallest of these at or above its rank.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


class LoraSettings(Section):
    """LoRA (peft `LoraConfig`): the learner trains an adapter on the frozen base, the engines take the adapter
    alone, and the base with the adapter switched off is the reference (sami/lora.py)."""

    enabled: bool = False
    rank: int = Field(8, ge=1, le=VLLM_LORA_RANKS[-1])
    alpha: float = Field(16.0, gt=0.0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    # module names (the last part of a dotted name) that get an adapter; checked against the model before Ray starts
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1)
    # also export the merged model (base + adapter, a plain HF folder) beside each iteration's adapter
    export_merged: bool = False


class ModelConfig(Section):
    # A hub name ("mistralai/Mistral-7B-v0.1") or a local folder written by `save_pretrained`.
    name_or_path: str = "builtin:world"
    tokenizer: Optional[str] = None  # defaults to name_or_path
    trust_remote_code: bool = False
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    max_prompt_tokens: int = Field(512, ge=8)
    max_response_tokens: int = Field(350, ge=1)
    lora: LoraSettings = Field(default_factory=LoraSettings)


class DataConfig(Section):
    # hf: datasets.load_dataset(dataset, subset, split); jsonl: a local file; world: the built-in world.
    source: Literal["hf", "jsonl", "world"] = "world"
    task: Literal["dialogue", "summarization", "world"] = "world"
    dataset: Optional[str] = None
    subset: Optional[str] = None
    split: str = "train"
    path: Optional[str] = None
    query_field: Optional[str] = None  # defaults per task (first Human turn, post, ...)
    max_queries: Optional[int] = Field(None, ge=1)
    heldout_queries: int = Field(0, ge=0)  # kept out of training for the evaluation job
    # queries sampled per iteration; default: steps x groups_per_step (every group trained on once)
    queries_per_iteration: Optional[int] = Field(None, ge=1)
    # Train on the query groups another run generated (<dir>/iteration-<k>/groups.parquet) instead of
    # generating: baselines compared on the same data with the same budget of steps.
    replay_groups_from: Optional[str] = None
    # A negative control: the replayed responses moved to random constitutions of the iteration (`shuffle_pairs`)
    replay_shuffled: bool = False

    @model_validator(mode="after")
    def _source_needs_location(self):
        if self.replay_shuffled and not self.replay_groups_from:
            raise ValueError("data.replay_shuffled shuffles replayed groups, but data.replay_groups_from is not set")
        if self.source == "hf" and not self.dataset:
            raise ValueError("data.source is 'hf' but data.dataset is not set (e.g. Anthropic/hh-rlhf)")
        if self.source == "jsonl" and not self.path:
            raise ValueError("data.source is 'jsonl' but data.path is not set")
        return self


class ChatClientConfig(Section):
    """A language model behind a chat client, shared by the principle writer and the evaluation's judge."""

    # openai / vllm: an OpenAI-compatible endpoint (a hosted API, `vllm serve`, `serve run cluster.serve_app`);
    # hf: a local model through transformers.
    backend: Literal["hf", "vllm", "openai"] = "openai"
    model: Optional[str] = None
    base_url: Optional[str] = None  # OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1
    api_key_env: str = "OPENAI_API_KEY"  # the key is read from this variable, never from the config
    timeout: float = Field(60.0, gt=0.0)
    retries: int = Field(3, ge=0)

    def problems(self, prefix: str) -> list[str]:
        """What keeps the client from being built, each naming the field under `prefix`."""
        out = []
        if not self.model:
            out.append(f"{prefix}.backend is {self.backend!r} but {prefix}.model is not set")
        if self.backend in ("openai", "vllm") and not self.base_url:
            out.append(f"{prefix}.backend is {self.backend!r} but {prefix}.base_url is not set "
                       f"(e.g. http://127.0.0.1:8000/v1)")
        return out


class WriterConfig(ChatClientConfig):
    """The principle writer: an instruct LM that writes principles with their antitheses (paper A.12)."""

    task_description: str = "respond to a human's request in a dialogue"
    seed_principles: list[str] = Field(default_factory=list)
    num_principles: int = Field(4, ge=1)
    max_retries: int = Field(3, ge=0)
    temperature: float = Field(0.7, ge=0.0)
    max_new_tokens: int = Field(1024, ge=16)


class PrinciplesConfig(Section):
    source: Literal["file", "writer", "world"] = "world"
    path: Optional[str] = None  # YAML/JSON principle library (source: file)
    writer: WriterConfig = Field(default_factory=WriterConfig)
    # How the C constitutions of a query differ: the positive one first, then contrasts.
    #   antithesis_one: one principle flipped to its antithesis per contrast
    #   antithesis_all: every principle flipped (the paper's HH setting)
    #   sample_k: k of the training principles per query, contrasts flip a subset (diverse-principle runs)
    #   sample_k_antithesis_all: k of the training principles per query, the contrast flips all k
    mode: Literal["antithesis_one", "antithesis_all", "sample_k", "sample_k_antithesis_all"] = "antithesis_all"
    num_constitutions: int = Field(2, ge=2)
    principles_per_constitution: Optional[int] = Field(None, ge=1)  # k for sample_k
    heldout: list[str] = Field(default_factory=list)  # principle names never used in training

    @model_validator(mode="after")
    def _complete(self):
        """Checked once here, for training and evaluation alike."""
        if self.source == "file" and not self.path:
            raise ValueError("principles.source is 'file' but principles.path is not set")
        if self.source == "writer" and self.writer.problems("principles.writer"):
            raise ValueError("; ".join(self.writer.problems("principles.writer")))
        if self.mode.startswith("sample_k") and self.principles_per_constitution is None:
            raise ValueError(f"principles.mode is {self.mode!r} but principles.principles_per_constitution is not set")
        return self

    @property
    def heldout_names(self) -> tuple[str, ...]:
        """The principles training never states: `heldout`, or those of the built-in library the source names."""
        if self.heldout or self.source in ("file", "writer"):
            return tuple(self.heldout)
        return builtin_library(self.source).heldout

    @property
    def trained_members(self) -> tuple[str, ...]:
        """The members of the built-in library's family (principles of one form: the world's "Mention the word W")
        that training states, one per constitution: those `heldout_names` leaves. None for other sources."""
        return tuple(n for n in self._family if n not in self.heldout_names)

    @property
    def heldout_principles(self) -> tuple[str, ...]:
        """The held-out principles that are not family members (the world's `exclaim`)."""
        return tuple(n for n in self.heldout_names if n not in self._family)

    @property
    def heldout_members(self) -> tuple[str, ...]:
        """The family's members training never states (what the evaluation reads generalisation on)."""
        return tuple(n for n in self._family if n in self.heldout_names)

    @property
    def _family(self) -> tuple[str, ...]:
        return () if self.source in ("file", "writer") else builtin_library(self.source).family


class PromptConfig(Section):
    # base: the paper's text format for base models ("System: ... Human: ... Assistant:", sami/prompts.py); chat: the
    # tokenizer's chat template for instruct models, the constitution as the system message (`ChatPrompts`)
    template: Literal["base", "chat"] = "base"


class SamplingConfig(Section):
    temperature: float = Field(1.0, ge=0.0, le=2.0)  # vLLM refuses > 2 (SamplingParams._verify_args)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_new_tokens: int = Field(64, ge=1)
    batch_size: int = Field(32, ge=1)  # prompts per generate call on one engine


class EngineConfig(Section):
    """A generation engine, shared by the rollout actors, the evaluation job and Serve."""

    engine: Literal["hf", "vllm"] = "hf"
    tensor_parallel_size: int = Field(1, ge=1)  # GPUs per vLLM engine
    gpu_memory_utilization: float = Field(0.85, gt=0.0, le=1.0)
    enable_prefix_caching: bool = True
    enforce_eager: bool = False  # vLLM without graph compilation: slower generation, a start without the compile


class RolloutConfig(EngineConfig):
    num_engines: int = Field(1, ge=1)
    cpus_per_engine: float = Field(1.0, gt=0.0)
    # GPUs of one engine (a vLLM engine: per tensor-parallel rank); None: 1 for vllm, 0 for hf (`engine_gpus`). An hf
    # engine given one runs on it, so rollout nodes serve without vLLM. Below 1 the engine shares its GPU: 0.5 here and
    # scaling.gpus_per_learner=0.5 put the engine and the learner on a one-GPU node's one device.
    gpus_per_engine: Optional[float] = Field(None, ge=0.0, le=1.0)
    sync_bucket_mb: int = Field(256, ge=1)  # object-store buckets; NCCL packed-buffer size
    # auto: NCCL when the learners are on GPU and the engines are vLLM, else the object store. object_store:
    # always, e.g. a learner and an engine sharing one GPU (NCCL refuses two ranks on one device; a share of a
    # GPU per learner with NCCL is refused for that reason).
    weight_sync: Literal["auto", "object_store"] = "auto"
    # |rollout - learner| mean log-prob after a sync; None: by precision (actors/weight_sync.py PROBE_TOLERANCE)
    probe_tolerance: Optional[float] = Field(None, gt=0.0)
    # A dead engine is restarted, given the current weights and probe-checked; this many failures of one
    # engine in one iteration stop the run.
    max_engine_failures: int = Field(3, ge=0)
    # How an iteration's groups reach the learners. ray_data: a Ray Data stream from the engines into every rank,
    # which trains while the engines still generate (actors/data_plane.py). direct: learner rank 0 generates every
    # group, then hands each rank its shard: about 0.2 s an iteration and 2 s a run less where generation is all
    # CPU (tiny model), 0.1 s an iteration more with an engine of realistic speed (benchmarks/README.md, "Data plane").
    data_plane: Literal["ray_data", "direct"] = "ray_data"

    @property
    def engine_gpus(self) -> float:
        """The GPUs one engine (one tensor-parallel rank of a vLLM engine) asks Ray for."""
        if self.gpus_per_engine is not None:
            return self.gpus_per_engine
        return 1.0 if self.engine == "vllm" else 0.0

    @property
    def nccl_sync(self) -> bool:
        """Whether weights reach the engines over NCCL (vLLM engines, weight_sync auto; on GPU learners only)."""
        return self.engine == "vllm" and self.weight_sync == "auto"


class FilterConfig(Section):
    leak_patterns: list[str] = Field(default_factory=lambda: ["[insert", "Human:", "###"])
    min_response_chars: int = Field(1, ge=0)
    drop_identical: bool = True
    # A regular expression every response must match in full (Python `re.fullmatch`), e.g. the built-in
    # world's one-sentence format; a group with a response that does not is dropped as "malformed".
    response_pattern: Optional[str] = None

    @field_validator("response_pattern")
    @classmethod
    def _compiles(cls, pattern):
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"not a valid regular expression ({e})") from None
        return pattern


class SamiObjectiveConfig(Section):
    direction: Literal["both", "row", "column"] = "both"
    reduction: Literal["mean", "sum"] = "mean"  # per-token mean is the paper's length normalisation
    include_eos: bool = True


class DpoObjectiveConfig(Section):
    beta: float = Field(0.1, gt=0.0)
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"


class ObjectiveConfig(Section):
    name: Literal["sami", "sft", "dpo", "sft_then_sami"] = "sami"
    sami: SamiObjectiveConfig = Field(default_factory=SamiObjectiveConfig)
    dpo: DpoObjectiveConfig = Field(default_factory=DpoObjectiveConfig)
    # SAMI's beta * KL(pi || pi_ref) on response tokens; 0 = no reference model. Only SAMI's loss has the term:
    # refused with sft and dpo (whose KL strength is dpo.beta); sft_then_sami's SFT iterations train without it.
    kl_beta: float = Field(0.0, ge=0.0)
    # SAMI's KL term: `k3` estimates it from the scored tokens (unbiased only where pi sampled them: the diagonal
    # pairs); `exact` sums over the vocabulary at each response position (chunked, as the log-probs are).
    kl_estimator: Literal["k3", "exact"] = "k3"
    kl_pairs: Literal["all", "diagonal"] = "all"  # which (constitution, response) pairs of the C x C matrix it covers
    sft_weight: float = Field(0.0, ge=0.0)  # loss = sami + sft_weight * sft (weighted combination)
    sft_iterations: int = Field(1, ge=0)  # sft_then_sami: iterations of SFT before SAMI


class OptimConfig(Section):
    name: Literal["adamw", "rmsprop"] = "adamw"
    lr: float = Field(5e-7, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = Field(1.0, ge=0.0)
    groups_per_step: int = Field(128, ge=1)  # query groups per optimiser step, all learners together
    micro_batch_groups: int = Field(1, ge=1)  # query groups per forward pass on one learner


class ScheduleConfig(Section):
    # base: every iteration re-trains the base weights (the paper); previous: plain continuation.
    init: Literal["base", "previous"] = "previous"
    steps_per_iteration: int = Field(2, ge=1)
    # paper: iteration k trains steps_per_iteration * k steps (2, 4, 6 with the default 2)
    grow_steps: bool = False
    # alternate two disjoint query splits so a model never trains on queries it generated for
    alternate_splits: bool = False
    # sync: iteration k's groups come from the weights of k-1 (on-policy). one_step_off: the engines generate
    # iteration k+1's groups (from the weights of k-1, staleness 1) while the learners train iteration k.
    rollout: Literal["sync", "one_step_off"] = "sync"


class DeepSpeedConfig(Section):
    zero_stage: Literal[0, 1, 2, 3] = 2
    # bf16 mixed precision (bf16 weights, a float32 master copy in the optimiser). auto: on where the learner has a
    # GPU and model.dtype is bf16 there (sami/precision.py); off: the learner trains float32 weights.
    bf16: Literal["auto", True, False] = "auto"


class ScalingConfig(Section):
    num_learners: int = Field(1, ge=1)
    gpus_per_learner: float = Field(0.0, ge=0.0)
    # Fractional CPUs leave room for Ray Data and the actors on small machines (2 cores).
    cpus_per_learner: float = Field(0.5, gt=0.0)
    # A failed learner worker restarts the whole learner group from the last complete iteration, this many times.
    max_learner_failures: int = Field(2, ge=0)
    # The learners' process group: auto, NCCL where every learner sees a CUDA device (and gloo elsewhere: a CPU, or a
    # cluster whose GPUs are logical only), decided on the learners' own GPUs (pipelines/torch_backend.py); gloo
    # trains on the CPU.
    torch_backend: Literal["auto", "nccl", "gloo"] = "auto"
    # The one wait for resources: the learners' and the engines' placement groups together (nodes an autoscaler starts
    # from 0 included), and Ray Train's wait for its worker group (a restart after a lost node too).
    placement_timeout_s: float = Field(1800.0, gt=0.0)


class ClusterConfig(Section):
    # The memory of each GPU in GB (10^9 bytes), for a cluster that ray_cluster.yaml does not describe; None: the
    # memory of the GPUs of the node type each role lands on there (the memory plan of --dry-run).
    gpu_memory_gb: Optional[float] = Field(None, gt=0.0, le=1024.0)


class CheckpointConfig(Section):
    deepspeed: bool = True
    export_hf: bool = True


class TensorBoardSettings(Section):
    log_dir: Optional[str] = None  # default <run.output_dir>/tensorboard (`tensorboard --logdir` opens it)


class MLflowSettings(Section):
    # None: a SQLite store under the run folder (sqlite:///<run.output_dir>/mlflow.db); else a server
    # (http://127.0.0.1:5000) or any store URI MLflow takes. A token or password comes from MLFLOW_TRACKING_TOKEN /
    # MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, never from here.
    tracking_uri: Optional[str] = None

    @field_validator("tracking_uri")
    @classmethod
    def _no_password(cls, uri):
        if uri and "@" in uri.partition("://")[2].split("/")[0]:
            raise ValueError("holds credentials; give them in MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD or "
                             "MLFLOW_TRACKING_TOKEN instead (a config file is saved with the run)")
        return uri


class WandbSettings(Section):
    project: Optional[str] = None  # default tracking.experiment
    entity: Optional[str] = None  # a team or user; default the API key's user
    mode: Literal["online", "offline"] = "online"  # offline: run files under <run.output_dir>/wandb (`wandb sync`)


class TrackingConfig(Section):
    """Experiment trackers the figures also go to (metrics.jsonl stays the record): learner rank 0 of training and
    the evaluation job's driver log there (sami/tracking.py). Keys come from the environment the trackers read
    (WANDB_API_KEY, MLFLOW_TRACKING_TOKEN, ...), never from a config file."""

    trackers: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(default_factory=list)
    experiment: str = Field("sami", min_length=1)  # MLflow's experiment; W&B's project unless wandb.project is set
    run_name: Optional[str] = None  # default run.name
    tags: dict[str, str] = Field(default_factory=dict)
    # The training run folder this job's tracker runs are linked to (`evals.run --run DIR` sets it)
    training_run: Optional[str] = None
    tensorboard: TensorBoardSettings = Field(default_factory=TensorBoardSettings)
    mlflow: MLflowSettings = Field(default_factory=MLflowSettings)
    wandb: WandbSettings = Field(default_factory=WandbSettings)


class TrainConfig(Section):
    run: RunConfig = Field(default_factory=RunConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    principles: PrinciplesConfig = Field(default_factory=PrinciplesConfig)
    prompt: PromptConfig = Field(default_factory=PromptConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    filters: FilterConfig = Field(default_factory=FilterConfig)
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _cross_checks(self):
        if self.rollout.engine == "vllm" and self.scaling.gpus_per_learner == 0:
            raise ValueError("rollout.engine is 'vllm' (GPU only) but scaling.gpus_per_learner is 0")
        if self.scaling.torch_backend == "nccl" and self.scaling.gpus_per_learner == 0:
            raise ValueError("scaling.torch_backend is 'nccl' (GPU only) but scaling.gpus_per_learner is 0")
        r = self.rollout
        if r.engine == "vllm" and r.engine_gpus == 0:
            raise ValueError("rollout.engine is 'vllm' (GPU only) but rollout.gpus_per_engine is 0")
        if r.engine == "vllm" and r.engine_gpus < 1 and r.tensor_parallel_size > 1:
            raise ValueError(f"rollout.gpus_per_engine ({r.engine_gpus}) below 1 needs rollout.tensor_parallel_size "
                             f"1, not {r.tensor_parallel_size} (a tensor-parallel engine takes whole GPUs)")
        if r.engine_gpus < 1 and self.nccl_sync:
            raise ValueError(f"rollout.gpus_per_engine ({r.engine_gpus}) shares a GPU, and the NCCL weight sync "
                             f"(rollout.weight_sync=auto) refuses two ranks on one device: set rollout.weight_sync="
                             f"object_store")
        if self.optim.groups_per_step % self.scaling.num_learners:
            raise ValueError(
                f"optim.groups_per_step ({self.optim.groups_per_step}) must be a multiple of "
                f"scaling.num_learners ({self.scaling.num_learners})"
            )
        o, gpus = self.objective, self.scaling.gpus_per_learner
        if o.kl_beta > 0 and o.name in ("sft", "dpo"):  # sami/objectives.py: OBJECTIVES[...].kl_term
            raise ValueError(f"objective.kl_beta is {o.kl_beta} but objective.name {o.name!r} has no KL term (SAMI's "
                             f"loss has; DPO's strength is objective.dpo.beta): set objective.kl_beta=0")
        if o.kl_beta > 0 and o.name == "sft_then_sami" and o.sft_iterations >= self.run.iterations:
            raise ValueError(f"objective.kl_beta is {o.kl_beta} but every iteration is SFT (objective.sft_iterations "
                             f"{o.sft_iterations}, run.iterations {self.run.iterations}), which has no KL term")
        if gpus != int(gpus) and self.scaling.num_learners > 1:
            raise ValueError(f"scaling.gpus_per_learner is {gpus}, a share of a GPU, with scaling.num_learners "
                             f"{self.scaling.num_learners}: Ray packs shares onto the fullest GPU that fits, so two "
                             f"learners would share one device that DeepSpeed gives each rank as its own: set a whole "
                             f"number of GPUs per learner")
        if self.nccl_sync and gpus != int(gpus):
            raise ValueError(f"scaling.gpus_per_learner is {gpus}, a share of a GPU, but rollout.weight_sync 'auto' "
                             f"syncs vLLM engines over NCCL, which refuses two ranks on one GPU: set "
                             f"rollout.weight_sync=object_store or a whole number of GPUs per learner")
        if self.model.lora.enabled and self.model.lora.export_merged and self.deepspeed.zero_stage == 3:
            raise ValueError("model.lora.export_merged is true but deepspeed.zero_stage is 3, whose partitioned base "
                             "rank 0 cannot merge alone: export the adapter only (merge it later with peft's "
                             "merge_and_unload) or use zero_stage 2")
        return self

    @property
    def nccl_sync(self) -> bool:
        """Whether weights reach the engines over NCCL: `rollout.nccl_sync`, except under LoRA, whose adapter (MiB,
        not GiB) goes through the object store and a folder (vLLM loads an adapter from a folder only)."""
        return self.rollout.nccl_sync and not self.model.lora.enabled

    def with_absolute_paths(self) -> "TrainConfig":
        """A copy whose paths are absolute, read against the driver's working directory: Ray Train moves each learner
        into a session folder of its own, where a relative path names another file (or none). A model or data set
        name stays a name unless a local folder or file of that name exists, as `from_pretrained` reads it."""
        cfg = self.model_copy(deep=True)
        cfg.run.output_dir = absolute(cfg.run.output_dir)
        cfg.model.name_or_path = absolute(cfg.model.name_or_path, only_if_local=True)
        cfg.model.tokenizer = absolute(cfg.model.tokenizer, only_if_local=True)
        cfg.data.path = absolute(cfg.data.path)
        cfg.data.dataset = absolute(cfg.data.dataset, only_if_local=True)
        cfg.data.replay_groups_from = absolute(cfg.data.replay_groups_from)
        cfg.principles.path = absolute(cfg.principles.path)
        cfg.tracking.tensorboard.log_dir = absolute(cfg.tracking.tensorboard.log_dir)
        return cfg

    def steps_for_iteration(self, iteration: int) -> int:
        """Optimiser steps in 1-based `iteration` (the paper's 2η when grow_steps)."""
        s = self.schedule
        return s.steps_per_iteration * (iteration if s.grow_steps else 1)


def absolute(path: Optional[str], only_if_local: bool = False) -> Optional[str]:
    """`path` made absolute; with `only_if_local`, only where it names something on this machine or is spelt as a
    path (./, ../, ~, /), so a hub name stays a hub name."""
    if path is None or (only_if_local and not (Path(path).expanduser().exists() or path.startswith((".", "/", "~")))):
        return path
    return str(Path(path).expanduser().resolve())


# ---------------------------------------------------------------------------------------------------------
# Loading


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`["optim.lr=1e-4", "run.iterations=3"]` -> nested dict; values are parsed as YAML scalars/lists."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        key, raw = item.split("=", 1)
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({e})") from None
        if isinstance(value, str) and _FLOAT.fullmatch(value):
            value = float(value)  # YAML 1.1 reads "1e-4" as a string
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override of {part!r}")
        node[parts[-1]] = value
    return nested


def _deep_merge(base: dict | list, update: dict) -> dict | list:
    """Merge overrides into the YAML data; a numeric key indexes a list (`models.1.path=...`)."""
    if isinstance(base, list):
        out = list(base)
        for k, v in update.items():
            if not (k.isdigit() and int(k) < len(out)):
                raise ConfigError(f"override index {k!r} is out of range: the list has {len(out)} entries")
            i = int(k)
            out[i] = _deep_merge(out[i], v) if isinstance(v, dict) and isinstance(out[i], (dict, list)) else v
        return out
    out = dict(base)
    for k, v in update.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), (dict, list)) else v
    return out


def format_validation_error(err: ValidationError, source: str, schema: Optional[type[BaseModel]] = None) -> str:
    """One line per problem, each naming its dotted field; an unknown field names the nearest field of `schema` at
    that place."""
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "<top level>"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            lines.append(f"  {field}: unknown field{nearest_field(schema, e['loc'])}")
        elif e["type"] == "missing":
            lines.append(f"  {field}: required field is missing")
        elif not e["loc"]:  # a check across sections names its fields itself; the input is the whole config
            lines.append(f"  {msg}")
        else:
            lines.append(f"  {field}: {msg} (got {e.get('input')!r})")
    if len(lines) == 2:  # one problem: one line
        return f"{lines[0]} {lines[1].strip()}"
    return "\n".join(lines)


def fields_at(schema: Optional[type], loc: tuple) -> Optional[list[str]]:
    """The field names of the section at `loc` (a pydantic location: names, and indexes into lists) of `schema`."""
    for part in loc:
        if schema is None:
            return None
        if isinstance(part, int):
            args = [a for a in get_args(schema) if a is not type(None)]
            schema = args[0] if args else None
            continue
        field = getattr(schema, "model_fields", {}).get(part)
        schema = field.annotation if field is not None else None
        while get_origin(schema) is Union:  # Optional[Section]
            schema = next(a for a in get_args(schema) if a is not type(None))
    return list(schema.model_fields) if isinstance(schema, type) and issubclass(schema, BaseModel) else None


def nearest_field(schema: Optional[type], loc: tuple) -> str:
    """'; did you mean x.y?' for the field nearest in spelling, else the fields there (or the old hint)."""
    known = fields_at(schema, loc[:-1])
    if not known:
        return " (check the spelling)"
    prefix = "".join(f"{p}." for p in loc[:-1])
    close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {prefix}{close[0]}?"
    return f" (the fields of {prefix.rstrip('.') or 'the top level'}: {', '.join(known)})"


# The evaluation job's own top-level sections (evals/config.py's EvalConfig; tests/test_config.py keeps the two in
# step): a training command given a config of them was given an evaluation config.
EVALUATION_SECTIONS = ("models", "baseline", "num_queries", "generation", "judge", "win_rates", "mi_bound", "adherence",
                       "mtbench", "gsm8k")


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        inside = " (a run folder: give its config.yaml)" if (p / "config.yaml").is_file() else ""
        raise ConfigError(f"--config {p} is a directory, not a config file{inside}: give a YAML file such as "
                          f"configs/tiny.yaml")
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
    if data is None:  # a run of nothing but defaults would be planned without a word: say so instead
        raise ConfigError(f"config file {p} is empty (or only comments): give at least one section (configs/tiny.yaml "
                          f"is a small example), or leave out --config to run on the built-in world")
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping at the top level, got {type(data).__name__}")
    return data


def wrong_kind(model_cls: type[BaseModel], data: dict[str, Any], source: str) -> Optional[str]:
    """The line for a config of the other job (an evaluation config given to training, or the reverse): its unknown
    top-level sections all belong to the other job."""
    unknown = sorted(set(data) - set(model_cls.model_fields))
    if not unknown:
        return None
    named = ", ".join(unknown[:4]) + (", ..." if len(unknown) > 4 else "")
    if model_cls is TrainConfig and set(unknown) <= set(EVALUATION_SECTIONS):
        return (f"{source} is an evaluation config (it has {named}), not a training config: run it with "
                f"python -m evals.run --config {source}")
    if model_cls is not TrainConfig and set(unknown) <= set(TrainConfig.model_fields):
        return (f"{source} is a training config (it has {named}), not an evaluation config: train with "
                f"python -m pipelines.train --config {source}, then evaluate the run with "
                f"python -m evals.run --run <its run.output_dir>")
    return None


def build_config(model_cls: type[BaseModel], data: dict[str, Any], overrides: list[str], source: str):
    merged = _deep_merge(data, parse_overrides(overrides))
    try:
        return model_cls.model_validate(merged)
    except ValidationError as e:
        raise ConfigError(wrong_kind(model_cls, merged, source) or format_validation_error(e, source, model_cls)) \
            from None


def load_config(path: Optional[str | os.PathLike] = None, overrides: Optional[list[str]] = None,
                model_cls: type[BaseModel] = TrainConfig):
    """Load `path` (or the defaults when None), apply overrides, validate. Raises ConfigError."""
    data = load_yaml(path) if path is not None else {}
    return build_config(model_cls, data, overrides or [], str(path) if path else "defaults")


def dump_config(cfg: BaseModel, path: str | os.PathLike) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


def config_differences(old: BaseModel, new: BaseModel) -> dict[str, tuple[Any, Any]]:
    """Dotted field -> (old value, new value) for every setting that differs between two configs."""
    def flat(data: dict, prefix: str = "") -> dict[str, Any]:
        out = {}
        for key, value in data.items():
            out.update(flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
        return out

    a, b = flat(old.model_dump(mode="json")), flat(new.model_dump(mode="json"))
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
