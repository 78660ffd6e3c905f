"""The learners' process group backend (`scaling.torch_backend`), chosen where the GPUs are.

Ray Train picks NCCL whenever the workers ask for GPUs. On a cluster whose GPUs are logical only (Ray's fake
autoscaler, `ray start --num-gpus` on a CPU machine) the learners hold GPU ids but see no CUDA device, and a CPU
build of torch has no NCCL at all: the group setup dies ("Distributed package doesn't have NCCL built in").
`auto` asks the learners' own resources: once the learners' placement group is placed (`pipelines/train.py:
place`), one task in each of its bundles, holding that learner's CPUs and GPUs on that learner's node, says whether
it sees a CUDA device with NCCL; NCCL only if every one does, gloo otherwise (the learners then train on the CPU:
`pipelines/loop.py: setup` reads the backend back). Ray Train gets a plain `TorchConfig(backend=...)`.
"""
from __future__ import annotations

import ray

from sami.config import TrainConfig


def sees_cuda() -> bool:
    """Whether this process can run NCCL on a CUDA device."""
    import torch
    import torch.distributed as dist

    return torch.cuda.is_available() and dist.is_nccl_available()


def backend_for(sees: list[bool]) -> str:
    """The group's backend from what each learner sees: one learner without CUDA makes it gloo for all (NCCL needs
    every rank on a device)."""
    return "nccl" if sees and all(sees) else "gloo"


def learners_backend(cfg: TrainConfig, learners_group) -> str:
    """`scaling.torch_backend`, with `auto` decided in the placed learners' group `learners_group` (one bundle per
    learner, `learner_bundle`): gloo without GPUs, else `backend_for` what a task in each bundle sees."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    s = cfg.scaling
    if s.torch_backend != "auto":
        return s.torch_backend
    if s.gpus_per_learner == 0:
        return "gloo"
    probe = ray.remote(sees_cuda)
    return backend_for(ray.get([
        probe.options(num_cpus=s.cpus_per_learner, num_gpus=s.gpus_per_learner,
                      scheduling_strategy=PlacementGroupSchedulingStrategy(learners_group, placement_group_bundle_index=i))
        .remote() for i in range(s.num_learners)]))
