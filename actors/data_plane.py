"""Ray Data as the online loop's data plane: an iteration's planned groups flow through one generation stage
(engines -> completions -> filter) and stream into the learner ranks, which train on their first micro-batch
while the engines still generate.

Per iteration, learner rank 0 builds `generation_dataset`: one row, and one block, per generation batch
(`ray.data.from_items`), then ONE `map_batches` stage whose callable class, `GenerationStage`, runs in one
proxy actor (0 CPUs: a proxy reserving a share of a CPU never schedules on 2 CPUs) with one thread per engine,
each sending its batch to the first free long-lived `RolloutActor` (`EnginePool`: nothing loads a model per
iteration), attaching the completions and filtering, in the same stage (a filter stage of its own waits on a
CPU the learners hold). `split_for_learners` streams the kept groups to the ranks (`streaming_split(equal=True)`,
in order: `preserve_order`, so the same seed sends the same groups to the same rank); each rank tokenises the
groups it trains on. The stage writes one ledger file per batch (every group, kept or not; the engines it
restarted) into the iteration folder; rank 0 reads them once the stream ended, for groups.parquet, the filter
counts and the restart figures (`read_ledger`).

The proxy imports neither torch nor transformers (1.4 s and 250 MiB per process, per iteration): a restarted
engine is recovered through `WeightSync.for_recovery`, imported only then.
"""
from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import pyarrow as pa
import ray

from actors.rollout import EnginePool
from sami.config import FilterConfig, SamplingConfig
from sami.console import open_channel, report_progress
from sami.groups import (QueryGroup, attach_completions, filter_groups, generation_seeds, group_from_json,
                         group_to_json)
from sami.jsonl import read_jsonl
from sami.stops import StopRun

# How long an operator waits for its proxy actor before the execution fails with an error (a silent wait otherwise).
MIN_ACTORS_WAIT_S = 600


def configure_ray_data() -> None:
    """This process's Ray Data settings for the loop: outputs in input order (which groups reach which rank is then
    the same for the same seed), no progress bars (the job log holds Ray Data's lines), a bounded wait for actors."""
    from ray.data import DataContext

    context = DataContext.get_current()
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False
    context.wait_for_min_actors_s = MIN_ACTORS_WAIT_S


@dataclass(frozen=True)
class StageSpec:
    """What the generation stage's proxy needs; pickled once per execution."""

    actors: tuple
    sampling: SamplingConfig
    filters: FilterConfig
    seed: int  # the run seed (each prompt's sampling seed: `generation_seeds`)
    iteration: int
    policy_iteration: int  # whose weights the engines hold (0: the base model)
    ledger: str  # the folder of the per-batch ledger files
    batches: int
    console: Optional[Path]  # console.jsonl: the proxy's restart lines and progress reach the console
    recovery: dict  # WeightSync.recovery_state()
    max_failures: int


def ledger_file(folder: Path, batch: int) -> Path:
    return folder / f"batch-{batch:05d}.json"


class GenerationStage:
    """The one Ray Data stage: a batch of planned groups -> completions from the first free engine -> the kept
    groups (JSON rows). Runs in one threaded proxy actor, a thread per engine."""

    def __init__(self, spec: StageSpec):
        self.spec = spec
        if spec.console:
            open_channel(spec.console)
        self.pool = EnginePool(list(spec.actors), spec.recovery["incarnations"], self._recover, spec.max_failures)
        self.lock, self.done, self.sync = threading.Lock(), 0, None
        self.local = threading.local()  # each thread's engine restarts, for its batch's ledger

    def _recover(self, engine: int) -> None:
        from actors.weight_sync import WeightSync  # torch, only once an engine has restarted (the module's note)

        with self.lock:  # one recovery at a time: they share the incarnations and the restarts list
            if self.sync is None:
                self.sync = WeightSync.for_recovery(list(self.spec.actors), self.spec.recovery)
            self.sync.recover(engine)
            self.local.restarts.append(self.sync.restarts[-1])

    def __call__(self, rows: dict) -> pa.Table:
        spec, batch = self.spec, int(rows["batch"][0])
        groups = [group_from_json(text) for text in json.loads(rows["groups"][0])]
        self.local.restarts = []
        completions = self.pool.generate([p for g in groups for p in g.generation_prompts], spec.sampling,
                                         [s for g in groups for s in generation_seeds(g, spec.seed, spec.iteration)])
        attach_completions(groups, completions)
        filter_groups(groups, spec.filters)
        for group in groups:
            group.policy_iteration, group.staleness = spec.policy_iteration, spec.iteration - 1 - spec.policy_iteration
        write_ledger(ledger_file(Path(spec.ledger), batch),
                     {"batch": batch, "groups": [g.record() for g in groups], "restarts": self.local.restarts,
                      "finished": time.time()})
        with self.lock:
            self.done += 1
            report_progress(f"iteration {spec.iteration} generate", self.done, spec.batches, "batch")
        return pa.table({"group": pa.array([group_to_json(g) for g in groups if not g.reject_reason], pa.string())})


def write_ledger(path: Path, entry: dict) -> None:
    """One batch's ledger, whole or not at all (rank 0 reads the folder once the stream ended)."""
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(entry) + "\n")
    os.replace(partial, path)


def read_ledger(folder: Path, batches: int) -> tuple[list[QueryGroup], list[dict], float]:
    """(every group of the iteration in query order, kept or not; the engines restarted; when the last batch was
    generated, as time.time()). Every batch must be there: the stream ends only after the stage's last call."""
    entries = []
    for batch in range(batches):
        path = ledger_file(folder, batch)
        if not path.is_file():
            raise StopRun(f"the data plane ended without batch {batch} of {batches} ({path} is missing)")
        entries.extend(read_jsonl(path))
    groups = [QueryGroup.from_record(row) for entry in entries for row in entry["groups"]]
    return groups, [r for entry in entries for r in entry["restarts"]], max(e["finished"] for e in entries)


def generation_dataset(spec: StageSpec, batches: list[list[QueryGroup]]):
    """The iteration's planned batches through the generation stage: a lazy `ray.data.Dataset` of kept groups."""
    import ray.data

    rows = [{"batch": i, "groups": json.dumps([group_to_json(g) for g in batch])} for i, batch in enumerate(batches)]
    return ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
        GenerationStage, fn_constructor_args=(spec,), batch_size=1, num_cpus=0,
        compute=ray.data.ActorPoolStrategy(size=1, max_tasks_in_flight_per_actor=len(spec.actors),
                                           max_concurrent_calls_per_actor=len(spec.actors)))


def replay_dataset(groups: list[QueryGroup]):
    """Groups another run recorded (filtered and tokenised there), as the same one-column dataset."""
    import ray.data

    return ray.data.from_items([{"group": group_to_json(g)} for g in groups])


def split_for_learners(dataset, world: int) -> list:
    """One streaming iterator per learner rank, of equal length (the remainder is dropped), in order."""
    return dataset.streaming_split(world, equal=True)


def stream_groups(split) -> Iterator[QueryGroup]:
    """A rank's groups as its split delivers them; a failed generation stage is a `StopRun` with its reason."""
    try:
        for row in split.iter_rows():
            yield group_from_json(row["group"])
    except Exception as e:  # Ray Data wraps the stage's error: find the stop the stage raised
        cause = e
        while cause is not None and not isinstance(cause, StopRun):
            cause = getattr(cause, "cause", None) or cause.__cause__
        raise StopRun(f"the data plane stopped: {cause if cause is not None else str(e).splitlines()[0]}") from None
