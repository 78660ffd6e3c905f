"""Memory per GPU of each role (learner, rollout engine) before launch, from the model's config alone.

Nothing is loaded: the model's shape comes from its `config.json` (a local folder, the Hugging Face cache, or a
published shape shipped in `configs/model_shapes/`), and the parameters are counted from it exactly (embeddings,
attention with its key/value heads, MLP with every expert and the router, norms, the LM head unless tied).

A learner GPU holds, under DeepSpeed ZeRO stage s over n learners (the ZeRO paper, Rajbhandari et al. 2020, §5;
DeepSpeed's `zero_optimization.stage`: 1 partitions the optimizer state, 2 adds the gradients, 3 the parameters),
with Ψ the model's parameters, T those trained (Ψ, or a LoRA adapter's), w the bytes of a learner weight (2 under
bf16 mixed precision, else 4):
  weights      w·Ψ, w·Ψ/n under ZeRO-3
  gradients    w·T, w·T/n from ZeRO-2
  optimizer    T·(4·states + 4 for the fp32 master copy under bf16), /n from ZeRO-1 (AdamW: 2 states, RMSprop: 1)
  reference    the frozen model (KL, DPO, `init: base`): w·Ψ as a full copy on every GPU, w·Ψ/n partitioned;
               none under LoRA (the base with the adapter off)
  activations  an estimate (`activation_bytes_per_token`): the tensors autograd keeps per token and layer, no
               gradient checkpointing, times the tokens of one micro-batch at the longest prompt and response
  buffers      DeepSpeed's defaults: a 5e8-element reduce bucket and a 5e8-element all-gather bucket (ZeRO-1/2), or
               the parameters ZeRO-3 keeps gathered (stage3_max_live_parameters, 1e9, or the largest layer)
  CUDA context 1 GB (CUDA, cuBLAS and NCCL's own allocations)
How today's learner places the weights and the reference is `LearnerLayout` (TODAY): every rank loads the whole
model, which DeepSpeed moves to its GPU before ZeRO-3 partitions it (a peak "while loading"), the reference is a full
copy per GPU, and the weight sync gathers the whole ZeRO-3 model on every GPU at once (a peak "while syncing": the
model whole beside the optimizer state, gradients and reference, activations freed).

A vLLM engine claims `gpu_memory_utilization` of each of its GPUs; the weights take w·Ψ/tp of it, the rest holds
the KV cache (2 · layers · key/value heads · head dim · w bytes per token, split over tp) and vLLM's working memory.
GB here are 10^9 bytes, and a GPU's memory is its nominal size (an "80 GB" A100 has 85.9e9 bytes: the rest is
margin for the allocator's fragmentation).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, Mapping, Optional

from sami.config import TrainConfig
from sami.precision import deepspeed_bf16, model_dtype

GB = 1e9
SHAPES_DIR = Path(__file__).resolve().parents[1] / "configs" / "model_shapes"
CUDA_CONTEXT_BYTES = 1 * GB
REDUCE_BUCKET, ALLGATHER_BUCKET = 5e8, 5e8  # DeepSpeed 0.19.8 zero_optimization defaults, in elements
ZERO3_MAX_LIVE = 1e9  # stage3_max_live_parameters default
LOGITS_CHUNK = 512  # positions the packed layouts run the LM head on at a time (sami/logprobs.py)


@dataclass(frozen=True)
class LearnerLayout:
    """Where the learner puts its weights and its reference: sami/learner.py's `Learner.__init__` today."""

    loading: Literal["whole", "partitioned"] = "whole"  # whole: the full model on every GPU before ZeRO-3 splits it
    reference: Literal["full_copy", "partitioned"] = "full_copy"
    # whole: the weight sync and the probe gather every ZeRO-3 parameter at once (actors/weight_sync.py: push)
    sync: Literal["whole", "bucketed"] = "whole"
    checkpointing: bool = False  # gradient checkpointing (the learner has no setting for it yet)


PARTITIONED = LearnerLayout("partitioned", "partitioned", "bucketed")  # what the learner is to become


TODAY = LearnerLayout()


# ---------------------------------------------------------------------------------------------------------
# The model's shape and parameters


@dataclass(frozen=True)
class ModelShape:
    """A Llama/Mistral/Mixtral/Qwen2-style decoder, as its config.json describes it."""

    hidden: int
    layers: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    experts: int = 1  # Mixtral's num_local_experts; 1 for a dense MLP
    experts_per_token: int = 1
    tied: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False

    @classmethod
    def from_config(cls, config) -> "ModelShape":
        """From a config.json dict or a transformers `PretrainedConfig`; KeyError/TypeError when it is no decoder."""
        c = config if isinstance(config, Mapping) else config.to_dict()
        h, heads = c["hidden_size"], c["num_attention_heads"]
        qwen2 = c.get("model_type") == "qwen2"  # q, k, v with biases, o without
        experts = c.get("num_local_experts") or 1
        return cls(hidden=h, layers=c["num_hidden_layers"], vocab=c["vocab_size"], heads=heads,
                   kv_heads=c.get("num_key_value_heads") or heads, head_dim=c.get("head_dim") or h // heads,
                   intermediate=c.get("intermediate_size") or 4 * h, experts=experts,
                   experts_per_token=c.get("num_experts_per_tok") or 1 if experts > 1 else 1,
                   tied=bool(c.get("tie_word_embeddings", False)), qkv_bias=qwen2 or bool(c.get("attention_bias")),
                   o_bias=bool(c.get("attention_bias")), mlp_bias=bool(c.get("mlp_bias")))

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear layer of one decoder layer (one expert's MLP), by name."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_dim, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def layer_parameters(self) -> int:
        """One decoder layer: attention, every expert's MLP, the router, two RMSNorms."""
        s, q = self.linear_shapes(), self.heads * self.head_dim
        attention = sum(a * b for name, (a, b) in s.items() if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")))
        attention += (q + 2 * self.kv_dim) * self.qkv_bias + self.hidden * self.o_bias
        mlp = 3 * self.hidden * self.intermediate + (2 * self.intermediate + self.hidden) * self.mlp_bias
        router = self.hidden * self.experts if self.experts > 1 else 0
        return attention + mlp * self.experts + router + 2 * self.hidden

    def parameters(self) -> int:
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)  # input embedding, LM head unless tied
        return self.layers * self.layer_parameters() + embeddings + self.hidden  # + the final norm

    def lora_parameters(self, rank: int, targets: list[str]) -> int:
        """An adapter's parameters: rank x (in + out) per targeted linear layer (A and B), in every layer (a Mixtral
        expert's MLP layers are not counted: only attention targets are meant there)."""
        shapes = self.linear_shapes()
        return self.layers * sum(rank * sum(shapes[t]) for t in targets if t in shapes)

    def kv_bytes_per_token(self, weight_bytes: int) -> int:
        """A token's keys and values in every layer (what a vLLM engine's KV cache holds per token)."""
        return 2 * self.layers * self.kv_dim * weight_bytes


def count_parameters(config) -> int:
    """Parameters of a Llama/Mistral/Mixtral/Qwen2-style decoder from its config (exact for those)."""
    return ModelShape.from_config(config).parameters()


def lora_parameters(config, rank: int, targets: list[str]) -> int:
    return ModelShape.from_config(config).lora_parameters(rank, targets)


def model_folder(name_or_path: str) -> Path | None:
    """The local HF folder behind the name, if there is one (a built-in world model only once it is cached)."""
    if name_or_path.startswith("builtin:"):
        from sami.world.base_model import builtin_spec, cache_root, spec_hash

        folder = cache_root() / f"base-{spec_hash(builtin_spec(name_or_path))}"
        return folder if (folder / "READY").is_file() else None
    folder = Path(name_or_path)
    return folder if (folder / "config.json").is_file() else None


def cached_hub_config(name: str) -> Path | None:
    """The config.json of a hub model already in the Hugging Face cache (nothing is downloaded)."""
    if name.startswith(("builtin:", "/", ".", "~")):
        return None
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(name, "config.json")
    except ValueError:  # not a hub name (HFValidationError)
        return None
    return Path(found) if isinstance(found, str) else None


def published_shape(name_or_path: str) -> Path | None:
    """The shipped config.json (configs/model_shapes/<family>.json) whose family the name contains."""
    lowered = name_or_path.lower()
    return next((p for p in sorted(SHAPES_DIR.glob("*.json")) if p.stem in lowered), None)


def model_config(name_or_path: str) -> tuple[dict | None, str]:
    """(the model's config.json as a dict, or None; where it came from): a local folder, the hub cache, or a
    published shape of the model's family."""
    folder = model_folder(name_or_path)
    cached = None if folder else cached_hub_config(name_or_path)
    path = folder / "config.json" if folder else cached or published_shape(name_or_path)
    if path is None:
        return None, ""
    source = f"published shape {path.relative_to(SHAPES_DIR.parents[1])}" if path.parent == SHAPES_DIR else str(path)
    try:
        return json.loads(Path(path).read_text()), source
    except ValueError:
        return {}, source  # counted as not a Llama-style config


# ---------------------------------------------------------------------------------------------------------
# The learner


def activation_bytes_per_token(shape: ModelShape, weight_bytes: int, checkpointing: bool = False) -> int:
    """An estimate of what autograd keeps per token through every layer (SDPA/flash attention, which keeps no T x T
    scores). Per layer, in elements of `weight_bytes`: attention's input, q, k, v and output (3h + 2·kv); the MLP's
    input and, per expert a token goes to, gate, up, SiLU(gate) and their product (h + k·4i, plus a copy of the
    input per expert: k·h when routed); each RMSNorm its float32 input (4 bytes) and its normalised output (h). The
    final norm once. Under gradient checkpointing each layer keeps its input (h) and one layer at a time is
    recomputed whole."""
    h, k = shape.hidden, shape.experts_per_token
    routed = k * h if shape.experts > 1 else 0
    norm = 4 * h + weight_bytes * h
    layer = weight_bytes * (3 * h + 2 * shape.kv_dim + h + routed + k * 4 * shape.intermediate) + 2 * norm
    if checkpointing:
        return shape.layers * weight_bytes * h + layer + norm
    return shape.layers * layer + norm


def micro_batch_tokens(cfg: TrainConfig) -> tuple[int, int]:
    """(tokens of the largest forward pass of one micro-batch, positions whose float32 log-softmax autograd keeps):
    at the longest prompt and response, under every iteration's scoring (sami/learner.py: `forward_tokens`)."""
    from sami.objectives import scoring_for  # torch: imported once a plan is asked for, not by every CLI start

    prompt = cfg.model.max_prompt_tokens
    response = min(cfg.model.max_response_tokens, cfg.sampling.max_new_tokens) + 1  # + EOS
    micro, worst = cfg.optim.micro_batch_groups, (0, 0)
    for iteration in range(1, cfg.run.iterations + 1):
        s = scoring_for(cfg, iteration)
        if s.layout == "pairs":  # each pair a padded sequence; every chunk's log-softmax saved
            tokens = micro * len(s.pairs) * (prompt + response)
            figures = (tokens, tokens)
        else:  # each prompt once with its C responses behind it; the head recomputed chunk by chunk
            figures = (micro * s.c * (prompt + s.c * response), LOGITS_CHUNK)
        worst = max(worst, figures)
    return worst


@dataclass
class LearnerMemory:
    """Bytes on one learner GPU while it trains, by what holds them, and its peaks outside training by when."""

    stage: int
    figures: dict[str, float]  # weights, gradients, optimizer, reference, activations, buffers, CUDA context
    peaks: dict[str, float] = field(default_factory=dict)  # "while loading", "while syncing"
    module: float = 0.0  # the whole model (and adapter) in the learner's dtype

    @property
    def steady(self) -> float:
        return sum(self.figures.values())

    @property
    def needed(self) -> float:
        return max([self.steady, *self.peaks.values()])


def learner_memory(cfg: TrainConfig, shape: ModelShape, layout: LearnerLayout = TODAY, stage: Optional[int] = None,
                   learners: Optional[int] = None) -> LearnerMemory:
    """One learner GPU under `stage` (default the config's) over `learners` ranks (default the config's)."""
    from sami.objectives import run_needs_reference  # torch, as in micro_batch_tokens

    stage = cfg.deepspeed.zero_stage if stage is None else stage
    n = learners or cfg.scaling.num_learners
    bf16 = deepspeed_bf16(cfg, use_gpu=True)
    w = 2 if bf16 else 4
    total = shape.parameters()
    lora = cfg.model.lora
    adapter = shape.lora_parameters(lora.rank, lora.target_modules) if lora.enabled else 0
    trained = adapter or total
    states = 2 if cfg.optim.name == "adamw" else 1
    module = (total + adapter) * w
    reference = 0.0
    if not lora.enabled and (run_needs_reference(cfg) or cfg.schedule.init == "base"):
        reference = total * w / (n if layout.reference == "partitioned" else 1)
    tokens, logit_positions = micro_batch_tokens(cfg)
    if stage == 3:
        gathered = max(shape.layer_parameters(), min(total, ZERO3_MAX_LIVE)) * w
        buffers = gathered + min(trained, REDUCE_BUCKET) * w
    else:
        buffers = (min(trained, REDUCE_BUCKET) + (min(trained, ALLGATHER_BUCKET) if stage else 0)) * w
    figures = {
        "weights": module / (n if stage == 3 else 1),
        "gradients": trained * w / (n if stage >= 2 else 1),
        "optimizer": trained * (4 * states + (4 if bf16 else 0)) / (n if stage >= 1 else 1),
        "reference": reference,
        "activations": tokens * activation_bytes_per_token(shape, w, layout.checkpointing)
                       + logit_positions * shape.vocab * 4,
        "buffers": buffers,
        "CUDA context": CUDA_CONTEXT_BYTES,
    }
    peaks = {}
    if stage == 3 and layout.loading == "whole":
        peaks["while loading"] = module + reference + CUDA_CONTEXT_BYTES
    if stage == 3 and layout.sync == "whole":  # the rest of the model gathered; no activations
        peaks["while syncing"] = sum(figures.values()) - figures["activations"] + module - figures["weights"]
    return LearnerMemory(stage, figures, peaks, module)


def fastest_fitting_stage(cfg: TrainConfig, shape: ModelShape, gpu_bytes: float,
                          layout: LearnerLayout = TODAY) -> Optional[int]:
    """The ZeRO stage that trains fastest among those that fit: ZeRO-0, 1 and 2 move the same bytes per step as
    plain data parallelism (2Ψ: the ZeRO paper, §7), ZeRO-3 half as much again plus a gather of every layer in the
    forward and the backward pass; among equal traffic the one with the most memory left (ZeRO-2) wins."""
    return next((stage for stage in (2, 3) if learner_memory(cfg, shape, layout, stage).needed <= gpu_bytes), None)


def learner_advice(cfg: TrainConfig, shape: ModelShape, gpu_bytes: float, layout: LearnerLayout = TODAY) -> str:
    """What to change so that a learner GPU fits: the ZeRO stage, then the micro-batch, then more learners."""
    stage = fastest_fitting_stage(cfg, shape, gpu_bytes, layout)
    if stage is not None:
        return f"set deepspeed.zero_stage={stage}"
    if cfg.optim.micro_batch_groups > 1:
        smaller = cfg.model_copy(deep=True)
        smaller.optim.micro_batch_groups = 1
        stage = fastest_fitting_stage(smaller, shape, gpu_bytes, layout)
        if stage is not None:
            return f"set optim.micro_batch_groups=1 (and deepspeed.zero_stage={stage})"
    n = cfg.scaling.num_learners
    more = next((k * n for k in (2, 4, 8) if learner_memory(cfg, shape, layout, 3, k * n).needed <= gpu_bytes), None)
    if more is not None:
        return f"set deepspeed.zero_stage=3 and scaling.num_learners={more} (or more)"
    partitioned = replace(PARTITIONED, checkpointing=layout.checkpointing)
    if layout != partitioned and learner_memory(cfg, shape, partitioned, 3).needed <= gpu_bytes:
        return f"no setting fits it on {gpu_bytes / GB:g} GB GPUs with this learner, which {_learner_today(cfg, shape)}"
    return "lower model.max_prompt_tokens or model.max_response_tokens, or use GPUs with more memory"


def _learner_today(cfg: TrainConfig, shape: ModelShape) -> str:
    """What keeps today's learner from fitting where a partitioned one would (for the refusal)."""
    reasons = ["loads the whole model on every GPU before ZeRO-3 partitions it"]
    if learner_memory(cfg, shape, TODAY, 3).figures["reference"]:
        reasons.append("keeps a full reference copy on each")
    reasons.append("gathers the whole model on each to sync it")
    return ", ".join(reasons[:-1]) + " and " + reasons[-1]


# ---------------------------------------------------------------------------------------------------------
# The rollout engine


@dataclass
class EngineMemory:
    """Bytes on one GPU of a rollout engine: what it claims, its share of the weights, its KV cache's needs."""

    claim: float  # vLLM: gpu_memory_utilization of the GPU; an HF engine: the whole GPU
    weights: float
    kv_per_token: float  # this GPU's share of a token's keys and values
    kv_needed: float  # one sequence of the longest prompt and response (vLLM), a whole batch of them (HF)
    sequence_tokens: int

    @property
    def needed(self) -> float:
        return self.weights + self.kv_needed


def engine_memory(cfg: TrainConfig, shape: ModelShape, gpu_bytes: float) -> EngineMemory:
    r = cfg.rollout
    w = 4 if model_dtype(cfg.model.dtype, use_gpu=True) == "float32" else 2
    tp = r.tensor_parallel_size if r.engine == "vllm" else 1
    sequence = cfg.model.max_prompt_tokens + min(cfg.model.max_response_tokens, cfg.sampling.max_new_tokens)
    per_token = shape.kv_bytes_per_token(w) / tp
    if r.engine == "vllm":
        return EngineMemory(r.gpu_memory_utilization * gpu_bytes, shape.parameters() * w / tp, per_token,
                            sequence * per_token, sequence)
    return EngineMemory(gpu_bytes, shape.parameters() * w, per_token, cfg.sampling.batch_size * sequence * per_token,
                        sequence)


def engine_advice(cfg: TrainConfig) -> str:
    if cfg.rollout.engine == "vllm":
        return "raise rollout.tensor_parallel_size or rollout.gpu_memory_utilization"
    return "lower sampling.batch_size, or use a vLLM engine with rollout.tensor_parallel_size"


# ---------------------------------------------------------------------------------------------------------
# The plan


@dataclass(frozen=True)
class Gpu:
    """A role's GPU: its name, its memory, and where that came from."""

    name: str
    gb: float
    source: str

    def __str__(self) -> str:
        return f"{self.name} ({self.source})"


def _gb(nbytes: float) -> str:
    return f"{nbytes / GB:.1f}"


def _breakdown(figures: dict[str, float]) -> str:
    return ", ".join(f"{k} {_gb(v)}" for k, v in figures.items() if v)


def layout_line(layout: LearnerLayout) -> str:
    load = ("the whole model loaded on every GPU before ZeRO-3 partitions it" if layout.loading == "whole" else
            "each GPU loads its partition of the model")
    ref = "a full reference copy per GPU" if layout.reference == "full_copy" else "the reference partitioned"
    sync = "the whole model gathered to sync it" if layout.sync == "whole" else "synced in buckets"
    return f"  learner assumed: {load}; {ref} (KL, DPO, init: base); {sync}; " \
           f"{'with' if layout.checkpointing else 'no'} gradient checkpointing"


def _peak_note(when: str, m: LearnerMemory) -> str:
    whole = f"the whole model, {_gb(m.module)} GB,"
    if when == "while loading":
        reference = f" and the reference, {_gb(m.figures['reference'])} GB," if m.figures["reference"] else ""
        return f"{whole}{reference} on the GPU before ZeRO-3 partitions the model"
    return f"{whole} gathered to sync it, beside the optimizer state, gradients and reference"


def learner_lines(cfg: TrainConfig, shape: ModelShape, gpu: Optional[Gpu], budget: float,
                  layout: LearnerLayout) -> tuple[list[str], Optional[str]]:
    """The learner GPU's rows and, where it does not fit, the one-line refusal."""
    m = learner_memory(cfg, shape, layout)
    precision = "bf16 with an fp32 master copy" if deepspeed_bf16(cfg, use_gpu=True) else "fp32"
    tokens = micro_batch_tokens(cfg)[0]
    notes = {"activations": f"{tokens:,} tokens a micro-batch of {cfg.optim.micro_batch_groups} group(s), "
                            f"an estimate, {'with' if layout.checkpointing else 'no'} gradient checkpointing"}
    lines = [f"  learner GPU (1 of {cfg.scaling.num_learners}, ZeRO-{m.stage}, {precision}, {cfg.optim.name})"
             + (f" on {gpu}" if gpu else "")]
    lines += [f"    {k:<14}{_gb(v):>7}" + (f"   {notes[k]}" if k in notes else "") for k, v in m.figures.items()]
    for when, nbytes in m.peaks.items():
        lines.append(f"    {when:<14}{_gb(nbytes):>7}   {_peak_note(when, m)}")
    if gpu is None:
        lines.append(f"    {'total':<14}{_gb(m.needed):>7}   GPU memory unknown: set cluster.gpu_memory_gb to check it")
        return lines, None
    stages = ", ".join(f"{s}: {_gb(learner_memory(cfg, shape, layout, s).needed)}" for s in (0, 1, 2, 3))
    best = fastest_fitting_stage(cfg, shape, budget, layout)
    fits = m.needed <= budget
    lines.append(f"    {'total':<14}{_gb(m.needed):>7} of {budget / GB:g} GB   {'fits' if fits else 'does NOT fit'}")
    lines.append(f"    {'by ZeRO stage':<14}{stages} GB; the fastest that fits: "
                 + (f"ZeRO-{best}" if best is not None else "none"))
    if fits:
        return lines, None
    peak = max(m.peaks, key=m.peaks.get) if m.peaks and max(m.peaks.values()) > m.steady else None
    what = f"{peak} ({_peak_note(peak, m)})" if peak else f"({_breakdown(m.figures)})"
    return lines, (f"learner GPU needs {_gb(m.needed)} GB of {budget / GB:g} GB {what}: "
                   f"{learner_advice(cfg, shape, budget, layout)}")


def engine_lines(cfg: TrainConfig, shape: ModelShape, gpu: Optional[Gpu]) -> tuple[list[str], Optional[str]]:
    """A rollout engine GPU's rows and, where it does not fit, the one-line refusal."""
    r = cfg.rollout
    head = f"  rollout engine GPU ({r.engine}, tensor parallel {r.tensor_parallel_size if r.engine == 'vllm' else 1})"
    if gpu is None:
        m = engine_memory(cfg, shape, 0.0)
        return [head, f"    {'weights':<14}{_gb(m.weights):>7}   GPU memory unknown: set cluster.gpu_memory_gb "
                      f"to check it"], None
    m = engine_memory(cfg, shape, gpu.gb * GB)
    room = m.claim - m.weights
    lines = [head + f" on {gpu}"]
    if r.engine == "vllm":
        lines.append(f"    {'share':<14}{_gb(m.claim):>7}   rollout.gpu_memory_utilization {r.gpu_memory_utilization:g}"
                     f" of {gpu.gb:g} GB")
    lines.append(f"    {'weights':<14}{_gb(m.weights):>7}")
    tokens = max(room, 0) / m.kv_per_token
    lines.append(f"    {'KV cache':<14}{_gb(max(room, 0)):>7}   the rest of the share: ~{tokens:,.0f} tokens, "
                 f"{tokens / m.sequence_tokens:,.0f} sequences of {m.sequence_tokens:,}, vLLM's working memory "
                 f"included" if r.engine == "vllm" else
                 f"    {'KV cache':<14}{_gb(m.kv_needed):>7}   sampling.batch_size {cfg.sampling.batch_size} "
                 f"sequences of {m.sequence_tokens:,} tokens")
    fits = m.needed <= m.claim
    lines.append(f"    {'total':<14}{_gb(m.claim if r.engine == 'vllm' else m.needed):>7} of {gpu.gb:g} GB   "
                 f"{'fits' if fits else 'does NOT fit'}")
    if fits:
        return lines, None
    share = f"its {_gb(m.claim)} GB share" if r.engine == "vllm" else f"{gpu.gb:g} GB"
    return lines, (f"rollout engine GPU needs {_gb(m.needed)} GB of {share} (weights {_gb(m.weights)}, KV cache "
                   f"{_gb(m.kv_needed)} for {m.sequence_tokens:,}-token sequences): {engine_advice(cfg)}")


def memory_plan(cfg: TrainConfig, config: Optional[dict], source: str, learner_gpu: Optional[Gpu],
                engine_gpu: Optional[Gpu], layout: LearnerLayout = TODAY) -> tuple[list[str], Optional[str]]:
    """The plan's lines per role and the first refusal (one line), or None where every role fits. A learner that
    shares its GPU with an engine (both a share below 1) has what the engine leaves."""
    lines = ["memory per GPU (from the model's config, nothing loaded; GB = 10^9 bytes):"]
    if cfg.scaling.gpus_per_learner == 0 and cfg.rollout.engine_gpus == 0:
        return lines + ["  no GPU: the learners and the rollout engines run on the CPU"], None
    try:
        shape = ModelShape.from_config(config) if config is not None else None
    except (KeyError, TypeError):
        shape = None
    if shape is None:
        why = f"{source} is not a Llama-style config" if config is not None else "the model's config is not here"
        return lines + [f"  unknown: {why} (a local folder, the Hugging Face cache, or configs/model_shapes/)"], None
    lines.append(f"  model: {shape.parameters():,} parameters, from {source}")
    refusals = []
    if cfg.scaling.gpus_per_learner > 0:
        budget = learner_gpu.gb * GB if learner_gpu else 0.0
        if learner_gpu and cfg.scaling.gpus_per_learner < 1 and 0 < cfg.rollout.engine_gpus < 1:
            engine = engine_memory(cfg, shape, budget)
            budget -= engine.claim if cfg.rollout.engine == "vllm" else engine.needed
        lines.append(layout_line(layout))
        rows, refusal = learner_lines(cfg, shape, learner_gpu, budget, layout)
        lines, refusals = lines + rows, refusals + [refusal]
    else:
        lines.append("  learners: on the CPU (scaling.gpus_per_learner 0)")
    if cfg.rollout.engine_gpus > 0:
        rows, refusal = engine_lines(cfg, shape, engine_gpu)
        lines, refusals = lines + rows, refusals + [refusal]
    else:
        lines.append("  rollout engines: on the CPU (rollout.gpus_per_engine 0)")
    return lines, next((r for r in refusals if r), None)


def stage_table(cfg: TrainConfig, config: dict, gpu_gb: float, layout: LearnerLayout = TODAY) -> list[str]:
    """A Markdown table of one learner GPU under each ZeRO stage: what holds the memory, the total, whether it fits."""
    shape = ModelShape.from_config(config)
    rows = {stage: learner_memory(cfg, shape, layout, stage) for stage in (0, 1, 2, 3)}
    names = list(rows[0].figures)
    best = fastest_fitting_stage(cfg, shape, gpu_gb * GB, layout)
    peaks = ["while loading", "while syncing"]
    lines = ["| ZeRO | " + " | ".join(names + peaks) + f" | needed | on {gpu_gb:g} GB |",
             "|" + " --- |" * (len(names) + len(peaks) + 3)]
    for stage, m in rows.items():
        verdict = ("fits, the fastest" if stage == best else "fits") if m.needed <= gpu_gb * GB else "does not fit"
        cells = [_gb(v) for v in m.figures.values()] + [_gb(m.peaks[p]) if p in m.peaks else "" for p in peaks]
        cells.append(f"**{_gb(m.needed)}**")
        lines.append(f"| {stage} | " + " | ".join(cells) + f" | {verdict} |")
    return lines
