"""The resource plan of a training config: what `python -m pipelines.train --config X --dry-run` prints.

GPUs and CPUs per actor group (learners, rollout engines with their tensor-parallel placement groups, the
principle writer), the cluster total, the principles and family members training holds out, and the checkpoints
each iteration writes with sizes estimated from the model's parameter count (read from a local HF folder's
config.json, the Hugging Face cache's, or a published shape in configs/model_shapes/, else "unknown"), and the memory
per GPU of each role (pipelines/memory.py). Nothing is started or downloaded.
"""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import sami.world.rules  # noqa: F401  registers the built-in world's principle library (what it holds out)
from actors.node_types import LEARNER, ROLLOUT, NodeType, fits, node_types, role_types
from pipelines.memory import memory_lines
from sami.config import PrinciplesConfig, TrainConfig
from sami.constitutions import render_constitution
from sami.groups import draw_constitutions
from sami.memory_plan import count_parameters, lora_parameters, model_config
from sami.precision import deepspeed_bf16
from sami.principle_writer import configured_library
from sami.principles import PrincipleError

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


def writer_endpoint(cfg: TrainConfig) -> str:
    """Where a served writer is reached (its GPUs are the server's, outside this job's reservation)."""
    w = cfg.principles.writer
    if w.backend not in ("openai", "vllm"):
        return f", model {w.model} loaded in the actor"
    return f" at {w.base_url}, model {w.model} (served outside this job: its GPUs are the server's)"


def nodes_needed(bundles: list[dict], node: NodeType) -> int:
    """Nodes of this type that hold these bundles together (the sum of each resource over a node's)."""
    totals = {name: sum(b.get(name, 0.0) for b in bundles) for b in bundles for name in b}
    return max(1, *(math.ceil(amount / node.resources[name] - 1e-9) for name, amount in totals.items()
                    if amount and node.resources.get(name)))


def role_line(what: str, groups: list[list[dict]], strategy: str, types: list[NodeType], selector) -> str:
    """Where a role's placement groups land: the first node type that holds one, and how many of its nodes they take
    (groups packed whole onto nodes, as STRICT_PACK places each)."""
    node = next((t for t in types if fits(groups[0], selector, t, strategy)), None)
    if node is None:
        return f"  {what}: no node type holds it"
    if strategy == "STRICT_PACK":
        per_node = max(1, min(int(node.resources.get(name, 0.0) // amount) for name, amount in
                              {n: sum(b.get(n, 0.0) for b in groups[0]) for b in groups[0] for n in b}.items() if amount))
        count = math.ceil(len(groups) / per_node)
    else:
        count = nodes_needed([b for g in groups for b in g], node)
    machine = node.machine or "machine type not given"
    return (f"  {what}: {count} {node.name} node(s) of {node.max_workers} at most ({machine}: {node.gpu}, "
            f"{node.resources.get('CPU', 0):g} CPUs each)")


def nodes_section(cfg: TrainConfig, types: list[NodeType] | None = None) -> list[str]:
    """Per role, the node type of ray_cluster.yaml it lands on, its GPUs with their memory, and the nodes it takes."""
    types = node_types() if types is None else types
    if not types:
        return []
    groups = resource_plan(cfg)["groups"]
    learner_types, selector = role_types(types, LEARNER)
    lines = ["nodes on a ray_cluster.yaml cluster (the job's driver on its head node; a local Ray runs it all here):",
             role_line("learners", [groups["learners"]["placement_group"]["bundles"]], "PACK", learner_types, selector)]
    if cfg.data.replay_groups_from:
        return lines
    rollout = groups["rollout"]
    engine = rollout["placement_group"]["bundles"] if rollout["placement_group"] else [
        {"CPU": cfg.rollout.cpus_per_engine, **({"GPU": rollout["gpus_each"]} if rollout["gpus_each"] else {})}]
    engine_types, selector = role_types(types, ROLLOUT)
    lines.append(role_line("rollout engines", [engine] * rollout["count"], "STRICT_PACK", engine_types, selector))
    return lines


def principles_section(p: PrinciplesConfig, seed: int) -> list[str]:
    """The principles the run trains with and one query's constitutions, drawn as training draws them (another
    query draws others): what the model will be asked to follow, in the words it will read."""
    where = {"file": f"from {p.path}", "world": "of the built-in world"}.get(p.source, f"of {p.source!r}")
    if p.source == "writer":
        return [f"principles: written when the run starts by {p.writer.model} at {p.writer.base_url} "
                f"({p.writer.num_principles} of them; mode {p.mode}, {p.num_constitutions} constitutions per query)"]
    try:
        library = configured_library(p)
    except PrincipleError as e:
        return [f"principles: not read ({e})"]
    lines = [f"principles {where} (mode {p.mode}, {p.num_constitutions} constitutions per query"
             + (f", {p.principles_per_constitution} principles each" if p.principles_per_constitution else "") + "):"]
    lines += [f"  {q.name}: {q.definition} | antithesis: {q.antithesis}" for q in library]
    try:
        drawn = draw_constitutions(library, p, ["example"], f"plan/{seed}")[0]
    except ValueError as e:
        return [*lines, f"  no constitution can be drawn: {e}"]
    by_name = {q.name: q for q in library}
    lines.append("an example query's constitutions (the positive one first, then the contrasts it is scored against):")
    for index, constitution in enumerate(drawn):
        lines.append(f"  constitution {index + 1} ({'positive' if index == 0 else 'contrast'}):")
        text = render_constitution(constitution, by_name, random.Random(f"plan/{seed}/{index}"))
        lines += [f"    {line}" for line in text.splitlines()]
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
         f"{g['principle_writer']['backend']}{writer_endpoint(cfg)}" if g["principle_writer"]["count"] else
         f"  principle writer: in learner rank 0 (principles from {g['principle_writer']['backend']})"),
        *_principles_lines(cfg),
        f"  total:            {plan['total']['gpus']:g} GPU, {plan['total']['cpus']:g} CPU reserved in Ray (the job's "
        f"driver runs on the head node and reserves none)",
        *nodes_section(cfg),
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
    lines += principles_section(cfg.principles, cfg.run.seed)
    return "\n".join(lines + memory_lines(cfg)[0])
