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

import math
import time

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, RayActorError
import torch

from sami.config import RolloutConfig
from sami.learner import StopRun, full_parameters, log

RESTART_TIMEOUT_S = 600  # a vLLM engine can take minutes to start on a busy node


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
        # Rank 0 remembers what the engines should hold, to bring a restarted one back: the incarnation each
        # engine had at the last sync, the last buckets pushed (None: the weights on disk) and the last probe.
        self.incarnations = ray.get([a.whoami.remote() for a in actors]) if rank == 0 else []
        self.last_buckets = None
        self.last_probe: tuple | None = None  # (probe, the learner's log-prob of it)
        self.restarts: list[dict] = []  # engine restarts handled, with their probe checks

    def push(self, module) -> dict:
        """Every parameter of `module` to every engine; returns the bytes moved and the bucket count."""
        with full_parameters(module, self.zero_stage):
            if self.rank != 0:
                return {}
            named = list(module.named_parameters())
            broken = next((name for name, t in named if not torch.isfinite(t).all()), None)
            if broken is not None:  # never hand an engine weights it would sample garbage from
                raise StopRun(f"weight sync refused: parameter {broken} holds non-finite values")
            if self.nccl_group is not None:
                refs = [actor.receive_weights.remote(*weight_metadata(named)) for actor in self.actors]
                broadcast_weights(self.nccl_group, named)
                ray.get(refs)
                return {"sync_bytes": sum(t.numel() * t.element_size() for _, t in named), "buckets": 1}
            buckets = state_dict_buckets(named, self.rollout.sync_bucket_mb)
        ref = ray.put(buckets)
        results = ray.get([actor.update_weights.remote(ref) for actor in self.actors])
        self.last_buckets, self.incarnations = ref, [r["incarnation"] for r in results]
        return {"sync_bytes": results[0]["bytes"], "buckets": len(buckets)}

    def verify(self, learner_logprob: float, probe: tuple[list[int], list[int]]) -> float:
        """Rank 0: the engines' probe log-prob against the learner's; raises past the tolerance."""
        if self.rank != 0:
            return 0.0
        self.last_probe = (probe, learner_logprob)
        return self._probe_check(self.actors, probe, learner_logprob)

    def _probe_check(self, actors: list, probe: tuple[list[int], list[int]], learner_logprob: float) -> float:
        engines = ray.get([a.sequence_logprob.remote(probe[0], probe[1]) for a in actors])
        diff = max(abs(e - learner_logprob) for e in engines)
        if not math.isfinite(diff) or diff > self.rollout.probe_tolerance:  # NaN > tol is False: test it apart
            raise StopRun(f"weight sync verification failed: rollout engines score the probe {engines}, the learner "
                               f"{learner_logprob:.6f} (tolerance {self.rollout.probe_tolerance})")
        return diff

    def recover(self, index: int) -> None:
        """Rank 0: bring restarted engine `index` back to the learner's current weights, probe-checked."""
        if self.nccl_group is not None:
            raise RuntimeError(f"rollout engine {index} restarted; a restarted vLLM engine cannot rejoin the NCCL "
                               f"weight-transfer group of this run: resume the run (--resume) to rebuild it")
        actor, deadline = self.actors[index], time.monotonic() + RESTART_TIMEOUT_S
        while True:  # Ray restarts the actor in the background; calls fail until it is up
            try:
                incarnation = ray.get(actor.whoami.remote(), timeout=max(deadline - time.monotonic(), 1))
                break
            except (RayActorError, GetTimeoutError) as e:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"rollout engine {index} did not come back within {RESTART_TIMEOUT_S} s: {e}") from None
                time.sleep(1.0)
        if self.last_buckets is not None:
            incarnation = ray.get(actor.update_weights.remote(self.last_buckets))["incarnation"]
        diff = self._probe_check([actor], *self.last_probe) if self.last_probe is not None else None
        self.incarnations[index] = incarnation
        self.restarts.append({"engine": index, "probe_abs_diff": diff})
        log(f"rollout engine {index} restarted: current weights loaded"
            + (f", probe check passed (|diff| {diff:.2e})" if diff is not None else " (the weights on disk are current)"))
