"""The NCCL weight-sync protocol as far as a CPU allows: the learner's packed producer (`broadcast_weights`,
vLLM's `packed_nccl_broadcast_producer`) against vLLM's receiving half (`packed_nccl_broadcast_consumer`, driven
by the update info the engine parses), over a real gloo group between two threads.

vLLM's packed helpers order their work on CUDA streams; on CPU those stream calls are replaced by no-ops (the
only substitution: every byte goes through vLLM's packing, chunking and unpacking and a gloo broadcast). NCCL
itself, the CUDA streams and `load_weights` on received buffers need a GPU (benchmarks/gpu_smoke.py).
The rendezvous runs for real: learner rank 0's `trainer_group` (vLLM's StatelessProcessGroup on the held socket)
against a vLLM worker's own store client, with the NCCL communicator on top switched off (VLLM_DISABLE_PYNCCL).
"""
import threading
import time
from dataclasses import asdict
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM
from vllm.distributed.weight_transfer import packed_tensor
from vllm.distributed.weight_transfer.nccl_common import NCCLWeightTransferInitInfo
from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferUpdateInfo

import actors.weight_sync as weight_sync
from actors.weight_sync import broadcast_weights, packed_wire, rendezvous_socket, trainer_group, weight_metadata
from sami.config import RolloutConfig


class NoStream:
    """A CUDA stream's ordering calls, for CPU tensors (where there is nothing to order)."""

    def synchronize(self) -> None:
        pass


class GlooBroadcast:
    """The one call vLLM's packed helpers make on their group (PyNcclCommunicator.broadcast), over gloo."""

    def __init__(self, store, rank: int, world_size: int):
        self.group = dist.ProcessGroupGloo(store, rank, world_size, timedelta(seconds=60))

    def broadcast(self, tensor: torch.Tensor, src: int, stream=None) -> None:
        self.group.broadcast(tensor, src).wait()


@pytest.fixture
def cpu_streams(monkeypatch):
    monkeypatch.setattr(packed_tensor, "_get_streams", lambda device, n: tuple(NoStream() for _ in range(n)))
    monkeypatch.setattr(torch.accelerator, "current_device_index", lambda: 0)


def test_wire_params_reach_the_receivers_and_the_update_info_parses(tiny_model_dir):
    wire = packed_wire(RolloutConfig(sync_bucket_mb=4))
    init = NCCLWeightTransferInitInfo(master_address="127.0.0.1", master_port=1, rank_offset=1, world_size=2, **wire)
    assert init.packed and init.packed_buffer_size_bytes == 4 * 2**20 and init.packed_num_buffers == 2
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    names, dtypes, shapes = weight_metadata(model.named_parameters())
    info = NCCLWeightTransferUpdateInfo(names=names, dtype_names=dtypes, shapes=shapes)
    assert asdict(info)["names"] == names
    with pytest.raises(TypeError, match="packed"):  # the old per-update flag: vLLM rejects it
        NCCLWeightTransferUpdateInfo(names=names, dtype_names=dtypes, shapes=shapes, packed=True)


def test_packed_producer_and_receiver_agree_over_gloo(tiny_model_dir, cpu_streams):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    named = list(model.named_parameters())
    named = [(n, t.detach().to(torch.bfloat16) if i % 2 else t.detach()) for i, (n, t) in enumerate(named)]  # both dtypes
    # small buffers: many chunks, a parameter larger than a buffer, both buffer slots reused
    wire = {**packed_wire(RolloutConfig()), "packed_buffer_size_bytes": 40_000}
    # what the engine does with the update info: vLLM's dataclass, then dtypes by name (NCCLWeightTransferEngine)
    info = NCCLWeightTransferUpdateInfo(*weight_metadata(named))
    meta = ((n, (s, getattr(torch, d))) for n, d, s in zip(info.names, info.dtype_names, info.shapes))
    store = dist.HashStore()
    received, errors, chunks = [], [], []

    def receive():
        try:
            group = GlooBroadcast(store, 1, 2)
            packed_tensor.packed_nccl_broadcast_consumer(
                iterator=meta, group=group, src=0,
                post_unpack_func=lambda pairs: (chunks.append(len(pairs)), received.extend((n, t.clone()) for n, t in pairs)),
                buffer_size_bytes=wire["packed_buffer_size_bytes"], num_buffers=wire["packed_num_buffers"], device="cpu")
        except Exception as e:  # surfaced below, with the producer's result
            errors.append(e)

    receiver = threading.Thread(target=receive)
    receiver.start()
    broadcast_weights(GlooBroadcast(store, 0, 2), named, wire)
    receiver.join(timeout=60)
    assert not receiver.is_alive() and not errors, errors
    assert len(chunks) > 3
    assert [n for n, _ in received] == [n for n, _ in named]
    for (_, got), (name, sent) in zip(received, named):
        assert got.dtype == sent.dtype and got.shape == sent.shape and torch.equal(got, sent), name


@pytest.fixture
def rendezvous_only(monkeypatch):
    monkeypatch.setenv("VLLM_DISABLE_PYNCCL", "1")  # PyNcclCommunicator needs CUDA's NCCL: it returns after the store
    monkeypatch.setattr(torch.accelerator, "current_device_index", lambda: 0)


def test_a_vllm_worker_joins_the_trainer_store_on_the_held_socket(rendezvous_only):
    from vllm.distributed.utils import StatelessProcessGroup

    listener = rendezvous_socket()
    port, received = listener.getsockname()[1], []

    def worker():  # what vLLM's worker_init_process_group does before its communicator
        group = StatelessProcessGroup.create(host="127.0.0.1", port=port, rank=1, world_size=2)
        received.append(group.broadcast_obj(None, src=0))

    joining = threading.Thread(target=worker)
    joining.start()
    communicator = trainer_group("127.0.0.1", listener, 2)
    communicator.group.broadcast_obj("weights follow", src=0)
    joining.join(timeout=60)
    assert received == ["weights follow"]
    assert listener.fileno() == -1  # the store owns the socket: the port was never free


def test_the_trainer_store_stops_waiting_after_the_rendezvous_timeout(rendezvous_only, monkeypatch):
    monkeypatch.setattr(weight_sync, "RENDEZVOUS_TIMEOUT_S", 2)
    started = time.monotonic()
    with pytest.raises(Exception) as failed:
        trainer_group("127.0.0.1", rendezvous_socket(), 2)  # nobody joins
    assert time.monotonic() - started < 30
    # torch's timeout; vLLM's create_tcp_store then closes the socket the store already closed (EBADF) on top of it
    timeout = next(e for e in (failed.value, failed.value.__context__) if isinstance(e, dist.DistStoreError))
    assert "waiting for clients. 1/2 clients joined" in str(timeout)
