"""Ray Data as the online loop's data plane: an iteration's planned groups flow through one generation stage
(engines -> completions -> filter) and stream into the learner ranks, which train on their first micro-batch
while the engines still generate.

Per iteration, learner rank 0 plans the generation batches and hands rank r every W-th one (r, r + W, ...);
each rank runs its own Ray Data execution of them (`generation_dataset`: one row, and one block, per batch,
`ray.data.from_items`, then ONE `map_batches` stage, `generate_batch`, as 0-CPU tasks: a task reserving a share
of a CPU never schedules on 2 CPUs, and the learners hold them) and reads the kept groups as they come
(`stream_groups`), in order (`preserve_order`: the same seed gives a rank the same groups). A task sends its
batch to engine `batch % num_engines` (the long-lived `RolloutActor`s: nothing loads a model per iteration),
attaches the completions and filters them in the same stage (a filter stage of its own waits on a CPU the
learners hold); the rank tokenises the groups it trains on. Tasks, not an actor pool, and no streaming_split:
the task workers stay up from one iteration to the next, where an actor pool and a split coordinator are two
new processes every iteration (2 to 3 s each on 2 cores: benchmarks/README.md, "Data plane").

Each task writes one ledger file per batch (every group, kept or not; the engine restarts it handled) into the
iteration folder; rank 0 reads them once every rank's stream ended, for groups.parquet, the filter counts and
the restart figures (`read_ledger`). The tasks import neither torch nor transformers (1.4 s and 250 MiB a
process): a restarted engine is recovered through `WeightSync.for_recovery`, imported only then; the first task
to meet an engine's new incarnation recovers it (a claim file in the ledger), the others wait for that.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import pyarrow as pa

from actors.rollout import EnginePool, RolloutEngineError
from sami.config import FilterConfig, SamplingConfig
from sami.console import open_channel, report_progress
from sami.groups import (QueryGroup, attach_completions, filter_groups, generation_seeds, group_from_json,
                         group_to_json)
from sami.jsonl import read_jsonl
from sami.stops import StopRun


def configure_ray_data() -> None:
    """This process's Ray Data settings for the loop: outputs in input order (the same seed gives a rank the same
    groups in the same order), no progress bars (the job log holds Ray Data's lines)."""
    from ray.data import DataContext

    context = DataContext.get_current()
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False


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
    console: Optional[Path]  # console.jsonl: the tasks' restart lines and progress reach the console
    recovery: dict  # WeightSync.recovery_state()
    max_failures: int

    def engine(self, batch: int) -> int:
        return batch % len(self.actors)


def ledger_file(folder: Path, batch: int) -> Path:
    return folder / f"batch-{batch:05d}.json"


def generate_batch(rows: dict, spec: StageSpec) -> pa.Table:
    """The one Ray Data stage: a batch of planned groups -> completions from its engine -> the kept groups (one JSON
    row each); the batch's ledger file."""
    if spec.console:
        open_channel(spec.console)
    batch = int(rows["batch"][0])
    groups = [group_from_json(text) for text in json.loads(rows["groups"][0])]
    engine, restarts = spec.engine(batch), []
    incarnations = list(spec.recovery["incarnations"])
    pool = EnginePool(list(spec.actors), incarnations, lambda _: restarts.extend(recover(spec, engine, incarnations)),
                      spec.max_failures, engines=[engine])
    completions = pool.generate([p for g in groups for p in g.generation_prompts], spec.sampling,
                                [s for g in groups for s in generation_seeds(g, spec.seed, spec.iteration)])
    attach_completions(groups, completions)
    filter_groups(groups, spec.filters)
    for group in groups:
        group.policy_iteration, group.staleness = spec.policy_iteration, spec.iteration - 1 - spec.policy_iteration
    folder = Path(spec.ledger)
    write_ledger(ledger_file(folder, batch), {"batch": batch, "groups": [g.record() for g in groups],
                                              "restarts": restarts, "finished": time.time()})
    report_progress(f"iteration {spec.iteration} generate", len(list(folder.glob("batch-*.json"))), spec.batches, "batch")
    return pa.table({"group": pa.array([group_to_json(g) for g in groups if not g.reject_reason], pa.string())})


def recover(spec: StageSpec, engine: int, incarnations: list[str]) -> list[dict]:
    """Bring restarted `engine` back to the learner's weights, probe-checked, once per new incarnation: the first
    task to claim it does; the others wait for its note. Updates `incarnations`; returns the restart it handled."""
    from actors.weight_sync import RESTART_TIMEOUT_S, WeightSync  # torch, only now (the module's note)

    sync = WeightSync.for_recovery(list(spec.actors), {**spec.recovery, "incarnations": incarnations})
    incarnation = sync._wait_for_restart(engine)
    claim = Path(spec.ledger) / f"restart-{engine}-{incarnation}"
    done = claim.with_suffix(".done")
    try:
        os.close(os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:  # another task is recovering this incarnation
        deadline = time.monotonic() + RESTART_TIMEOUT_S
        while not done.is_file():
            if time.monotonic() > deadline:
                raise StopRun(f"rollout engine {engine} was not recovered within {RESTART_TIMEOUT_S} s") from None
            time.sleep(0.2)
        incarnations[engine] = json.loads(done.read_text())["incarnation"]
        return []
    lost = len(list(Path(spec.ledger).glob(f"restart-{engine}-*"))) - 1  # claims: this one, and those before it
    if lost > spec.max_failures:
        raise RolloutEngineError(f"rollout engine {engine} failed {lost} time(s) in one iteration "
                                 f"(rollout.max_engine_failures={spec.max_failures})")
    sync.recover(engine)  # sets incarnations[engine]
    done.write_text(json.dumps({"incarnation": incarnations[engine]}))
    return [sync.restarts[-1]]


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


def batch_rows(batches: list[list[QueryGroup]]) -> list[dict]:
    """The planned batches as Ray Data rows: the batch's index and its groups (generation prompts too) as JSON."""
    return [{"batch": i, "groups": json.dumps([group_to_json(g) for g in batch])} for i, batch in enumerate(batches)]


def generation_dataset(spec: StageSpec, rows: list[dict], concurrency: int):
    """`rows` (some of the iteration's batches) through the generation stage: a lazy dataset of kept groups, at
    most `concurrency` batches in flight."""
    import ray.data

    configure_ray_data()
    return ray.data.from_items(rows, override_num_blocks=max(len(rows), 1)).map_batches(
        generate_batch, fn_args=(spec,), batch_size=1, num_cpus=0, concurrency=concurrency)


def stream_groups(dataset) -> Iterator[QueryGroup]:
    """A rank's groups as its execution delivers them; a failed generation stage is a `StopRun` with its reason."""
    try:
        for row in dataset.iter_rows():
            yield group_from_json(row["group"])
    except Exception as e:  # Ray Data wraps the stage's error: find the stop the stage raised
        cause = e
        while cause is not None and not isinstance(cause, StopRun):
            cause = getattr(cause, "cause", None) or cause.__cause__
        if isinstance(cause, StopRun):
            raise type(cause)(str(cause)) from None
        raise StopRun(f"the data plane stopped: {cause if cause is not None else str(e).splitlines()[0]}") from None
