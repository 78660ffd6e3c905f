"""The resource plan of a training config: what `python -m pipelines.train --config X --dry-run` prints.

GPUs and CPUs per actor group (learners, rollout engines with their tensor-parallel placement groups, the
principle writer), the cluster total, and the checkpoints each iteration writes with sizes estimated from
the model's parameter count (read from a local HF folder's config.json, else a small table of known
names, else "unknown"). Nothing is started or downloaded.
"""
from __future__ import annotations

import json
from pathlib import Path

from sami.config import TrainConfig
from sami.precision import deepspeed_bf16

WRITER_CPUS = 0.1  # the principle writer calls an endpoint or serves a saved library: a small CPU share

# Parameter counts of the published runs' models (from their HF configs; see `count_parameters`).
KNOWN_PARAMETERS = {
    "mixtral-8x7b": 46_702_792_704,
    "mistral-7b": 7_241_732_096,
    "llama-2-7b": 6_738_415_616,
}


def count_parameters(hf_config: dict) -> int:
    """Parameters of a Llama/Mistral/Mixtral-style decoder from its config.json (exact for those three)."""
    h, layers, vocab = hf_config["hidden_size"], hf_config["num_hidden_layers"], hf_config["vocab_size"]
    heads = hf_config["num_attention_heads"]
    kv_heads = hf_config.get("num_key_value_heads") or heads
    head_dim = hf_config.get("head_dim") or h // heads
    inter = hf_config.get("intermediate_size", 4 * h)
    experts = hf_config.get("num_local_experts", 1)
    attention = h * heads * head_dim * 2 + h * kv_heads * head_dim * 2  # q, o and k, v (no biases)
    mlp = 3 * h * inter * experts + (h * experts if experts > 1 else 0)  # gate/up/down per expert + router
    per_layer = attention + mlp + 2 * h  # two RMSNorms
    embeddings = vocab * h * (1 if hf_config.get("tie_word_embeddings", False) else 2)
    return layers * per_layer + embeddings + h


def model_folder(name_or_path: str) -> Path | None:
    """The local HF folder behind the name, if there is one (a built-in world model only once it is cached)."""
    if name_or_path.startswith("builtin:"):
        from sami.world.base_model import builtin_spec, cache_root, spec_hash

        folder = cache_root() / f"base-{spec_hash(builtin_spec(name_or_path))}"
        return folder if (folder / "READY").is_file() else None
    folder = Path(name_or_path)
    return folder if (folder / "config.json").is_file() else None


def parameter_count(name_or_path: str) -> tuple[int | None, str]:
    """(parameters or None, where the number came from)."""
    folder = model_folder(name_or_path)
    if folder is not None:
        try:
            return count_parameters(json.loads((folder / "config.json").read_text())), f"{folder}/config.json"
        except (KeyError, TypeError, ValueError):
            return None, f"{folder}/config.json is not a Llama-style config"
    lowered = name_or_path.lower()
    for key, count in KNOWN_PARAMETERS.items():
        if key in lowered:
            return count, f"known model family {key!r}"
    if name_or_path.startswith("builtin:"):
        return None, "unknown until the built-in base model is built (well under 1M parameters)"
    return None, "unknown (not a local folder nor a known model name)"


def checkpoint_bytes(params: int, cfg: TrainConfig) -> dict[str, int]:
    """Bytes one iteration writes. DeepSpeed: 16-bit module weights + fp32 master weights + optimiser state."""
    half = deepspeed_bf16(cfg, use_gpu=cfg.scaling.gpus_per_learner > 0)
    weight_bytes = 2 if half else 4
    optimizer_states = 2 if cfg.optim.name == "adamw" else 1  # Adam: m and v; RMSprop: the square average
    out = {}
    if cfg.checkpoint.deepspeed:
        master = 4 if half else 0  # mixed precision keeps an fp32 copy next to the 16-bit weights
        out["deepspeed"] = params * (weight_bytes + master + 4 * optimizer_states)
    if cfg.checkpoint.export_hf:
        out["hf_export"] = params * weight_bytes
    return out


def learner_bundle(cfg: TrainConfig) -> dict:
    """One learner's Ray resources: `cpus_per_learner` CPUs, `gpus_per_learner` GPUs."""
    s = cfg.scaling
    return {"CPU": s.cpus_per_learner, **({"GPU": s.gpus_per_learner} if s.gpus_per_learner > 0 else {})}


def resource_plan(cfg: TrainConfig) -> dict:
    s, r = cfg.scaling, cfg.rollout
    learners = {
        "count": s.num_learners, "gpus_each": s.gpus_per_learner, "cpus_each": s.cpus_per_learner,
        # Ray Train reserves one bundle per worker in one placement group (PACK: same node where it fits).
        "placement_group": {"strategy": "PACK", "bundles": [learner_bundle(cfg)] * s.num_learners},
    }
    if r.engine == "vllm":
        # actors/rollout.py: one placement group per engine, one GPU bundle per tensor-parallel rank.
        bundles = [{"GPU": r.engine_gpus, "CPU": 1}] * r.tensor_parallel_size
        rollout = {"count": r.num_engines, "engine": "vllm", "tensor_parallel_size": r.tensor_parallel_size,
                   "gpus_each": r.tensor_parallel_size * r.engine_gpus, "cpus_each": r.tensor_parallel_size,
                   "placement_group": {"strategy": "STRICT_PACK", "bundles": bundles}}  # one node per engine
    else:
        rollout = {"count": r.num_engines, "engine": "hf", "tensor_parallel_size": 1, "gpus_each": r.engine_gpus,
                   "cpus_each": r.cpus_per_engine, "placement_group": None}
    # Only a language-model writer is an actor of its own; a file or the world is read on learner rank 0.
    lm_writer = cfg.principles.source == "writer"
    writer = {"count": int(lm_writer), "gpus_each": 0, "cpus_each": WRITER_CPUS,
              "backend": f"writer ({cfg.principles.writer.backend})" if lm_writer else cfg.principles.source}
    groups = {"learners": learners, "rollout": rollout, "principle_writer": writer}
    total_gpus = sum(g["count"] * g["gpus_each"] for g in groups.values())
    total_cpus = sum(g["count"] * g["cpus_each"] for g in groups.values())

    params, params_source = parameter_count(cfg.model.name_or_path)
    per_iteration = checkpoint_bytes(params, cfg) if params is not None else None
    steps = [cfg.steps_for_iteration(i) for i in range(1, cfg.run.iterations + 1)]
    return {
        "run": cfg.run.name, "objective": cfg.objective.name, "model": cfg.model.name_or_path,
        "iterations": cfg.run.iterations, "optimizer_steps": steps,
        "groups_per_step": cfg.optim.groups_per_step,
        "queries_per_iteration": [cfg.data.queries_per_iteration or n * cfg.optim.groups_per_step for n in steps],
        "groups": groups,
        "total": {"gpus": total_gpus, "cpus": total_cpus},
        "parameters": params, "parameters_source": params_source,
        "checkpoints": {
            "per_iteration": per_iteration,
            "iteration_bytes": sum(per_iteration.values()) if per_iteration is not None else None,
            "run_bytes": sum(per_iteration.values()) * cfg.run.iterations if per_iteration is not None else None,
            "directory": cfg.run.output_dir,
        },
    }


def _size(nbytes: int | None) -> str:
    if nbytes is None:
        return "unknown"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if nbytes < 1024 or unit == "TiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024


def _count(params: int) -> str:
    return f"{params / 1e9:.2f}B" if params >= 1e8 else f"{params:,}"


def _bundles(pg: dict | None) -> str:
    if not pg:
        return ""
    return f", placement group {pg['strategy']} {len(pg['bundles'])} x {pg['bundles'][0]}"


def format_plan(cfg: TrainConfig) -> str:
    plan = resource_plan(cfg)
    g = plan["groups"]
    params = plan["parameters"]
    lines = [
        f"run {plan['run']}: {plan['iterations']} iteration(s) of {plan['objective']} on {plan['model']}",
        f"  optimiser steps per iteration: {plan['optimizer_steps']} x {plan['groups_per_step']} query groups;"
        f" queries sampled per iteration: {plan['queries_per_iteration']}",
        f"  parameters: {_count(params)} ({plan['parameters_source']})" if params else
        f"  parameters: {plan['parameters_source']}",
        "resources:",
        f"  learners:         {g['learners']['count']} x ({g['learners']['gpus_each']:g} GPU, "
        f"{g['learners']['cpus_each']:g} CPU), DeepSpeed ZeRO-{cfg.deepspeed.zero_stage}, torch backend "
        f"{cfg.scaling.torch_backend}{_bundles(g['learners']['placement_group'])}",
        f"  rollout engines:  {g['rollout']['count']} x {g['rollout']['engine']} ({g['rollout']['gpus_each']:g} GPU, "
        f"{g['rollout']['cpus_each']:g} CPU, tensor parallel {g['rollout']['tensor_parallel_size']})"
        f"{_bundles(g['rollout']['placement_group'])}",
        (f"  principle writer: 1 x (0 GPU, {g['principle_writer']['cpus_each']:g} CPU), principles from "
         f"{g['principle_writer']['backend']}" if g["principle_writer"]["count"] else
         f"  principle writer: in learner rank 0 (principles from {g['principle_writer']['backend']})"),
        f"  total:            {plan['total']['gpus']:g} GPU, {plan['total']['cpus']:g} CPU reserved in Ray (the job's "
        f"driver runs on the head node and reserves none)",
        f"checkpoints in {plan['checkpoints']['directory']} (estimates):",
    ]
    per = plan["checkpoints"]["per_iteration"]
    if per is None:
        lines.append("  size unknown (parameter count unknown)")
    else:
        for kind, nbytes in per.items():
            lines.append(f"  {kind:<10} {_size(nbytes)} per iteration")
        lines.append(f"  total      {_size(plan['checkpoints']['iteration_bytes'])} per iteration, "
                     f"{_size(plan['checkpoints']['run_bytes'])} for the run")
    return "\n".join(lines)
