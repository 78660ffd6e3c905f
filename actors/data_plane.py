"""Ray Data as the online loop's data plane: an iteration's planned groups flow through one generation stage
(engines -> completions -> filter) and stream into the learner ranks, which train on their first micro-batch
while the engines still generate.

Per iteration, learner rank 0 plans the generation batches and hands rank r every W-th one (r, r + W, ...);
each rank runs its own Ray Data execution of them (`generation_dataset`: `ray.data.from_items` of one row per
engine its batches go to, engine `batch % num_engines`, then ONE `map_batches` stage, `generate_batches`, as 0-CPU
tasks: a task reserving a share of a CPU never schedules on 2 CPUs, and the learners hold them). A task sends its
engine's batches to it in order, the next as soon as one is answered (`EnginePool.stream`: the engine never waits
for Ray Data to start the next task, 17-36 ms a batch when a task was a batch), attaches the completions and filters
them in the same stage (a filter stage of its own waits on a CPU the learners hold), and yields each batch as its
own block once answered; the rank reads them as they come and puts them back in batch order (`stream_groups`: the
same seed gives a rank the same groups in the same order) and tokenises the groups it trains on. The engines are
the long-lived `RolloutActor`s: nothing loads a model per iteration. Tasks, not an actor pool, and no
streaming_split: the task workers stay up from one iteration to the next, where an actor pool and a split
coordinator are two new processes every iteration (2 to 3 s each on 2 cores: benchmarks/README.md, "Data plane").

Each task writes one ledger file per batch (every group, kept or not) into the iteration folder; rank 0 reads
them once every rank's stream ended, for groups.parquet and the filter counts (`read_ledger`). A task that
meets a restarted engine leaves a request there (once per lost incarnation, whichever tasks met it) and waits:
rank 0's `RecoveryDesk` thread recovers the engine as the direct path does (`WeightSync.recover`: rank 0 owns
the last pushed weights) and answers. The tasks import neither torch nor transformers (1.4 s and 250 MiB a process).
"""
from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import pyarrow as pa

from actors.rollout import EnginePool, RolloutEngineError
from sami.config import FilterConfig, SamplingConfig
from sami.console import open_channel, report_progress
from sami.groups import (QueryGroup, attach_completions, filter_groups, generation_seeds, group_from_json,
                         group_to_json)
from sami.jsonl import read_jsonl
from sami.stops import StopRun


def configure_ray_data() -> None:
    """This process's Ray Data settings for the loop: outputs in input order (a replay run reads groups.parquet in
    order; the generation stage, whose blocks come as the engines answer, opts out), no progress bars (the job log
    holds Ray Data's lines), Parquet read by tasks alone (the V2 datasource starts 32 footer-reader actors per read:
    13 to 20 s for one groups.parquet on 2 cores, not 0.15 s)."""
    from ray.data import DataContext

    context = DataContext.get_current()
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False
    context.use_datasource_v2 = False


def host_ray_data_services() -> None:
    """Ray Data's per-cluster actors on this process's node: the driver's, called before any learner starts.

    Ray Data creates them, detached, on the node of the first process that runs an execution ("so it fate-shares
    with the driver", ray/data/_internal/stats.py): here a learner rank on a GPU node, which then never went idle
    and was never scaled down after the job (test_autoscaling). Created first from the driver, on the head node,
    the ranks' executions find them by name. Ray 2.60's own get-or-create calls, under Ray Data's own conditions:
    the stats actor always, the usage collector where usage stats are on, the summary store where enabled."""
    from ray.data import DataContext
    from ray.data._internal.stats import get_or_create_stats_actor
    from ray.data._internal.stats_summary_actor import _get_or_create_stats_summary_actor
    from ray.data._internal.usage.actor import get_or_create_usage_collection_actor
    from ray.data._internal.usage.collector import usage_collection_disabled

    get_or_create_stats_actor()
    if not usage_collection_disabled():
        get_or_create_usage_collection_actor()
    if DataContext.get_current().enable_stats_summary_collection:
        _get_or_create_stats_summary_actor()


@dataclass(frozen=True)
class StageSpec:
    """What the generation stage's tasks need (one per iteration)."""

    actors: tuple
    sampling: SamplingConfig
    filters: FilterConfig
    seed: int  # the run seed (each prompt's sampling seed: `generation_seeds`)
    iteration: int
    policy_iteration: int  # whose weights the engines hold (0: the base model)
    ledger: str  # the folder of the per-batch ledger files
    batches: int
    console: Optional[Path]  # console.jsonl: the tasks' progress reaches the console
    incarnations: tuple  # each engine's incarnation when the stage starts (WeightSync.incarnations)
    max_failures: int

    def engine(self, batch: int) -> int:
        return batch % len(self.actors)


def ledger_file(folder: Path, batch: int) -> Path:
    return folder / f"batch-{batch:05d}.json"


def generate_batches(rows: dict, spec: StageSpec) -> Iterator[pa.Table]:
    """The one Ray Data stage: one engine's share of a rank's batches of planned groups (a row) -> completions, the
    next batch sent as soon as one is answered (`EnginePool.stream`) -> the kept groups, one row (and one block) per
    batch: its index and its kept groups as JSON; each batch's ledger file."""
    if spec.console:
        open_channel(spec.console)
    engine, planned = int(rows["engine"][0]), json.loads(rows["batches"][0])
    batches = [(row["batch"], [group_from_json(text) for text in json.loads(row["groups"])]) for row in planned]
    incarnations = list(spec.incarnations)
    pool = EnginePool(list(spec.actors), incarnations, lambda _: request_recovery(spec, engine, incarnations),
                      spec.max_failures)
    answers = pool.stream(engine, [([p for g in groups for p in g.generation_prompts],
                                    [s for g in groups for s in generation_seeds(g, spec.seed, spec.iteration)])
                                   for _, groups in batches], spec.sampling)
    folder = Path(spec.ledger)
    for (batch, groups), completions in zip(batches, answers):
        attach_completions(groups, completions)
        filter_groups(groups, spec.filters)
        for group in groups:
            group.policy_iteration, group.staleness = spec.policy_iteration, spec.iteration - 1 - spec.policy_iteration
        write_ledger(ledger_file(folder, batch), {"batch": batch, "groups": [g.record() for g in groups],
                                                  "finished": time.time()})
        report_progress(f"iteration {spec.iteration} generate", len(list(folder.glob("batch-*.json"))), spec.batches,
                        "batch")
        kept = json.dumps([group_to_json(g) for g in groups if not g.reject_reason])
        yield pa.table({"batch": pa.array([batch], pa.int64()), "groups": pa.array([kept], pa.string())})


def request_recovery(spec: StageSpec, engine: int, incarnations: list[str]) -> None:
    """`engine` failed (or answered as a new incarnation): ask learner rank 0's `RecoveryDesk` to bring it back to
    the current weights (rank 0 holds them), once per lost incarnation whichever tasks met it; wait for it and
    take the engine's new incarnation. More than `max_failures` requests for one engine stop the iteration."""
    folder, lost = Path(spec.ledger), incarnations[engine]
    request = folder / f"restart-{engine}-{lost}"
    try:
        os.close(os.open(request, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        if len([f for f in folder.glob(f"restart-{engine}-*") if not f.suffix]) > spec.max_failures:  # requests
            write_ledger(request.with_suffix(".done"), {"error": f"rollout engine {engine} failed more than "
                         f"rollout.max_engine_failures={spec.max_failures} time(s) in one iteration"})
    except FileExistsError:  # another task met the same loss
        pass
    done = request.with_suffix(".done")
    while not done.is_file():
        time.sleep(0.2)
    answer = json.loads(done.read_text())
    if "error" in answer:
        raise RolloutEngineError(answer["error"])
    incarnations[engine] = answer["incarnation"]


class RecoveryDesk:
    """Learner rank 0, while an iteration's stage runs: a thread that answers the tasks' recovery requests with
    `recover(engine)` (WeightSync.recover: wait for Ray's restart, the last pushed weights, the probe check) and
    `incarnation(engine)`. The weights stay with their owner; no task process imports torch."""

    def __init__(self, ledger: Path, recover: Callable[[int], None], incarnation: Callable[[int], str]):
        self.ledger, self.recover, self.incarnation = ledger, recover, incarnation
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._serve, name="sami-recovery", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopped.wait(0.2):
            for request in sorted(self.ledger.glob("restart-*")):
                done = request.with_suffix(".done")
                if request.suffix or done.exists():
                    continue
                engine = int(request.name.split("-")[1])
                try:
                    self.recover(engine)
                    answer = {"incarnation": self.incarnation(engine)}
                except StopRun as e:
                    answer = {"error": str(e)}
                write_ledger(done, answer)

    def close(self) -> None:
        self.stopped.set()
        self.thread.join()


def write_ledger(path: Path, entry: dict) -> None:
    """One batch's ledger, whole or not at all (rank 0 reads the folder once the stream ended)."""
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(entry) + "\n")
    os.replace(partial, path)


def read_ledger(folder: Path, batches: int) -> tuple[list[QueryGroup], float]:
    """(every group of the iteration in query order, kept or not; when the last batch was generated, as
    time.time()). Every batch must be there: the stream ends only after the stage's last call."""
    entries = []
    for batch in range(batches):
        path = ledger_file(folder, batch)
        if not path.is_file():
            raise StopRun(f"the data plane ended without batch {batch} of {batches} ({path} is missing)")
        entries.extend(read_jsonl(path))
    groups = [QueryGroup.from_record(row) for entry in entries for row in entry["groups"]]
    return groups, max(e["finished"] for e in entries)


def batch_rows(batches: list[list[QueryGroup]]) -> list[dict]:
    """The planned batches as rows: the batch's index and its groups (generation prompts too) as JSON."""
    return [{"batch": i, "groups": json.dumps([group_to_json(g) for g in batch])} for i, batch in enumerate(batches)]


def engine_rows(spec: StageSpec, rows: list[dict]) -> list[dict]:
    """A rank's batches (`batch_rows`) as the stage's input: one row per engine they go to, its batches in order."""
    engines = sorted({spec.engine(row["batch"]) for row in rows})
    return [{"engine": e, "batches": json.dumps([row for row in rows if spec.engine(row["batch"]) == e])}
            for e in engines]


def generation_dataset(spec: StageSpec, rows: list[dict]):
    """`rows` (some of the iteration's batches) through the generation stage: a lazy dataset of kept groups, one
    task per engine, each batch its own block as soon as it is answered."""
    import ray.data

    configure_ray_data()
    inputs = engine_rows(spec, rows)
    dataset = ray.data.from_items(inputs, override_num_blocks=max(len(inputs), 1))
    # Each batch (one row) a block of its own, as soon as it is answered (a task's output is otherwise bundled up to
    # 128 MiB: one block at its end), in the order the engines answer: `stream_groups` puts the batches back in order.
    dataset.context.target_max_block_size = 1
    dataset.context.execution_options.preserve_order = False
    return dataset.map_batches(generate_batches, fn_args=(spec,), batch_size=1, num_cpus=0,
                               concurrency=max(len(inputs), 1))


def read_groups(path: Path) -> list[QueryGroup]:
    """A run's saved groups (`iteration-k/groups.parquet`) back through Ray Data, in order: a replay run's data plane
    (0-CPU read tasks, as the generation stage's: the learners hold the CPUs)."""
    import ray.data

    configure_ray_data()
    dataset = ray.data.read_parquet(str(path), ray_remote_args={"num_cpus": 0})
    return [QueryGroup.from_record(row) for block in dataset.iter_batches(batch_size=None, batch_format="pyarrow")
            for row in block.to_pylist()]


def in_batch_order(answered: Iterable[tuple[int, str]], batches: list[int]) -> Iterator[str]:
    """The stage's rows (a batch's index, its kept groups as JSON), arriving in any order, as the kept groups of
    `batches` in batch order: each batch once every batch before it is here."""
    order, arrived = iter(sorted(batches)), {}
    waiting = next(order, None)
    for batch, groups in answered:
        arrived[batch] = groups
        while waiting in arrived:
            yield from json.loads(arrived.pop(waiting))
            waiting = next(order, None)
    if waiting is not None:
        raise StopRun(f"the data plane ended without batch {waiting} (this rank's batches: {sorted(batches)})")


def stream_groups(spec: StageSpec, rows: list[dict]) -> Iterator[QueryGroup]:
    """A rank's kept groups (its batches: `rows`) as the generation stage delivers them, in batch order (the same seed
    gives a rank the same groups in the same order); a failed generation stage is a `StopRun` with its reason."""
    # no prefetch: `iter_batches` would otherwise hold each block back until the next one is done (a batch late)
    blocks = generation_dataset(spec, rows).iter_batches(batch_size=None, prefetch_batches=0, batch_format="pyarrow")
    answered = (row for block in blocks
                for row in zip(block.column("batch").to_pylist(), block.column("groups").to_pylist()))
    try:
        for text in in_batch_order(answered, [row["batch"] for row in rows]):
            yield group_from_json(text)
    except Exception as e:  # Ray Data wraps the stage's error: find the stop the stage raised
        cause = e
        while cause is not None and not isinstance(cause, StopRun):
            cause = getattr(cause, "cause", None) or cause.__cause__
        if isinstance(cause, StopRun):
            raise type(cause)(str(cause)) from None
        raise StopRun(f"the data plane stopped: {cause if cause is not None else str(e).splitlines()[0]}") from None
