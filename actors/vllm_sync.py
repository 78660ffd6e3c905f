"""Learner -> vLLM weight sync on GPU, through vLLM's native weight-transfer API (vLLM >= 0.22; 0.33 here).

One NCCL group spans learner rank 0 (rank 0) and every vLLM worker of every engine (engine e's workers
take ranks `1 + e * tensor_parallel_size ...`). A sync is one control call per engine (`receive_weights`,
which blocks in the workers) while rank 0 broadcasts all parameters in packed buffers. Needs CUDA and vLLM;
nothing here runs on CPU, where the object-store path (`RolloutEngine.update_weights`) is used instead.

Learner rank 0, once:
    group = trainer_group(address, port, world_size=1 + num_engines * tp)   # with every engine's
                                                                             # init_weight_transfer, concurrently
then per sync (under ZeRO-3 inside a GatheredParameters context):
    refs = [actor.receive_weights.remote(*weight_metadata(model.named_parameters())) for actor in actors]
    broadcast_weights(group, model.named_parameters()); ray.get(refs)
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
import torch


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


class WorkerExtension:
    """Mixed into every vLLM worker (`worker_extension_cls="actors.vllm_sync.WorkerExtension"`), so the engine can
    call `LLM.collective_rpc("load_numpy_bucket", ...)` by name (vLLM refuses pickled callables by default)."""

    def load_numpy_bucket(self, bucket: dict[str, np.ndarray]) -> None:
        """The object-store path: load one bucket in place. `load_weights` takes checkpoint (HF) names and
        shards them for tensor parallelism itself."""
        model = self.model_runner.model
        device = next(model.parameters()).device
        model.load_weights(weights=[(name, torch.from_numpy(array).to(device)) for name, array in bucket.items()])
