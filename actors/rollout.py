"""`RolloutActor`: a Ray actor holding one rollout engine for the whole run (weights synced, never reloaded);
`EnginePool`, the actor group's generation calls (a batch on the first free engine, from any thread or task, or one
engine's batches in order, each sent as soon as the one before is answered), and `generate_on_engines`, an
iteration's batches on the pool from learner rank 0 (the `direct` data plane).

No torch at import: the data plane's task process (actors/data_plane.py) imports this module to call the
engines, and torch would cost it 1.4 s and 250 MiB per iteration; the engine's own module is imported by the actor.
"""
from __future__ import annotations

import os
import queue
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import TYPE_CHECKING, Callable, Iterator, Optional

import numpy as np
import ray
from ray.exceptions import RayActorError

from actors.placement import GroupRequest, request_group
from sami.config import ModelConfig, RolloutConfig, SamplingConfig
from sami.stops import StopRun

if TYPE_CHECKING:
    from sami.rollout_engines import Seeds

# Test-only fault (tests/test_faults.py): the first `update_weights` call that finds no file at this env var's path
# writes it and ends its process, as an engine lost mid-sync would.
EXIT_IN_UPDATE_WEIGHTS = "SAMI_TEST_EXIT_IN_UPDATE_WEIGHTS"
# Benchmark-only stand-in for an engine of realistic speed (benchmarks/data_plane.py): seconds added to each
# `generate` call.
GENERATE_DELAY_S = "SAMI_BENCH_GENERATE_DELAY_S"


def dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


class RolloutWorker:
    """The actor's body; a plain class so tests can run it without Ray."""

    def __init__(self, model_path: str, rollout_cfg: RolloutConfig, model_cfg: ModelConfig):
        from sami.rollout_engines import make_engine  # torch: the engine's process only (see the module's note)

        self.engine = make_engine(model_path, rollout_cfg, model_cfg)
        # A restarted actor is a new incarnation holding the weights on disk, not the learner's: callers compare.
        self.incarnation = uuid.uuid4().hex

    def whoami(self) -> str:
        return self.incarnation

    def generate(self, prompts: list[str], sampling: SamplingConfig, seeds: list[int]) -> dict:
        """{"incarnation", "completions"}: completions as plain dicts (`text`, `token_ids`, `finish_reason`)."""
        time.sleep(float(os.environ.get(GENERATE_DELAY_S, 0)))
        return {"incarnation": self.incarnation,
                "completions": [c.__dict__ for c in self.engine.generate(prompts, sampling, seeds)]}

    def update_weights(self, buckets: list[dict[str, np.ndarray]]) -> dict:
        """One control call per sync: the caller passes ONE object ref holding all buckets (Ray resolves it
        to the list here, zero-copy for numpy). Returns the time spent loading, the bytes moved, the incarnation."""
        marker = os.environ.get(EXIT_IN_UPDATE_WEIGHTS)
        if marker and not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)
        start = time.perf_counter()
        self.engine.update_weights(buckets)
        self.engine.reset_prefix_cache()
        nbytes = sum(a.nbytes for bucket in buckets for a in bucket.values())
        return {"seconds": time.perf_counter() - start, "bytes": nbytes, "dtype": dtype_name(self.engine.dtype),
                "incarnation": self.incarnation}

    def sequence_logprob(self, prompt_ids: list[int], response_ids: list[int]) -> float:
        return self.engine.sequence_logprob(prompt_ids, response_ids)

    def reset_prefix_cache(self) -> None:
        self.engine.reset_prefix_cache()

    # GPU path (vLLM only): see actors/weight_sync.py
    def init_weight_transfer(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                             wire: dict) -> None:
        self.engine.init_weight_transfer(master_address, master_port, rank_offset, world_size, wire)

    def prepare_weight_update(self, names: list[str], dtype_names: list[str], shapes: list[list[int]]) -> None:
        self.engine.prepare_weight_update(names, dtype_names, shapes)

    def receive_weights(self) -> dict:
        start = time.perf_counter()
        self.engine.receive_weights()
        return {"seconds": time.perf_counter() - start, "dtype": dtype_name(self.engine.dtype)}


RolloutActor = ray.remote(RolloutWorker)


# One node per engine. vLLM's own group (vllm/v1/executor/ray_utils.py initialize_ray_cluster) is PACK, "as few
# nodes as possible": four TP-4 groups asked for at once (an evaluation of four models) were split 3 + 1 and
# 2 + 1 + 1 over the 4-GPU rollout nodes (tests/test_placement.py), tensor parallelism across machines.
VLLM_PLACEMENT_STRATEGY = "STRICT_PACK"


def vllm_bundles(tp: int, gpus: float = 1.0) -> list[dict]:
    """One vLLM engine's placement group: `tp` bundles of one GPU (TP 1: `gpus`, a share of one). The engine must be built inside an *actor*
    scheduled in such a group: vLLM 0.33 captures the current group only inside an actor (vllm/engine/arg_utils.py:
    `if is_in_ray_actor(): placement_group = ray.util.get_current_placement_group()`); built in a task, or by a
    holder outside a group, it makes a group of its own and reserves `tp` GPUs more (8 GPUs for a TP-4 engine)."""
    return [{"GPU": gpus, "CPU": 1}] * tp


def vllm_holder_options(tp: int, gpus: float = 1.0) -> dict:
    """Ray resources of the actor that builds a TP-`tp` engine inside its group (bundle 0). TP = 1: it holds
    the bundle's GPU itself; TP > 1: none, and vLLM's Ray executor starts one worker per bundle
    (VLLM_RAY_BUNDLE_INDICES) in the group it captured."""
    if tp == 1:
        return {"num_cpus": 1, "num_gpus": gpus}
    return {"num_cpus": 0, "num_gpus": 0,
            "runtime_env": {"env_vars": {"VLLM_RAY_BUNDLE_INDICES": ",".join(map(str, range(tp)))}}}


def holder_strategy(group):
    """Bundle 0 of `group` for the actor that holds an engine; the tasks and actors it starts (vLLM's TP workers)
    stay in the group."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return PlacementGroupSchedulingStrategy(group, placement_group_capture_child_tasks=True, placement_group_bundle_index=0)


def engine_placement(what: str, engine: str, tp: int, gpus: float, cpus: float,
                     selector: Optional[dict] = None) -> tuple[GroupRequest, dict]:
    """One engine's placement group, on nodes matching `selector` (actors/placement.py), asked for now and not waited
    for, and the Ray options of the actor that holds the engine in its bundle 0: vllm, `vllm_bundles` (`gpus` per
    tensor-parallel rank) and `vllm_holder_options`; hf, one bundle of `cpus` CPUs and `gpus` GPUs (none: it runs on
    a CPU). Training's rollout engines, the evaluation's model actors; Serve replicas get the vLLM group through
    their deployment options (cluster/serve_app.py)."""
    if engine == "vllm":
        bundles, own = vllm_bundles(tp, gpus), vllm_holder_options(tp, gpus)
    else:
        bundles, own = [{"CPU": cpus, **({"GPU": gpus} if gpus else {})}], {"num_cpus": cpus, "num_gpus": gpus}
    request = request_group(what, bundles, selector, VLLM_PLACEMENT_STRATEGY)
    return request, {**own, "scheduling_strategy": holder_strategy(request.group)}


def rollout_placement(index: int, rollout_cfg: RolloutConfig, selector: Optional[dict] = None) -> tuple[GroupRequest, dict]:
    """Rollout engine `index`'s `engine_placement`: `gpus_per_engine` (below 1, a share of one device that a learner's
    share can take the rest of) and `cpus_per_engine`."""
    r = rollout_cfg
    return engine_placement(f"rollout engine {index}", r.engine, r.tensor_parallel_size, r.engine_gpus,
                            r.cpus_per_engine, selector)


def start_rollout_actors(model_path: str, rollout_cfg: RolloutConfig, model_cfg: ModelConfig,
                         selector: Optional[dict] = None) -> tuple[list, list[GroupRequest]]:
    """`rollout.num_engines` actors, each holding one engine (one control call per call, one at a time) in a placement
    group of its own on nodes matching `selector`; returns them and their groups, which the caller waits for
    (`actors.placement.wait_for_groups`, with the learners') and removes. Ray restarts a dead actor (without limit:
    `generate_on_engines` bounds the failures per iteration); its calls are never retried, since the restarted engine
    must first get the learner's weights back."""
    placements = [rollout_placement(i, rollout_cfg, selector) for i in range(rollout_cfg.num_engines)]
    actors = [RolloutActor.options(max_concurrency=1, max_restarts=-1, max_task_retries=0, **options)
              .remote(model_path, rollout_cfg, model_cfg) for _, options in placements]
    return actors, [request for request, _ in placements]


def engines_started(actors: list) -> None:
    """Wait for every engine's constructor; an engine that died in it raises RolloutEngineError naming it and why
    (Ray does not restart an actor whose constructor raised)."""
    for index, actor in enumerate(actors):
        try:
            ray.get(actor.whoami.remote())
        except RayActorError as e:
            raise RolloutEngineError(f"rollout engine {index} died while starting: "
                                     f"{str(e).strip().splitlines()[-1].strip()}") from None


class RolloutEngineError(StopRun):
    """An engine failed more often in one iteration (or one weight sync) than `rollout.max_engine_failures` allows."""


def engine_failure(error: RayActorError) -> str:
    """Why an engine call failed, in one line."""
    return f"{type(error).__name__}: {str(error).splitlines()[0]}"


class EnginePool:
    """The rollout engines as one pool that any number of threads generate on: each batch goes to the first free
    engine (load, not a hash, decides; one call in flight per engine, no proxy per engine); or, `stream`, one
    engine's batches from one caller, in order.

    A batch answered by an engine that died, or by a new incarnation of it (restarted, so holding the weights on
    disk), is thrown away and generated again on it after `recover(engine index)` has given that engine the current
    weights and updated `incarnations` (the list is shared with the caller: `WeightSync.incarnations`); more than
    `max_failures` failures of one engine stop the iteration.
    """

    def __init__(self, actors: list, incarnations: list[str], recover: Optional[Callable[[int], None]] = None,
                 max_failures: int = 0):
        self.actors, self.incarnations, self.recover, self.max_failures = actors, incarnations, recover, max_failures
        self.free: queue.Queue[int] = queue.Queue()  # `generate`'s engines not in a call
        for engine in range(len(actors)):
            self.free.put(engine)
        self.failures: Counter = Counter()
        self.lock = threading.Lock()

    def generate(self, prompts: list[str], sampling: SamplingConfig, seeds: Seeds) -> list[dict]:
        """The batch's completions (`seeds`: one per prompt), from the first engine that is free."""
        engine = self.free.get()
        try:
            while True:
                call = self.actors[engine].generate.remote(prompts, sampling, seeds)
                completions, problem = self._answer(engine, call)
                if problem is None:
                    return completions
                self._failed(engine, problem)
        finally:
            self.free.put(engine)

    def stream(self, engine: int, batches: list[tuple[list[str], Seeds]],
               sampling: SamplingConfig) -> Iterator[list[dict]]:
        """Each of `batches` (prompts, seeds) answered by `engine` alone, in order. The next batch is sent as soon as
        one is answered, before the caller handles the answer: the engine never waits for the caller's own work."""
        def send(index: int):
            prompts, seeds = batches[index]
            return self.actors[engine].generate.remote(prompts, sampling, seeds)

        pending = send(0) if batches else None
        for index in range(len(batches)):
            completions, problem = self._answer(engine, pending)
            while problem is not None:
                self._failed(engine, problem)
                completions, problem = self._answer(engine, send(index))
            pending = send(index + 1) if index + 1 < len(batches) else None
            yield completions

    def _answer(self, engine: int, call) -> tuple[Optional[list[dict]], Optional[str]]:
        """(the completions, None), or (None, why they do not count: the engine died, or restarted)."""
        try:
            answer = ray.get(call)
        except RayActorError as e:
            return None, engine_failure(e)
        if answer["incarnation"] != self.incarnations[engine]:
            return None, "it restarted with the weights on disk"
        return answer["completions"], None

    def _failed(self, engine: int, problem: str) -> None:
        """Count the failure; past `max_failures`, stop the iteration, else give the engine the current weights."""
        with self.lock:
            self.failures[engine] += 1
            failures = self.failures[engine]
        if self.recover is None or failures > self.max_failures:
            raise RolloutEngineError(f"rollout engine {engine} failed {failures} time(s) in one iteration "
                                     f"(rollout.max_engine_failures={self.max_failures}); last: {problem}")
        self.recover(engine)  # the current weights and a probe check before it serves again


def generate_on_engines(actors: list, prompt_batches: list[list[str]], sampling: SamplingConfig, seeds: list[Seeds],
                        incarnations: list[str], recover: Optional[Callable[[int], None]] = None,
                        max_failures: int = 0, on_batch: Optional[Callable[[int, int], None]] = None) -> list[dict]:
    """Every batch's completions, in batch order (`seeds`: each batch's, one per prompt), from an `EnginePool`
    with one thread per engine. `on_batch(batches done, batches)` is called as each batch is answered."""
    pool = EnginePool(actors, incarnations, recover, max_failures)
    with ThreadPoolExecutor(max_workers=len(actors), thread_name_prefix="sami-engine") as threads:
        answered = [threads.submit(pool.generate, batch, sampling, s) for batch, s in zip(prompt_batches, seeds)]
        for done, batch in enumerate(as_completed(answered), 1):
            batch.result()  # an engine past its failures stops the iteration now
            if on_batch is not None:
                on_batch(done, len(answered))
    return [completion for batch in answered for completion in batch.result()]
