"""Learner -> rollout engines weight sync, all of it: buckets, the object-store path, the NCCL path, the probe check.

One control call per engine per sync:
- CPU / HF engines: learner rank 0 puts every parameter, in buckets of `rollout.sync_bucket_mb`, into the
  object store once; each engine loads them in place (`RolloutEngine.update_weights`).
- GPU / vLLM: one NCCL group spans learner rank 0 (rank 0) and every vLLM worker of every engine (engine e's
  workers take ranks `1 + e * tensor_parallel_size ...`), through vLLM's native weight-transfer API; rank 0
  broadcasts packed buffers while each engine's `receive_weights` call blocks in its workers.
After a sync (or a resume) the engines must score a probe sequence as the learner does, within
`rollout.probe_tolerance`, or the run stops. Under ZeRO-3 every learner rank takes part in gathering the
parameters; only rank 0 sends.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
import ray
import torch

from sami.config import RolloutConfig
from sami.learner import full_parameters


def state_dict_buckets(named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_mb: int) -> list[dict[str, np.ndarray]]:
    """Split `(name, tensor)` pairs (e.g. `model.named_parameters()`) into buckets of at most `bucket_mb` MiB.

    One tensor larger than the limit gets a bucket of its own. numpy has no bfloat16, so every tensor is
    shipped as float32; the engine casts it back to its own dtype on load.
    """
    limit = bucket_mb * 2**20
    buckets: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, tensor in named_tensors:
        array = tensor.detach().to("cpu", torch.float32).numpy()
        if buckets[-1] and size + array.nbytes > limit:
            buckets.append({})
            size = 0
        buckets[-1][name] = array
        size += array.nbytes
    return buckets


def weight_metadata(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> tuple[list[str], list[str], list[list[int]]]:
    """Names, dtype names and shapes the receivers need to allocate the broadcast buffers."""
    names, dtypes, shapes = [], [], []
    for name, tensor in named_tensors:
        names.append(name)
        dtypes.append(str(tensor.dtype).removeprefix("torch."))
        shapes.append(list(tensor.shape))
    return names, dtypes, shapes


def trainer_group(master_address: str, master_port: int, world_size: int):
    """Learner rank 0's end of the NCCL group (always rank 0), on the current CUDA device."""
    from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferEngine

    return NCCLWeightTransferEngine.trainer_init(
        {"master_address": master_address, "master_port": master_port, "world_size": world_size}
    )


def broadcast_weights(group, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Broadcast every parameter in packed buffers; the same order as `weight_metadata` listed them."""
    from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferEngine

    NCCLWeightTransferEngine.trainer_send_weights(iterator=iter(named_tensors), trainer_args={"group": group, "packed": True})


def open_nccl_group(actors: list, rollout: RolloutConfig):
    """GPU: join learner rank 0 and every engine's vLLM workers in one NCCL group."""
    import socket

    with socket.socket() as sock:  # a free port on this node for the group's rendezvous
        sock.bind(("", 0))
        port = sock.getsockname()[1]
    address, tp = ray.util.get_node_ip_address(), rollout.tensor_parallel_size
    world_size = 1 + len(actors) * tp
    refs = [a.init_weight_transfer.remote(address, port, 1 + e * tp, world_size) for e, a in enumerate(actors)]
    group = trainer_group(address, port, world_size)  # joins while the engines join
    ray.get(refs)
    return group


class WeightSync:
    """Held by every learner rank; rank 0 owns the transport to the rollout actors."""

    def __init__(self, actors: list, rollout: RolloutConfig, zero_stage: int, rank: int, use_nccl: bool):
        self.actors, self.rollout, self.zero_stage, self.rank = actors, rollout, zero_stage, rank
        self.nccl_group = open_nccl_group(actors, rollout) if use_nccl and rank == 0 else None

    def push(self, module) -> dict:
        """Every parameter of `module` to every engine; returns the bytes moved and the bucket count."""
        with full_parameters(module, self.zero_stage):
            if self.rank != 0:
                return {}
            named = list(module.named_parameters())
            if self.nccl_group is not None:
                refs = [actor.receive_weights.remote(*weight_metadata(named)) for actor in self.actors]
                broadcast_weights(self.nccl_group, named)
                ray.get(refs)
                return {"sync_bytes": sum(t.numel() * t.element_size() for _, t in named), "buckets": 1}
            buckets = state_dict_buckets(named, self.rollout.sync_bucket_mb)
        ref = ray.put(buckets)
        results = ray.get([actor.update_weights.remote(ref) for actor in self.actors])
        return {"sync_bytes": results[0]["bytes"], "buckets": len(buckets)}

    def verify(self, learner_logprob: float, probe: tuple[list[int], list[int]]) -> float:
        """Rank 0: the engines' probe log-prob against the learner's; raises past the tolerance."""
        if self.rank != 0:
            return 0.0
        engines = ray.get([a.sequence_logprob.remote(probe[0], probe[1]) for a in self.actors])
        diff = max(abs(e - learner_logprob) for e in engines)
        if diff > self.rollout.probe_tolerance:
            raise RuntimeError(f"weight sync verification failed: rollout engines score the probe {engines}, the learner "
                               f"{learner_logprob:.6f} (tolerance {self.rollout.probe_tolerance})")
        return diff
