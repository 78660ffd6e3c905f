"""The NCCL weight-transfer rendezvous of actors/weight_sync.py, as far as a CPU allows: learner rank 0's store
against engine actors that start slowly (as vLLM's constructor does), fail, or never join.

The engines are stand-in Ray actors that join the store as vLLM's workers do (a TCPStore client on the address and
port they are handed); learner rank 0's end is the same TCPStore master vLLM's `StatelessProcessGroup.create`
builds on the socket it is given, without the NCCL communicator on top (CUDA only). The vLLM lane checks the
real trainer end against vLLM's own worker-side store (tests/vllm_lane/test_nccl_protocol.py).
"""
import errno
import socket
from datetime import timedelta

import pytest
import torch.distributed as dist

import actors.weight_sync as weight_sync
from sami.config import RolloutConfig

ENGINE_START_S = 3  # longer than the rendezvous wait below: the engines' join calls queue behind it
RENDEZVOUS_S = 2


def trainer_store(address: str, listener: socket.socket, world_size: int):
    """The TCPStore master vLLM's StatelessProcessGroup.create makes on `listener` (vllm/distributed/utils.py)."""
    return dist.TCPStore(address, listener.getsockname()[1], world_size, is_master=True,
                         timeout=timedelta(seconds=weight_sync.RENDEZVOUS_TIMEOUT_S),
                         master_listen_fd=listener.detach(), use_libuv=False)


@pytest.fixture(scope="module")
def ray_session():
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def short_rendezvous(monkeypatch):
    monkeypatch.setattr(weight_sync, "trainer_group", trainer_store)
    monkeypatch.setattr(weight_sync, "RENDEZVOUS_TIMEOUT_S", RENDEZVOUS_S)


def engine_actors(ray, count: int, join: str):
    """`count` engine stand-ins that take ENGINE_START_S to start; `join`: "store" (join as vLLM's workers do),
    "fail" (the join call raises), "never" (returns without joining)."""

    class SlowEngine:
        def __init__(self):
            import time

            time.sleep(ENGINE_START_S)  # vLLM's constructor: the actor serves no call before it returns

        def whoami(self) -> str:
            return "engine"

        def init_weight_transfer(self, address, port, rank_offset, world_size, wire):
            if join == "fail":
                raise ValueError(f"engine at rank {rank_offset} refused the weight transfer")
            if join == "store":
                store = dist.TCPStore(address, port, world_size, is_master=False, timeout=timedelta(seconds=30))
                store.set(f"joined/{rank_offset}", address)
            return {"address": address, "port": port, "rank_offset": rank_offset, "world_size": world_size}

    return [ray.remote(SlowEngine).options(num_cpus=0.5).remote() for _ in range(count)]


@pytest.mark.timeout(120)
def test_slow_engines_join_a_bounded_rendezvous(ray_session, short_rendezvous):
    ray = ray_session
    actors = engine_actors(ray, 2, "store")
    sync = weight_sync.WeightSync(actors, RolloutConfig(engine="vllm"), 2, rank=0, use_nccl=True)
    store = sync.nccl_group
    assert [store.get(f"joined/{r}").decode() for r in (1, 2)] == [ray.util.get_node_ip_address()] * 2
    assert sync.incarnations == ["engine", "engine"]


@pytest.mark.timeout(120)
def test_an_engine_that_fails_to_join_is_named_and_one_that_never_joins_times_out(ray_session, short_rendezvous):
    ray = ray_session
    with pytest.raises(ValueError, match="engine at rank 1 refused"):
        weight_sync.WeightSync(engine_actors(ray, 1, "fail"), RolloutConfig(engine="vllm"), 2, rank=0, use_nccl=True)
    with pytest.raises(RuntimeError, match=f"did not all join within {RENDEZVOUS_S} s"):
        weight_sync.WeightSync(engine_actors(ray, 1, "never"), RolloutConfig(engine="vllm"), 2, rank=0, use_nccl=True)


def test_the_rendezvous_port_stays_taken_until_the_store_has_it():
    with weight_sync.rendezvous_socket() as listener:
        port = listener.getsockname()[1]
        with socket.socket() as other, pytest.raises(OSError) as refused:
            other.bind(("", port))  # another process picking the same port in between
        assert refused.value.errno == errno.EADDRINUSE
