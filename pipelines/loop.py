"""The online loop: one long-lived Ray Train `fit()` whose workers run it from setup to the last iteration.

Ray Train's `fit()` is one SPMD run with no driver-to-worker calls, so the whole loop lives in
`train_loop_per_worker`: rank 0 drives the principle writer and the rollout actors and hands every rank
its own shard of query groups; every rank trains; rank 0 syncs the weights to the rollout engines and checks
them; every rank checkpoints. The model is loaded once.
"""
from __future__ import annotations

import os
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait as wait_for
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import pyarrow as pa
import pyarrow.parquet
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from actors.data_plane import RecoveryDesk, StageSpec, batch_rows, read_groups, read_ledger, stream_groups
from actors.rollout import generate_on_engines
from actors.weight_sync import WeightSync
from pipelines.run_spec import LearnerJob, RunSpec
from sami.config import TrainConfig
from sami.data import iteration_queries
from sami.filters import REASONS
from sami.groups import (QueryGroup, TrainingSeeds, attach_completions, filter_and_tokenise, generation_batches,
                         generation_seeds, plan_groups, reject_counts, row_rng, shuffle_pairs, tokenise_group)
from sami.console import channel_path, log, open_channel, report_progress
from sami.deepspeed_compat import skip_cpu_shm_comm_op
from sami.learner import GroupStream, Learner, StopRun, control_group, stop_together
from sami.objectives import objective_for
from sami.metrics import RunMetrics, health_warnings
from sami.principle_writer import PrincipleWriterCore
from sami.prompts import prompt_format
from sami.run_dir import RunDir
from sami.tracking import Trackers

Probe = tuple[list[int], list[int]]


def train_loop_per_worker(config: dict) -> None:
    """Each run of the driver's `LearnerJob` in turn (the demo trains SAMI and its baselines in one worker
    group); a stop ends the sequence. A run complete before a restart of the group is not trained again."""
    job = LearnerJob.from_config(config)
    if ray.train.get_context().get_world_rank() == 0:
        open_channel(job.console)  # rank 0's lines and progress reach the driver's console
    for run in job.runs:
        if run.run_dir.last_complete_iteration() < run.cfg.run.iterations and not train_run(run):
            return


def train_run(run: RunSpec) -> bool:
    """The recipe: setup, then per iteration generate -> train -> sync -> checkpoint. False if it stopped.

    Under `rollout.data_plane: ray_data` (the default) the groups stream into the ranks, which train while the
    engines still generate (`schedule.rollout: sync`). With `schedule.rollout: one_step_off`, rank 0 starts
    generating iteration k+1 (on the engines' weights of k-1) before iteration k trains, and waits for it before
    the sync: engines never take weights mid-generation.
    """
    upcoming: Optional[Future] = None  # rank 0: iteration k+1's generation, running while k trains
    loop, completed = None, False
    try:
        loop = setup(run)
        for iteration in range(loop.start, loop.cfg.run.iterations + 1):
            started = time.perf_counter()
            shard, generation, record = generate_phase(loop, iteration, upcoming)
            upcoming = start_next_generation(loop, iteration)
            loop.phase("train")
            trained = loop.learner.train(iteration, shard, on_step=lambda step, steps: report_progress(
                f"iteration {iteration} train", step, steps, "step"))
            first_micro_batch_at = trained.pop("first_micro_batch_at")
            record.update(trained)
            probe = collect_phase(loop, shard, generation, record, first_micro_batch_at)
            record["time_wait_generation"] = finish_generation(upcoming)
            record.update(with_sync_restarts(record, sync_phase(loop, probe)))
            loop.engine_weights = iteration
            checkpoint_phase(loop, iteration, record, probe, started)
        loop.phase("idle")
        completed = True
        return True
    except StopRun as stop:  # an orderly stop: Ray Train must not restart the group into the same error
        if ray.train.get_context().get_world_rank() == 0:
            log(f"stopped: {stop}")
            run.run_dir.mark_stopped(run.attempt, str(stop))
        return False
    finally:
        finish_generation(upcoming)  # a stop or failure mid-iteration: the engines finish before the run ends
        if loop is not None and loop.rank0 is not None:
            loop.rank0.trackers.close(completed)


@dataclass
class Rank0:
    """What learner rank 0 alone holds."""

    metrics: RunMetrics  # the dashboard's gauges
    history: list[dict]  # metrics.jsonl rows so far (health warnings compare with them)
    trackers: Trackers  # the experiment trackers (tracking.trackers), fed each complete metrics.jsonl row
    local_writer: Optional[PrincipleWriterCore] = None  # when the principles come from a file or the world


@dataclass
class Loop:
    run: RunSpec  # what the driver handed over: config, run folder, rollout actors, writer, queries
    rank: int
    world: int
    learner: Learner
    sync: WeightSync
    start: int  # the first iteration this run trains
    learner_restarts: int  # times this job's learner group was restarted after a failure, so far
    engine_weights: int  # the iteration whose weights the rollout engines hold (0: the base model)
    rank0: Optional[Rank0]  # None on the other ranks

    @property
    def cfg(self) -> TrainConfig:
        return self.run.cfg

    @property
    def run_dir(self) -> RunDir:
        return self.run.run_dir

    def constitutions(self, query_ids: list[str], seed: int):
        """(library, each query's C constitutions) from the writer actor, or from the core when there is none."""
        if self.run.writer is not None:
            return ray.get(self.run.writer.iteration_constitutions.remote(query_ids, seed))
        if self.rank0.local_writer is None:
            self.rank0.local_writer = PrincipleWriterCore(self.cfg.principles, self.run_dir.path)
        return self.rank0.local_writer.iteration_constitutions(query_ids, seed)

    def phase(self, name: str) -> None:
        if self.rank0 is not None:
            self.rank0.metrics.set_phase(name)


def setup(run: RunSpec) -> Loop:
    """Distributed init, the learner, the weight sync; on `--resume` the last complete iteration, re-synced."""
    cfg = run.cfg
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    # The learners train where their process group's backend works (scaling.torch_backend, pipelines/torch_backend.py):
    # NCCL on the GPUs, gloo on the CPU (also where the GPUs Ray gave are logical only).
    use_gpu = dist.get_backend() == "nccl"
    if not use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed would take a GPU it sees for its own
    import deepspeed

    # Ray Train's device for this worker (its current CUDA device): `ray.get_gpu_ids()` found in CUDA_VISIBLE_DEVICES,
    # which lists every GPU of the node's workers; the local rank is no index into that list when GPUs are shared.
    device = ray.train.torch.get_device() if use_gpu else torch.device("cpu")
    if not use_gpu:
        skip_cpu_shm_comm_op()
    deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo")
    torch.manual_seed(cfg.run.seed + rank)
    learner = Learner(cfg, run.model_path, world, device, use_gpu)
    sync = WeightSync(run.actors, cfg.rollout, cfg.deepspeed.zero_stage, rank,
                      use_nccl=use_gpu and cfg.nccl_sync)
    # The driver refuses a folder holding a run unless --resume, so complete iterations here are this run's:
    # after --resume, or after Ray Train restarted the learner group (scaling.max_learner_failures).
    start = run.run_dir.last_complete_iteration() + 1
    if rank == 0:  # a run that died between an iteration's metrics row and its COMPLETE trains it again
        run.run_dir.drop_metrics_after(start - 1)
    restarts = count_learner_starts(run.run_dir, run.attempt, rank) - 1
    rank0 = None
    if rank == 0:  # a resume or restart continues the tracker runs, and logs the rows they lack
        history = run.run_dir.read_metrics()
        rank0 = Rank0(RunMetrics("train", cfg.run.name), history,
                      Trackers.start(cfg.tracking, run.run_dir.path, cfg.run.name, cfg, log, history))
    # A resumed run re-syncs the engines below, so its first generation is on-policy.
    loop = Loop(run, rank, world, learner, sync, start, restarts, start - 1, rank0)
    if start > 1:
        learner.restore(run.run_dir, start - 1)
        if rank == 0:
            how = f"learner group restarted after a failure (restart {restarts})" if restarts else "resumed"
            log(f"{how}: continuing from iteration {start - 1}; re-syncing the rollout engines")
        sync_phase(loop, run.run_dir.read_probe(start - 1))
    return loop


def count_learner_starts(run_dir: RunDir, attempt: str, rank: int) -> int:
    """How many times this job (`attempt`: the driver's token) has started the learner group, this one included."""
    if rank == 0:
        run_dir.record_learner_start(attempt)
    dist.barrier(group=control_group())  # every rank reads after rank 0 wrote
    return run_dir.learner_start_count(attempt)


@dataclass
class Generation:
    """Rank 0's handle on one iteration's groups while they are generated (or replayed)."""

    iteration: int
    policy_iteration: int  # whose weights generate them (0: the base model)
    started: float  # time.time() when the iteration's planning began
    figures: dict  # what is known so far (time_write_principles; everything once `groups` is set)
    spec: Optional[StageSpec] = None  # ray_data: the generation stage's settings
    rows: list[dict] = field(default_factory=list, repr=False)  # ray_data: the planned batches (`batch_rows`)
    desk: Optional[RecoveryDesk] = None  # ray_data: rank 0's answer to the stage's engine restarts
    restarts_before: int = 0  # len(WeightSync.restarts) when it started
    planned: int = 0  # the queries planned (kept or not)
    groups: Optional[list[QueryGroup]] = field(default=None, repr=False)  # every kept group, once known
    streamed: bool = False  # ray_data: the ranks ran the batches (else rank 0 runs them when it completes)
    saved: bool = False  # groups.parquet written, the figures complete


def generate_phase(loop: Loop, iteration: int, upcoming: Optional[Future]) -> tuple[GroupStream, Optional[Generation], dict]:
    """Rank 0 plans the iteration's groups (or takes `upcoming`, generated while the previous iteration trained);
    every rank receives its own share only: its batches, which it streams through Ray Data (ray_data, `sync`), or
    its equal shard of groups generated whole (direct; `one_step_off`; a replay)."""
    cfg, record = loop.cfg, {"iteration": iteration, "objective": objective_for(loop.cfg, iteration)}
    payload, problem, generation = None, None, None
    if loop.rank == 0:
        loop.phase("generate")
        if upcoming is None:
            log(f"{cfg.run.name}: iteration {iteration}/{cfg.run.iterations} [{record['objective']}]: "
                + ("replaying groups" if cfg.data.replay_groups_from else "generating"))
        try:
            generation = upcoming.result() if upcoming is not None else start_generation(loop, iteration,
                                                                                         loop.engine_weights)
            if cfg.schedule.rollout == "one_step_off":
                complete_generation(loop, generation)  # k+1's generation must not share the engines with k's
            payload = shard_sources(loop, generation)
        except StopRun as e:
            problem = e
    stop_together(problem)
    received = [None]
    dist.scatter_object_list(received, payload, src=0, group=control_group())
    if isinstance(received[0], list):
        return GroupStream(received[0]), generation, record
    spec, rows = received[0]
    return GroupStream(stream_groups(spec, rows), prepare=lambda g: tokenise(loop, g)), generation, record


def tokenise(loop: Loop, group: QueryGroup) -> QueryGroup:
    cfg = loop.cfg
    return tokenise_group(group, loop.learner.tokenizer, prompts_of(cfg, loop.learner.tokenizer),
                          cfg.model.max_prompt_tokens, cfg.model.max_response_tokens)


def prompts_of(cfg: TrainConfig, tokenizer):
    """The run's prompt format (`prompt.template`) over the learner's tokenizer: what groups are planned and scored in."""
    return prompt_format(cfg.data.task, cfg.prompt.template, tokenizer)


def shard_sources(loop: Loop, generation: Generation) -> list:
    """Each rank's share: (the stage's settings, its batches: r, r + W, ...) to stream, or, where the groups are
    already whole, its equal shard of them."""
    if generation.groups is None:
        generation.streamed = True
        return [(generation.spec, generation.rows[rank::loop.world]) for rank in range(loop.world)]
    if len(generation.groups) < loop.world:
        raise StopRun(f"iteration {generation.iteration}: only {len(generation.groups)} query groups survived "
                      f"filtering ({generation.figures}); need at least one per learner")
    return equal_shards(generation.groups, loop.world)


def collect_phase(loop: Loop, shard: GroupStream, generation: Optional[Generation], record: dict,
                  first_micro_batch_at: float) -> Probe:
    """After training: every rank reads the rest of its shard (its stream ends); rank 0 completes the iteration's
    groups (the ledger: filter counts, engine restarts), writes groups.parquet and hands every rank the probe."""
    shard.drain()
    dist.barrier(group=control_group())  # every rank's stream ended: every batch's ledger is written
    payload, problem = [None], None
    if loop.rank == 0:
        try:
            groups = complete_generation(loop, generation)
            record.update(generation.figures, time_to_first_micro_batch=first_micro_batch_at - generation.started)
            payload = [(groups[0].prompt_ids[0], groups[0].response_ids[0])]
        except StopRun as e:
            problem = e
    stop_together(problem)
    dist.broadcast_object_list(payload, src=0, group=control_group())
    return payload[0]


def start_next_generation(loop: Loop, iteration: int) -> Optional[Future]:
    """Rank 0, `one_step_off`: iteration+1's groups, generated in a thread on the weights the engines hold now.
    None where there is nothing to overlap: `sync`, the last iteration, a replay run (it only reads groups)."""
    cfg = loop.cfg
    if (loop.rank != 0 or cfg.schedule.rollout != "one_step_off" or iteration == cfg.run.iterations
            or cfg.data.replay_groups_from):
        return None
    log(f"{cfg.run.name}: iteration {iteration + 1}/{cfg.run.iterations} [{objective_for(cfg, iteration + 1)}]: generating "
        f"on the weights of iteration {loop.engine_weights} while iteration {iteration} trains")
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sami-generate")

    def generate(policy_iteration: int) -> Generation:
        generation = start_generation(loop, iteration + 1, policy_iteration)
        complete_generation(loop, generation)
        return generation

    upcoming = executor.submit(generate, loop.engine_weights)
    executor.shutdown(wait=False)  # the thread ends with its one task
    return upcoming


def finish_generation(upcoming: Optional[Future]) -> float:
    """Seconds spent waiting for `upcoming` to finish (its result or error is read by the next generate_phase)."""
    started = time.perf_counter()
    if upcoming is not None:
        wait_for([upcoming])
    return time.perf_counter() - started


def start_generation(loop: Loop, iteration: int, policy_iteration: int) -> Generation:
    """Rank 0: the iteration's groups under way, generated on the engines' weights of `policy_iteration` (ray_data:
    a lazy dataset the ranks' streams run; direct: generated here, whole), or replayed from another run."""
    cfg = loop.cfg
    started, restarts_before = time.time(), len(loop.sync.restarts)
    generation = Generation(iteration, policy_iteration, started, {}, restarts_before=restarts_before)
    if cfg.data.replay_groups_from:  # filtered and tokenised where they were generated
        generation.groups = replay_groups(RunDir(cfg.data.replay_groups_from), iteration)
        if cfg.data.replay_shuffled:
            generation.groups = shuffle_pairs(generation.groups, row_rng(cfg.run.seed, iteration, "all", "shuffle"))
        generation.figures = {"time_write_principles": 0.0, "time_generate": time.time() - started,
                              **{f"filtered_{r}": 0 for r in REASONS}}
        return generation
    count = cfg.data.queries_per_iteration or cfg.steps_for_iteration(iteration) * cfg.optim.groups_per_step
    queries = iteration_queries(loop.run.train_queries, iteration, count, cfg.schedule.alternate_splits)
    generation.planned = len(queries)
    if cfg.rollout.data_plane == "direct":
        sync = loop.sync
        generation.groups, generation.figures = build_groups(
            cfg, iteration, queries, constitutions=loop.constitutions,
            generate=lambda batches, seeds: generate_on_engines(
                loop.run.actors, batches, cfg.sampling, seeds, sync.incarnations, sync.recover,
                cfg.rollout.max_engine_failures, on_batch=lambda done, batches: report_progress(
                    f"iteration {iteration} generate", done, batches, "batch")),
            tokenizer=loop.learner.tokenizer)
        generation.figures["time_generate"] = time.time() - started - generation.figures["time_write_principles"]
        for group in generation.groups:
            group.policy_iteration, group.staleness = policy_iteration, iteration - 1 - policy_iteration
        return generation
    # one_step_off: rank 0 runs every batch in its thread and hands out equal shards, as the direct path
    streams = loop.world if cfg.schedule.rollout == "sync" else 1
    batches, generation.figures = plan_iteration(cfg, iteration, queries, loop.constitutions,
                                                 prompts_of(cfg, loop.learner.tokenizer), streams)
    ledger = loop.run_dir.batch_ledger(iteration)
    shutil.rmtree(ledger, ignore_errors=True)  # a ledger left by an attempt that died mid-iteration
    ledger.mkdir(parents=True)
    generation.spec = StageSpec(tuple(loop.run.actors), cfg.sampling, cfg.filters, cfg.run.seed, iteration,
                                policy_iteration, str(ledger), len(batches), channel_path(),
                                tuple(loop.sync.incarnations), cfg.rollout.max_engine_failures)
    generation.desk = RecoveryDesk(ledger, loop.sync.recover, lambda engine: loop.sync.incarnations[engine])
    generation.rows = batch_rows(batches)
    return generation


def complete_generation(loop: Loop, generation: Generation) -> list[QueryGroup]:
    """Rank 0: every kept group of the iteration, in query order, with the generation's figures, saved to
    groups.parquet (ray_data: read from the stage's ledger once its execution ended). Idempotent."""
    cfg = loop.cfg
    if generation.groups is None:
        spec = generation.spec
        if not generation.streamed:  # one_step_off: rank 0 runs every batch here, in its generation thread
            for _ in stream_groups(spec, generation.rows):
                pass
        generation.desk.close()
        every, finished = read_ledger(Path(spec.ledger), spec.batches)
        generation.groups = [tokenise(loop, g) for g in every if not g.reject_reason]
        generation.figures.update(reject_counts(every),
                                  time_generate=finished - generation.started - generation.figures["time_write_principles"])
        shutil.rmtree(spec.ledger)
    groups, figures = generation.groups, generation.figures
    if generation.saved:
        return groups
    if not cfg.data.replay_groups_from:
        figures.update(restart_figures(loop.sync.restarts[generation.restarts_before:]))
        log(f"iteration {generation.iteration}: {len(groups)} groups kept of {generation.planned} "
            f"({ {k: v for k, v in figures.items() if k.startswith('filtered_')} })")
    loop.run_dir.iteration(generation.iteration).mkdir(parents=True, exist_ok=True)
    pyarrow.parquet.write_table(pa.Table.from_pylist([g.record() for g in groups]), loop.run_dir.groups(generation.iteration))
    seconds = figures.get("time_generate", 0.0)
    response_tokens = sum(g.response_tokens for g in groups)
    figures.update({"groups": len(groups), "response_tokens": response_tokens / max(len(groups), 1),
                    "truncated": sum(g.truncated for g in groups),
                    "policy_iteration": groups[0].policy_iteration if groups else None,
                    "staleness": groups[0].staleness if groups else None,
                    "generation_tokens_per_second": response_tokens * cfg.principles.num_constitutions / seconds
                    if seconds else 0.0})
    generation.saved = True
    if len(groups) < loop.world:
        raise StopRun(f"iteration {generation.iteration}: only {len(groups)} query groups survived filtering "
                      f"({figures}); need at least one per learner")
    return groups


def plan_iteration(cfg: TrainConfig, iteration: int, queries: list[dict], constitutions: Callable, prompts,
                   ranks: int = 1) -> tuple[list[list[QueryGroup]], dict]:
    """(the iteration's generation batches of planned groups, for `ranks` streams; {"time_write_principles"}): queries
    -> constitutions (`constitutions(query_ids, seed)`: the principle library and each query's C, in one call) -> groups
    in `prompts` (`prompts_of`)."""
    started = time.perf_counter()
    library, stances = constitutions([q["query_id"] for q in queries], cfg.run.seed * 1000 + iteration)
    figures = {"time_write_principles": time.perf_counter() - started}
    groups = plan_groups(queries, library, stances, prompts, TrainingSeeds(cfg.run.seed, iteration))
    return generation_batches(groups, cfg.sampling.batch_size, cfg.principles.num_constitutions, ranks), figures


def build_groups(cfg: TrainConfig, iteration: int, queries: list[dict], constitutions: Callable, generate: Callable,
                 tokenizer) -> tuple[list[QueryGroup], dict]:
    """The direct data plane: queries -> constitutions -> responses -> filter -> tokenised groups (the kept ones,
    in query order: the same whichever engine answered which batch, and when).

    `generate(prompt batches, seeds)` returns every batch's completions in order; a prompt's seed is keyed by
    (run seed, iteration, query, constitution), so its sample does not depend on the batch it travels in.
    """
    prompts = prompts_of(cfg, tokenizer)
    batches, figures = plan_iteration(cfg, iteration, queries, constitutions, prompts)
    groups = [g for b in batches for g in b]
    completions = generate([[p for g in b for p in g.generation_prompts] for b in batches],
                           [[s for g in b for s in generation_seeds(g, cfg.run.seed, iteration)] for b in batches])
    attach_completions(groups, completions)
    kept, counts = filter_and_tokenise(groups, tokenizer, cfg.filters, prompts, cfg.model.max_prompt_tokens,
                                       cfg.model.max_response_tokens)
    return kept, {**figures, **counts}


def replay_groups(source_run: RunDir, iteration: int) -> list[QueryGroup]:
    """Iteration k's groups as another run generated them (filtering already applied there), through Ray Data."""
    path = source_run.groups(iteration)
    if not path.is_file():
        raise FileNotFoundError(f"data.replay_groups_from: {path} does not exist (did that run reach iteration {iteration}?)")
    return read_groups(path)


def equal_shards(groups: list[QueryGroup], world: int) -> list[list[QueryGroup]]:
    """`world` shards of equal size (the remainder is dropped, as `Dataset.split(equal=True)` would)."""
    per_rank = len(groups) // world
    return [groups[r * per_rank : (r + 1) * per_rank] for r in range(world)]


def restart_figures(restarts: list[dict]) -> dict:
    """The metrics of engine restarts: how many, and the worst probe |diff| a restarted engine passed with."""
    diffs = [r["probe_abs_diff"] for r in restarts if r["probe_abs_diff"] is not None]
    return {"engine_restarts": len(restarts), "restart_probe_abs_diff": max(diffs) if diffs else None}


def with_sync_restarts(record: dict, synced: dict) -> dict:
    """The sync's figures, its engine restarts counted with the iteration's generation's (one row per iteration)."""
    if "engine_restarts" not in synced:
        return synced
    both = [r for r in (record.get("restart_probe_abs_diff"), synced["restart_probe_abs_diff"]) if r is not None]
    return {**synced, "engine_restarts": record.get("engine_restarts", 0) + synced["engine_restarts"],
            "restart_probe_abs_diff": max(both) if both else None}


def sync_phase(loop: Loop, probe: Probe) -> dict:
    """The learner's weights to every rollout engine, then the probe check (a replay run has no engines)."""
    if not loop.sync.actors:
        return {"time_sync": 0.0}
    loop.phase("sync")
    started = time.perf_counter()
    learner_logprob = loop.learner.probe_logprob(probe)  # every rank: under ZeRO-3 it gathers the parameters
    figures, problem, restarts_before = {}, None, len(loop.sync.restarts)
    try:  # rank 0 alone sends and checks; every rank must learn whether it failed
        figures = loop.sync.push(loop.learner.module)
        figures["probe_abs_diff"] = loop.sync.verify(learner_logprob, probe)
        if loop.rank == 0:  # an engine lost and restarted during the sync
            figures.update(restart_figures(loop.sync.restarts[restarts_before:]))
    except StopRun as e:
        problem = e
    stop_together(problem)
    return {**figures, "time_sync": time.perf_counter() - started}


def checkpoint_phase(loop: Loop, iteration: int, record: dict, probe: Probe, started: float) -> None:
    """Every rank saves; rank 0 then writes the metrics row (with the iteration's wall time since `started`)
    and marks the iteration complete."""
    loop.phase("checkpoint")
    record["time_checkpoint"] = loop.learner.save(loop.run_dir, iteration, loop.rank)
    record.setdefault("mi_lower_bound", None)
    record["learner_restarts"] = loop.learner_restarts
    dist.barrier(group=control_group())
    record["time_iteration"] = time.perf_counter() - started
    if loop.rank == 0:
        history = loop.rank0.history
        first_loss = history[0]["loss_first_step"] if history else record["loss_first_step"]
        record["warnings"] = health_warnings(record, first_loss, history[-1] if history else None)
        record["warning_count"] = len(record["warnings"])
        for warning in record["warnings"]:
            log(f"warning: iteration {iteration}: {warning}")
        loop.run_dir.mark_complete(iteration, record, probe)
        history.append(record)
        loop.rank0.metrics.record(iteration, record)
        loop.rank0.trackers.log_rows(history)
        mi = record["mi_lower_bound"]
        log(f"iteration {iteration} done: loss {record['loss_first_step']:.4f} -> {record['loss_last_step']:.4f}"
            + (f", MI bound {mi:.3f}" if mi is not None else "")
            + f", sync {record['time_sync']:.2f}s ({record.get('sync_bytes', 0) / 2**20:.1f} MiB), "
            f"train {record['time_train']:.1f}s, checkpoint {record['time_checkpoint']:.1f}s")
    ray.train.report({k: v for k, v in record.items() if isinstance(v, (int, float))})
