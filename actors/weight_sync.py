"""Learner -> rollout engines weight sync, all of it: buckets, the object-store path, the NCCL path, the probe check.

One control call per engine per sync:
- CPU / HF engines: learner rank 0 puts every parameter, in buckets of `rollout.sync_bucket_mb`, into the
  object store once; each engine loads them in place (`RolloutEngine.update_weights`).
- GPU / vLLM: one NCCL group spans learner rank 0 (rank 0) and every vLLM worker of every engine (engine e's
  workers take ranks `1 + e * tensor_parallel_size ...`), through vLLM 0.33's weight-transfer API: the
  trainer end is what `nccl_common.trainer_init` builds (on a socket held from the moment its port is picked,
  once every engine is up) + `packed_tensor.packed_nccl_broadcast_producer`, the engines receive with
  `LLM.update_weights` (`NCCLWeightTransferEngine.receive_weights`). The packed wire format
  (`packed_wire`) is fixed once, when the engines join. Per sync every engine first checks and opens the
  update (`prepare_weight_update`); only when all accepted does rank 0 broadcast, while each engine's
  `receive_weights` call blocks in its workers (a receiver error after the broadcast started would be an
  NCCL hang, not an error).
After a sync (or a resume) the engines must score a probe sequence as the learner does, within
`rollout.probe_tolerance` (default: by precision, `PROBE_TOLERANCE`), or the run stops. Under ZeRO-3 every
learner rank takes part in gathering the parameters; only rank 0 sends.
"""
from __future__ import annotations

from typing import Callable, Iterable

import math
import socket
import time

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, RayActorError
import torch

from actors.rollout import RolloutEngineError, dtype_name, engine_failure
from sami.config import RolloutConfig
from sami.console import log
from sami.learner import StopRun, full_parameters
from sami.lora import sync_tensors

RESTART_TIMEOUT_S = 600  # a vLLM engine can take minutes to start on a busy node
# How long learner rank 0's rendezvous store waits for every engine worker to join (vLLM's own default). The engines
# are up before it starts waiting, so only an unreachable address or a failed engine runs it out.
RENDEZVOUS_TIMEOUT_S = 300

# |engine - learner| mean log-prob per token of the probe that a correct sync stays within, by the less precise
# of the two sides' dtypes. Measured with the real vLLM engine (tests/vllm_lane, docs/vllm.md): fp32 agrees to
# < 1e-5; bf16 differed by up to 1.2e-2 (trained 2- and 8-layer models), so its bound is ~4x that. fp16 is
# held to the bf16 bound (more mantissa bits; not measured separately).
PROBE_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 5e-2}
NUM_PACKED_BUFFERS = 2  # vLLM's default (packed_tensor.DEFAULT_PACKED_NUM_BUFFERS): double buffering


def probe_tolerance(rollout: RolloutConfig, dtypes: Iterable[torch.dtype]) -> float:
    """`rollout.probe_tolerance` if set, else the bound of the least precise dtype involved."""
    if rollout.probe_tolerance is not None:
        return rollout.probe_tolerance
    return max(PROBE_TOLERANCE.get(d, PROBE_TOLERANCE[torch.bfloat16]) for d in dtypes)


def packed_wire(rollout: RolloutConfig) -> dict:
    """The packed-transfer parameters both ends must share: the engines get them in `init_info`
    (`NCCLWeightTransferInitInfo.packed*`), the learner passes them to the producer."""
    return {"packed": True, "packed_buffer_size_bytes": rollout.sync_bucket_mb * 2**20,
            "packed_num_buffers": NUM_PACKED_BUFFERS}


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
        dtypes.append(dtype_name(tensor.dtype))
        shapes.append(list(tensor.shape))
    return names, dtypes, shapes


def rendezvous_socket() -> socket.socket:
    """A listening socket on a free port of this node, held until the rendezvous store takes it over: a port found
    by binding and closing a socket is free for any process to take before the store binds it."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("", 0))  # every interface: the engines' nodes reach it at this node's address
    listener.listen()
    return listener


def trainer_group(address: str, listener: socket.socket, world_size: int):
    """Learner rank 0's end of the NCCL group (always rank 0), on the current CUDA device: what vLLM's
    `nccl_common.trainer_init` builds, with the store on `listener` and its wait for the engines' workers bounded by
    RENDEZVOUS_TIMEOUT_S."""
    from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
    from vllm.distributed.utils import StatelessProcessGroup
    from vllm.utils.nccl import unpinned_nccl_env

    store = StatelessProcessGroup.create(host=address, port=listener.getsockname()[1], rank=0, world_size=world_size,
                                         store_timeout=RENDEZVOUS_TIMEOUT_S, listen_socket=listener)
    with unpinned_nccl_env():
        return PyNcclCommunicator(store, device=torch.accelerator.current_device_index())


def broadcast_weights(group, named_tensors: Iterable[tuple[str, torch.Tensor]], wire: dict) -> None:
    """Broadcast every parameter in packed buffers, in the order `weight_metadata` listed them (the receivers
    cut the buffers by that list)."""
    from vllm.distributed.weight_transfer.packed_tensor import packed_nccl_broadcast_producer

    packed_nccl_broadcast_producer(iterator=iter(named_tensors), group=group, src=0, post_iter_func=lambda item: item[1],
                                   buffer_size_bytes=wire["packed_buffer_size_bytes"],
                                   num_buffers=wire["packed_num_buffers"])


def open_nccl_group(actors: list, rollout: RolloutConfig):
    """GPU: join learner rank 0 and every engine's vLLM workers in one NCCL group. The engines must be up (their
    join call would otherwise wait behind vLLM's constructor while the store's wait runs out)."""
    # This process's node (learner rank 0's), by the address Ray's nodes reach each other at: never the driver's.
    address, tp = ray.util.get_node_ip_address(), rollout.tensor_parallel_size
    world_size = 1 + len(actors) * tp
    with rendezvous_socket() as listener:  # the store takes the socket over (closing it after is a no-op)
        port = listener.getsockname()[1]
        refs = [a.init_weight_transfer.remote(address, port, 1 + e * tp, world_size, packed_wire(rollout))
                for e, a in enumerate(actors)]
        try:
            group = trainer_group(address, listener, world_size)  # joins while the engines join
        except Exception as e:  # torch's DistStoreError, which vLLM's create_tcp_store re-raises as an OSError (EBADF)
            done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
            ray.get(done)  # an engine that failed to join: its own error first
            cause = e.__context__ if isinstance(e.__context__, torch.distributed.DistStoreError) else e
            raise RuntimeError(f"NCCL weight-transfer rendezvous at {address}:{port}: the rollout engines' workers did "
                               f"not all join within {RENDEZVOUS_TIMEOUT_S} s (can the engines' nodes reach {address}?): "
                               f"{type(cause).__name__}: {cause}") from e
    ray.get(refs)
    return group


def nccl_push(actors: list, group, named: list[tuple[str, torch.Tensor]], wire: dict) -> list[dict]:
    """One NCCL sync: every engine accepts the update before a byte is broadcast."""
    meta = weight_metadata(named)
    ray.get([actor.prepare_weight_update.remote(*meta) for actor in actors])  # raises here, not in NCCL
    refs = [actor.receive_weights.remote() for actor in actors]
    done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
    ray.get(done)  # an engine that already returned can only have failed: surface it instead of hanging
    broadcast_weights(group, named, wire)
    return ray.get(refs)


def no_nccl_rejoin(what: str) -> str:
    return (f"{what}; a restarted vLLM engine cannot rejoin the NCCL weight-transfer group of this run: resume "
            f"the run (--resume) to rebuild it")


class WeightSync:
    """Held by every learner rank; rank 0 owns the transport to the rollout actors."""

    def __init__(self, actors: list, rollout: RolloutConfig, zero_stage: int, rank: int, use_nccl: bool):
        self.actors, self.rollout, self.zero_stage, self.rank = actors, rollout, zero_stage, rank
        # Rank 0 remembers what the engines should hold, to bring a restarted one back: the incarnation each
        # engine had at the last sync, the last buckets pushed (None: the weights on disk) and the last probe.
        # Asking it waits until every engine is up, before the NCCL rendezvous starts its bounded wait.
        self.incarnations = ray.get([a.whoami.remote() for a in actors]) if rank == 0 else []
        self.nccl_group = open_nccl_group(actors, rollout) if use_nccl and rank == 0 else None
        self.last_buckets = None
        self.last_probe: tuple | None = None  # (probe, the learner's log-prob of it)
        self.restarts: list[dict] = []  # engine restarts handled, with their probe checks
        self.restarted_in_sync: list[int] = []  # engines restarted during this sync, until its probe check
        self.dtypes: set[torch.dtype] = set()  # the learner's and the engines' precision, for the probe check

    def push(self, module) -> dict:
        """Every parameter of `module` (under LoRA its adapter only: `sync_tensors`) to every engine; returns the
        bytes moved and the bucket count."""
        with full_parameters(module, self.zero_stage):
            if self.rank != 0:
                return {}
            named = sync_tensors(module)
            broken = next((name for name, t in named if not torch.isfinite(t).all()), None)
            if broken is not None:  # never hand an engine weights it would sample garbage from
                raise StopRun(f"weight sync refused: parameter {broken} holds non-finite values")
            self.dtypes = {t.dtype for _, t in named}
            if self.nccl_group is not None:
                try:
                    results = nccl_push(self.actors, self.nccl_group, named, packed_wire(self.rollout))
                except RayActorError as e:
                    raise StopRun(no_nccl_rejoin(f"a rollout engine was lost during the weight sync "
                                                 f"({engine_failure(e)})")) from None
                self.dtypes |= {getattr(torch, r["dtype"]) for r in results}
                nbytes = sum(t.numel() * t.element_size() for _, t in named)
                return {"sync_bytes": nbytes, "buckets": -(-nbytes // (self.rollout.sync_bucket_mb * 2**20))}
            buckets = state_dict_buckets(named, self.rollout.sync_bucket_mb)
        self.last_buckets = ray.put(buckets)  # from here on what a restarted engine must get
        results = self._on_every_engine(lambda actor: actor.update_weights.remote(self.last_buckets))
        self.incarnations = [r["incarnation"] for r in results]
        self.dtypes |= {getattr(torch, r["dtype"]) for r in results}
        return {"sync_bytes": results[0]["bytes"], "buckets": len(buckets)}

    def verify(self, learner_logprob: float, probe: tuple[list[int], list[int]]) -> float:
        """Rank 0: the engines' probe log-prob against the learner's; raises past the tolerance."""
        if self.rank != 0:
            return 0.0
        self.last_probe = (probe, learner_logprob)
        engines = self._on_every_engine(lambda actor: actor.sequence_logprob.remote(*probe), reload=True)
        diffs = self._probe_check(engines, learner_logprob)
        for index in self.restarted_in_sync:  # probe-checked with the others: report each once
            self._restarted(index, diffs[index])
        self.restarted_in_sync = []
        return max(diffs)

    def _probe_check(self, engines: list[float], learner_logprob: float) -> list[float]:
        """Each engine's |probe log-prob - the learner's|; raises if one is past the tolerance."""
        diffs = [abs(e - learner_logprob) for e in engines]
        tolerance = probe_tolerance(self.rollout, self.dtypes)
        if not all(math.isfinite(d) and d <= tolerance for d in diffs):  # NaN > tol is False: test it apart
            raise StopRun(f"weight sync verification failed: rollout engines score the probe {engines}, the learner "
                          f"{learner_logprob:.6f} (tolerance {tolerance})")
        return diffs

    def _on_every_engine(self, call: Callable, reload: bool = False) -> list:
        """`call(actor)` (one remote call) on every engine at once; the answers in engine order. An engine that dies
        meanwhile is restarted by Ray from the model on disk: it is waited for, given the last pushed weights first
        if `reload` (an `update_weights` call loads them itself) and asked again, at most
        `rollout.max_engine_failures` times; its probe check is `verify`'s."""
        refs, answers = [call(actor) for actor in self.actors], []
        for index, ref in enumerate(refs):
            failures = 0
            while True:
                try:
                    answers.append(ray.get(ref))
                    break
                except RayActorError as e:
                    failures, lost = failures + 1, f"rollout engine {index} lost during the weight sync ({engine_failure(e)})"
                    if self.nccl_group is not None:
                        raise StopRun(no_nccl_rejoin(lost)) from None
                    if failures > self.rollout.max_engine_failures:
                        raise RolloutEngineError(f"{lost}: failed {failures} time(s) in one weight sync "
                                                 f"(rollout.max_engine_failures={self.rollout.max_engine_failures})") from None
                    log(f"{lost}: restarting it")
                    self.incarnations[index] = self._wait_for_restart(index)
                    if reload and self.last_buckets is not None:  # runs before `call` on the one-call-at-a-time actor
                        self.actors[index].update_weights.remote(self.last_buckets)
                    ref = call(self.actors[index])
                    if index not in self.restarted_in_sync:
                        self.restarted_in_sync.append(index)
        return answers

    def _wait_for_restart(self, index: int) -> str:
        """The incarnation of engine `index` once Ray has restarted it (with the weights on disk)."""
        if self.nccl_group is not None:
            raise StopRun(no_nccl_rejoin(f"rollout engine {index} restarted"))
        actor, deadline = self.actors[index], time.monotonic() + RESTART_TIMEOUT_S
        while True:  # Ray restarts the actor in the background; calls fail until it is up
            try:
                incarnation = ray.get(actor.whoami.remote(), timeout=max(deadline - time.monotonic(), 1))
                break
            except (RayActorError, GetTimeoutError) as e:
                if time.monotonic() > deadline:
                    raise StopRun(f"rollout engine {index} did not come back within {RESTART_TIMEOUT_S} s: {e}") from None
                time.sleep(1.0)
        return incarnation

    def recover(self, index: int) -> None:
        """Rank 0: bring restarted engine `index` back to the learner's current weights, probe-checked."""
        actor, incarnation = self.actors[index], self._wait_for_restart(index)
        if self.last_buckets is not None:
            incarnation = ray.get(actor.update_weights.remote(self.last_buckets))["incarnation"]
        diff = None
        if self.last_probe is not None:
            probe, learner_logprob = self.last_probe
            diff = self._probe_check(ray.get([actor.sequence_logprob.remote(*probe)]), learner_logprob)[0]
        self.incarnations[index] = incarnation
        self._restarted(index, diff)

    def _restarted(self, index: int, diff: float | None) -> None:
        self.restarts.append({"engine": index, "probe_abs_diff": diff})
        log(f"rollout engine {index} restarted: current weights loaded"
            + (f", probe check passed (|diff| {diff:.2e})" if diff is not None else " (the weights on disk are current)"))
