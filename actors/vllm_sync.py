"""GPU weight sync into vLLM workers: learner rank 0 broadcasts parameter buckets over NCCL.

Written against vLLM 0.33's worker-extension API (`worker_extension_cls` + `LLM.collective_rpc`) and its
stateless NCCL group (`StatelessProcessGroup` + `PyNcclCommunicator`), the pattern of vLLM's own RLHF
examples. The group spans learner rank 0 (rank 0) and every vLLM worker of every engine (ranks 1..N), so
one sync is one control call per engine plus one broadcast per bucket. Needs CUDA; nothing here runs on CPU.
"""
from __future__ import annotations

import numpy as np
import torch


def nccl_group(host: str, port: int, rank: int, world_size: int, device):
    from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
    from vllm.distributed.utils import StatelessProcessGroup

    group = StatelessProcessGroup.create(host=host, port=port, rank=rank, world_size=world_size)
    return PyNcclCommunicator(group, device=device)


def pack_bucket(named: list[tuple[str, torch.Tensor]]) -> tuple[torch.Tensor, list[tuple[str, str, list[int]]]]:
    """One flat tensor per bucket (one broadcast) plus the metadata the receivers need to unpack it."""
    dtype = named[0][1].dtype
    flat = torch.cat([t.detach().to(dtype).reshape(-1) for _, t in named])
    return flat, [(name, str(dtype).removeprefix("torch."), list(t.shape)) for name, t in named]


def unpack_bucket(flat: torch.Tensor, meta: list[tuple[str, str, list[int]]]) -> list[tuple[str, torch.Tensor]]:
    out, offset = [], 0
    for name, _, shape in meta:
        n = int(np.prod(shape)) if shape else 1
        out.append((name, flat[offset : offset + n].view(shape)))
        offset += n
    return out


class WeightSyncExtension:
    """Mixed into every vLLM worker (`worker_extension_cls="actors.vllm_sync.WeightSyncExtension"`)."""

    def init_weight_update_group(self, host: str, port: int, rank_offset: int, world_size: int) -> None:
        from vllm.distributed.parallel_state import get_world_group

        rank = get_world_group().rank + rank_offset
        self.weight_update_group = nccl_group(host, port, rank, world_size, self.device)

    def receive_bucket(self, meta: list[tuple[str, str, list[int]]]) -> None:
        numel = sum(int(np.prod(shape)) if shape else 1 for _, _, shape in meta)
        flat = torch.empty(numel, dtype=getattr(torch, meta[0][1]), device=self.device)
        self.weight_update_group.broadcast(flat, src=0, stream=torch.cuda.current_stream())
        self.model_runner.model.load_weights(weights=unpack_bucket(flat, meta))

    def load_weights_from_arrays(self, bucket: dict[str, np.ndarray]) -> None:
        """The object-store path: numpy arrays shipped through Ray."""
        self.model_runner.model.load_weights(
            weights=[(name, torch.from_numpy(array).to(self.device)) for name, array in bucket.items()]
        )
