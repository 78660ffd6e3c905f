"""The learners' process group, with its backend (`scaling.torch_backend`) chosen where the GPUs are.

Ray Train picks NCCL whenever the workers ask for GPUs. On a cluster whose GPUs are logical only (Ray's fake
autoscaler, `ray start --num-gpus` on a CPU machine) the learners hold GPU ids but see no CUDA device, and a CPU
build of torch has no NCCL at all: the group setup dies ("Distributed package doesn't have NCCL built in").
`auto` asks the learners themselves, once their worker group is up and before the group is made: NCCL where every
one of them sees a CUDA device and torch has NCCL, gloo otherwise (the learners then train on the CPU,
`pipelines/loop.py: setup` reads the backend back). Ray Train offers no public hook between starting the workers
and making their group, so the choice lives in a subclass of its torch backend (`ray.train.torch.config`, Ray 2.60).
"""
from __future__ import annotations

import dataclasses

from ray.train.torch import TorchConfig
from ray.train.torch.config import _TorchBackend

from sami.config import TrainConfig


def sees_cuda() -> bool:
    """Whether this process can run NCCL on a CUDA device (run on each learner)."""
    import torch
    import torch.distributed as dist

    return torch.cuda.is_available() and dist.is_nccl_available()


def backend_for(sees: list[bool]) -> str:
    """The group's backend from what each learner sees: one learner without CUDA makes it gloo for all (NCCL needs
    every rank on a device)."""
    return "nccl" if sees and all(sees) else "gloo"


class _LearnersChooseBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config: TorchConfig):
        chosen = backend_for(worker_group.execute(sees_cuda))
        super().on_start(worker_group, dataclasses.replace(backend_config, backend=chosen))


@dataclasses.dataclass
class LearnersChooseTorchConfig(TorchConfig):
    """`TorchConfig` whose backend the learners choose (`backend_for`)."""

    @property
    def backend_cls(self):
        return _LearnersChooseBackend


def torch_config(cfg: TrainConfig) -> TorchConfig:
    """Ray Train's torch config for `scaling.torch_backend`: auto without GPUs is gloo, with GPUs the learners'
    choice; nccl and gloo as asked."""
    backend = cfg.scaling.torch_backend
    if backend == "auto" and cfg.scaling.gpus_per_learner > 0:
        return LearnersChooseTorchConfig()
    return TorchConfig(backend="gloo" if backend == "auto" else backend)
