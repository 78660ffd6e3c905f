"""The memory plan of a training config on the GPUs it would land on (`--dry-run`; sami/memory_plan.py computes it).

`python -m pipelines.memory --config configs/<name>.yaml [key.path=value ...] [--learner partitioned]
[--checkpointing]` prints one learner GPU under each ZeRO stage as a Markdown table (docs/gpu.md holds the presets').

A role's GPU is the one of the `ray_cluster.yaml` node type it lands on (learners on `role: learner` nodes, rollout
engines on `role: rollout` nodes: actors/node_types.py), known by its machine type, or `cluster.gpu_memory_gb` for a
cluster that file does not describe.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from typing import Optional

from actors.node_types import CLUSTER_YAML, ROLE, node_types
from sami.config import ConfigError, TrainConfig, load_config
from sami.memory_plan import PARTITIONED, TODAY, Gpu, LearnerLayout, layout_line, memory_plan, model_config, stage_table

def role_gpu(cfg: TrainConfig, role: str) -> Optional[Gpu]:
    """The GPU a role's actors land on ("learner" or "rollout", the `role` labels of actors/placement.py):
    `cluster.gpu_memory_gb`, else its ray_cluster.yaml node type's; None when neither says."""
    if cfg.cluster.gpu_memory_gb is not None:
        return Gpu(f"{cfg.cluster.gpu_memory_gb:g} GB", cfg.cluster.gpu_memory_gb, "cluster.gpu_memory_gb")
    for node in node_types():
        if node.labels.get(ROLE) == role and node.gpu_model:
            name, gb = node.gpu_model
            return Gpu(f"{name} {gb} GB", gb, f"{CLUSTER_YAML.name} node type {node.name}, {node.machine}")
    return None


def memory_lines(cfg: TrainConfig, layout: LearnerLayout = TODAY) -> tuple[list[str], Optional[str]]:
    """The memory plan's lines, and the one-line refusal of a role that does not fit (None if every role fits)."""
    config, source = model_config(cfg.model.name_or_path)
    return memory_plan(cfg, config, source, role_gpu(cfg, "learner"), role_gpu(cfg, "rollout"), layout)


def check_memory(cfg: TrainConfig) -> None:
    """Refuse (ConfigError, one line) a plan in which a role's GPU cannot hold what it must."""
    refusal = memory_lines(cfg)[1]
    if refusal:
        raise ConfigError(refusal)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.memory", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML config (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. scaling.num_learners=16")
    parser.add_argument("--learner", choices=["today", "partitioned"], default="today",
                        help="today: the whole model loaded on every GPU, a full reference copy on each, the whole "
                             "model gathered to sync it; partitioned: loaded and kept partitioned, synced in buckets")
    parser.add_argument("--checkpointing", action="store_true", help="with gradient checkpointing")
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    config, source = model_config(cfg.model.name_or_path)
    gpu = role_gpu(cfg, "learner")
    problem = (f"model.name_or_path: no config.json of {cfg.model.name_or_path} here (a local folder, the Hugging "
               f"Face cache, or configs/model_shapes/)" if config is None else
               "the learners' GPU memory is unknown: set cluster.gpu_memory_gb" if gpu is None else None)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    layout = replace(PARTITIONED if args.learner == "partitioned" else TODAY, checkpointing=args.checkpointing)
    print(f"{cfg.model.name_or_path} ({source}), {cfg.scaling.num_learners} learners on {gpu}; GB = 10^9 bytes")
    print(layout_line(layout).strip())
    print("\n".join(stage_table(cfg, config, gpu.gb, layout)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
