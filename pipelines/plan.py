"""The resource plan of a training config: what `python -m pipelines.train --config X --dry-run` prints.

GPUs and CPUs per actor group (learners, rollout engines with their tensor-parallel placement groups, the
principle writer), the cluster total, the principles and family members training holds out, and the checkpoints
each iteration writes with sizes estimated from the model's parameter count (read from a local HF folder's
config.json, the Hugging Face cache's, or a published shape in configs/model_shapes/, else "unknown"), and the memory
per GPU of each role (pipelines/memory.py). Nothing is started or downloaded.
"""
from __future__ import annotations

import sami.world.rules  # noqa: F401  registers the built-in world's principle library (what it holds out)
from pipelines.memory import memory_lines
from sami.config import TrainConfig
from sami.memory_plan import count_parameters, lora_parameters, model_config
from sami.precision import deepspeed_bf16

WRITER_CPUS = 0.1  # the principle writer calls an endpoint or serves a saved library: a small CPU share


def parameter_count(name_or_path: str) -> tuple[int | None, str]:
    """(parameters or None, where the number came from)."""
    config, source = model_config(name_or_path)
    if config is not None:
        try:
            return count_parameters(config), source
        except (KeyError, TypeError, ValueError):
            return None, f"{source} is not a Llama-style config"
    if name_or_path.startswith("builtin:"):
        return None, "unknown until the built-in base model is built (well under 1M parameters)"
    return None, "unknown (not a local folder nor a known model name)"


def checkpoint_bytes(params: int, cfg: TrainConfig, trained: int | None = None) -> dict[str, int]:
    """Bytes one iteration writes. DeepSpeed: 16-bit module weights + fp32 master weights + optimiser state.
    Under LoRA (`trained`: the adapter's parameters) both hold the adapter only, and the merged model is the base's
    size."""
    half = deepspeed_bf16(cfg, use_gpu=cfg.scaling.gpus_per_learner > 0)
    weight_bytes = 2 if half else 4
    optimizer_states = 2 if cfg.optim.name == "adamw" else 1  # Adam: m and v; RMSprop: the square average
    saved = params if trained is None else trained
    out = {}
    if cfg.checkpoint.deepspeed:
        master = 4 if half else 0  # mixed precision keeps an fp32 copy next to the 16-bit weights
        out["deepspeed"] = saved * (weight_bytes + master + 4 * optimizer_states)
    if cfg.checkpoint.export_hf:
        out["hf_export" if trained is None else "adapter"] = saved * weight_bytes
        if trained is not None and cfg.model.lora.export_merged:
            out["merged"] = params * weight_bytes
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
    lora, trained = cfg.model.lora, None
    if lora.enabled and params is not None:
        trained = lora_parameters(model_config(cfg.model.name_or_path)[0], lora.rank, lora.target_modules)
    per_iteration = checkpoint_bytes(params, cfg, trained) if params is not None else None
    steps = [cfg.steps_for_iteration(i) for i in range(1, cfg.run.iterations + 1)]
    return {
        "run": cfg.run.name, "objective": cfg.objective.name, "model": cfg.model.name_or_path,
        "iterations": cfg.run.iterations, "optimizer_steps": steps,
        "groups_per_step": cfg.optim.groups_per_step,
        "queries_per_iteration": [cfg.data.queries_per_iteration or n * cfg.optim.groups_per_step for n in steps],
        "groups": groups,
        "total": {"gpus": total_gpus, "cpus": total_cpus},
        "parameters": params, "parameters_source": params_source,
        "trained_parameters": trained if lora.enabled else params,
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


def _principles_lines(cfg: TrainConfig) -> list[str]:
    """What training never states (the evaluation reads generalisation on it) and the family members it trains."""
    p = cfg.principles
    lines = []
    if p.heldout_names:
        members = f"; family members {', '.join(p.heldout_members)}" if p.heldout_members else ""
        lines.append(f"  held out of training: {', '.join(p.heldout_principles) or 'no principle'}{members}")
    if p.trained_members:
        lines.append(f"  family members trained: {', '.join(p.trained_members)}")
    return lines


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
        *([f"  trained: a LoRA adapter of rank {cfg.model.lora.rank} on {', '.join(cfg.model.lora.target_modules)}: "
           + (f"{_count(plan['trained_parameters'])} parameters ({plan['trained_parameters'] / params:.2%})"
              if params else "size unknown")] if cfg.model.lora.enabled else []),
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
        *_principles_lines(cfg),
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
    return "\n".join(lines + memory_lines(cfg)[0])
