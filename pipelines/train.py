"""The training job: `python -m pipelines.train --config configs/<name>.yaml [key.path=value ...] [--resume [--override-config]] [--dry-run]`.

Connects to the Ray cluster it runs in (under `ray job submit`, or with RAY_ADDRESS set), else starts a
local Ray; starts the principle writer and the rollout actors; runs the whole online loop inside one Ray
Train `fit()` (pipelines/loop.py).
"""
from __future__ import annotations

import argparse
import errno
import os
import shutil
import signal
import sys
import threading
import traceback
import uuid
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pipelines.memory import check_memory
from pipelines.plan import WRITER_CPUS, format_plan, learner_bundle
from pipelines.preflight import (check_inputs, check_placements, check_run_dir, check_shared_run_folder, run_folder,
                                 save_run_config, unchecked_inputs, writer_answers)
from pipelines.run_spec import LearnerJob, RunSpec
from sami.config import ConfigError, TrainConfig, load_config
from sami.console import VERBOSE_HELP, console
from sami.run_dir import RunDir, RunDirInUse
from sami.tracking import check_tracking


class RunStopped(RuntimeError):
    """The run stopped in order (a non-finite loss, a failed weight sync check, an engine failing too often)."""


class RunFailed(RuntimeError):
    """The run stopped inside Ray (a learner or an actor); the message is one line: the root cause and the
    command that continues the run."""


class RunInterrupted(RuntimeError):
    """SIGINT (Ctrl-C) or SIGTERM reached the driver: the run stopped where it was; its complete iterations are
    whole (COMPLETE is written last), so `--resume` continues after the last of them."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


def root_cause(error: BaseException) -> BaseException:
    """The innermost exception behind Ray Train's and Ray's wrappers (worker failures, task errors, __cause__)."""
    seen = set()
    while id(error) not in seen:
        seen.add(id(error))
        failures = getattr(error, "worker_failures", None)  # ray.train.WorkerGroupError: {rank: exception}
        inner = (failures[min(failures)] if failures else None) or getattr(error, "controller_failure", None) \
            or getattr(error, "cause", None) or error.__cause__  # RayTaskError.cause: the task's own exception
        if not isinstance(inner, BaseException):
            break
        error = inner
    return error


def run(cfg: TrainConfig, resume: bool = False, log=console.say, override_config: bool = False) -> Path:
    """Run the training job; returns the run directory."""
    return run_sequence([cfg], [resume], log, override_config)[0]


def same_worker_group(cfgs: list[TrainConfig]) -> None:
    """Runs trained one after another in one worker group must ask for the same one."""
    for cfg in cfgs[1:]:
        for field in ("scaling", "deepspeed"):
            if getattr(cfg, field) != getattr(cfgs[0], field):
                raise ConfigError(f"{field}: run {cfg.run.name!r} asks for {getattr(cfg, field)!r} but run "
                                  f"{cfgs[0].run.name!r} for {getattr(cfgs[0], field)!r}; runs trained in one worker "
                                  f"group share these settings")


@dataclass(frozen=True)
class PendingRun:
    """A run of the sequence with iterations left, as the input checks found it."""

    cfg: TrainConfig
    run_dir: RunDir
    done: int  # its last complete iteration
    continues_from: str  # what it continues from, for the console


def learner_scaling(cfg: TrainConfig):
    """Ray Train's scaling for the learner group: `scaling.num_learners` workers of `cpus_per_learner` CPUs and
    `gpus_per_learner` GPUs (below 1, a share of one device that a `rollout.gpus_per_engine` share can take the rest
    of: Ray gives both the same GPU id, and Ray Train's CUDA_VISIBLE_DEVICES names it), on `role: learner` nodes
    where the cluster labels its nodes by role (actors/placement.py). Needs a connected Ray."""
    from ray.train import ScalingConfig

    from actors.placement import LEARNER, role_selector

    s = cfg.scaling
    return ScalingConfig(num_workers=s.num_learners, use_gpu=s.gpus_per_learner > 0,
                         resources_per_worker=learner_bundle(cfg), label_selector=role_selector(LEARNER))


def run_sequence(cfgs: list[TrainConfig], resume: list[bool], log=console.say,
                 override_config: bool = False) -> list[Path]:
    """Train `cfgs` one after another in ONE Ray Train worker group (one `fit()`: the learners, the Ray Train
    controller and the imports start once, not once per run); returns their run directories.

    A run may replay the groups an earlier run of the sequence generates (`data.replay_groups_from`); a replay
    run starts no rollout engines. A stop or failure in one run ends the sequence there. `resume[i]`: run i
    continues the run in its folder (`--resume`). An entry point's console (not --verbose) sends the framework's
    output to the first run's `job.log` from here on, unless it has a log file already (the demo's).
    """
    cfgs = [cfg.with_absolute_paths() for cfg in cfgs]  # what every worker reads means what it means here
    run_dirs = [Path(cfg.run.output_dir) for cfg in cfgs]
    try:
        return train_sequence(cfgs, run_dirs, resume, log, override_config)
    except OSError as e:  # the driver's own writes: the lock, the log, config.yaml, the held-out queries
        current = run_in_progress(cfgs, run_dirs)
        if not disk_full(e, current):
            raise
        raise RunFailed(disk_full_line(e, current)) from None


def train_sequence(cfgs: list[TrainConfig], run_dirs: list[Path], resume: list[bool], log,
                   override_config: bool) -> list[Path]:
    """run_sequence's steps, with every run's folder owned from its checks to the end."""
    with ExitStack() as owned:  # each run's folder is this driver's until the sequence ends
        todo = check_runs(cfgs, run_dirs, resume, override_config, log, owned)
        if not todo:
            return run_dirs
        open_job_log(todo[0].run_dir, log)
        attempt = uuid.uuid4().hex  # this driver's run: tells its learner restarts and its stop note from older ones
        prepared: list[RunSpec] = []
        engine_groups: list = []  # every run's engines' placement groups (actors.placement.GroupRequest)
        with stop_on_signals() as signals:  # from Ray's start to the end of the stop
            try:
                connect(todo, log)
                signals.install()  # again: ray.init put its own SIGTERM handler, which exits 1 with no line
                for pending in todo:
                    prepared.append(prepare_run(pending, attempt, log, engine_groups))
                job = LearnerJob(tuple(prepared), todo[0].run_dir.console)
                backend = place(job, engine_groups, log)
                fit(make_trainer(job, backend), job)
            except Interrupt:
                pass  # `signals.received` names it
            finally:
                signals.defer()  # a signal while the actors stop is recorded, not raised: the stop finishes
                stop_actors(prepared, engine_groups)
            if signals.received is not None:
                stop_learners()
                raise interrupted(todo, signals.received)
            report_stops(todo, attempt, log)
    return run_dirs


def check_runs(cfgs: list[TrainConfig], run_dirs: list[Path], resume: list[bool], override_config: bool,
               log, owned: ExitStack) -> list[PendingRun]:
    """What a user can get wrong, checked first: before the slow imports, config.yaml and Ray. Each run's folder
    is owned (its LOCK held in `owned`) before what it holds is read: a second run on it is refused here. Returns
    the runs with iterations left."""
    same_worker_group(cfgs)
    todo = []
    for index, (cfg, run_dir, resumes) in enumerate(zip(cfgs, run_dirs, resume)):
        check_inputs(cfg, generated_before=run_dirs[:index])
        try:
            owned.enter_context(run_folder(cfg).owned())
        except RunDirInUse as e:
            raise ConfigError(f"run.output_dir: {e}") from None
        done, continues_from = check_run_dir(cfg, resumes, override_config)
        if resumes and done >= cfg.run.iterations:
            log(f"[sami] {run_dir}: all {cfg.run.iterations} iterations are complete; nothing to do")
        else:
            todo.append(PendingRun(cfg, RunDir(run_dir), done, continues_from))
    return todo


class Interrupt(BaseException):
    """Raised in the main thread by the SIGINT/SIGTERM handler (a BaseException: no `except Exception` on the way
    swallows it); run_sequence turns it into RunInterrupted once the run has stopped."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class Signals:
    """SIGINT/SIGTERM for the block `stop_on_signals` guards: the first one raises Interrupt in the main thread,
    unless `defer()` was called (the run is stopping already); then it is only recorded in `received`."""

    def __init__(self):
        self.received, self.deferred = None, False

    def install(self) -> dict:
        """This object as the SIGINT and SIGTERM handler; returns the handlers it replaced. Handlers belong to the
        main thread: elsewhere nothing is installed and the block just runs."""
        if threading.current_thread() is not threading.main_thread():
            return {}
        return {sig: signal.signal(sig, self.handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def defer(self) -> None:
        self.deferred = True

    def handle(self, signum, frame):
        first = self.received is None
        self.received = self.received or signum
        if first and not self.deferred:
            raise Interrupt(signum)  # a second signal while the run stops is ignored, so the stop finishes


@contextmanager
def stop_on_signals():
    """While the block runs, SIGINT and SIGTERM go to a `Signals`; the handlers before it come back after."""
    signals = Signals()
    previous = signals.install()
    try:
        yield signals
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def stop_learners() -> None:
    """The Ray Train controller and the learners are this driver's actors: leaving Ray ends them (a local Ray
    stops altogether), so nothing writes into the run folder once the driver reports."""
    import ray

    ray.shutdown()


def interrupted(todo: list[PendingRun], signum: int) -> RunInterrupted:
    """The line for the run that was in progress: how far it got, and how it continues."""
    run_dir = run_in_progress([p.cfg for p in todo], [p.run_dir.path for p in todo])
    iterations = next(p.cfg.run.iterations for p in todo if p.run_dir == run_dir)
    return RunInterrupted(f"interrupted by {signal.Signals(signum).name}: {run_dir.path} has "
                          f"{run_dir.last_complete_iteration()} of {iterations} iteration(s) complete; "
                          f"{how_to_continue(run_dir)}", signum)


def run_in_progress(cfgs: list[TrainConfig], run_dirs: list[Path]) -> RunDir:
    """The first run of a sequence with iterations left (the last one when all are complete)."""
    return next((RunDir(d) for cfg, d in zip(cfgs, run_dirs) if RunDir(d).last_complete_iteration() < cfg.run.iterations),
                RunDir(run_dirs[-1]))


def how_to_continue(run_dir: RunDir) -> str:
    if run_dir.config.is_file():
        return f"continue with: python -m pipelines.train --config {run_dir.config} --resume"
    return "run it again without --resume (it had not started: no config.yaml)"


FULL_DISK_BYTES = 1 << 20  # a run folder with less free space than this when a run failed: the disk filled


def disk_full(error: BaseException, run_dir: RunDir) -> bool:
    """Whether `error` comes from a full disk: ENOSPC, its text (through Ray, pyarrow), or a run folder left with
    no space (torch.save, under DeepSpeed's checkpoint, says only "file write failed")."""
    for e in (error, root_cause(error)):
        if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or os.strerror(errno.ENOSPC) in str(e):
            return True
    return run_dir.path.is_dir() and shutil.disk_usage(run_dir.path).free < FULL_DISK_BYTES


def disk_full_line(error: BaseException, run_dir: RunDir) -> str:
    cause = root_cause(error)
    where = getattr(cause, "filename", None) or getattr(error, "filename", None) or run_dir.path
    free = shutil.disk_usage(run_dir.path).free if run_dir.path.is_dir() else 0
    said = "" if isinstance(cause, OSError) else f"; {type(cause).__name__}: {' '.join(str(cause).split())[:160]}"
    return (f"no space left on device writing {where} ({free / 2**20:.1f} MiB free in {run_dir.path}{said}); free "
            f"some space, then {how_to_continue(run_dir)}")


def open_job_log(run_dir: RunDir, log) -> None:
    opened = console.open_log(run_dir.job_log)
    if opened:
        log(f"[sami] {opened}")


def connect(todo: list[PendingRun], log) -> None:
    """Join the cluster, or start a local Ray big enough for the sequence."""
    from actors.ray_session import connect_ray

    first = todo[0].cfg
    # Logical CPUs above the learners + actors leave room for Ray Train's own actors (the 2-CPU deadlock).
    dashboard = connect_ray(first.scaling.num_learners + max(p.cfg.rollout.num_engines for p in todo) + 4,
                            uses_gpu=first.scaling.gpus_per_learner > 0)
    if dashboard:
        log(f"[sami] Ray dashboard: {dashboard}")
    if any(p.cfg.rollout.data_plane == "ray_data" or p.cfg.data.replay_groups_from for p in todo):  # a replay reads through it
        from actors.data_plane import host_ray_data_services

        host_ray_data_services()  # on the driver's node, not a GPU node the learners would keep from scaling down


def prepare_run(pending: PendingRun, attempt: str, log, engine_groups: list) -> RunSpec:
    """The run's model and queries, its folder (config.yaml, the held-out queries), its writer and rollout actors
    (on `role: rollout` nodes where the cluster has roles; their placement groups, not waited for, appended to
    `engine_groups`)."""
    from actors.placement import ROLLOUT, role_selector
    from actors.principle_writer import PrincipleWriterActor
    from actors.rollout import start_rollout_actors
    from sami.data import load_queries, split_queries
    from sami.world.base_model import resolve_model  # torch and transformers: not for --dry-run

    cfg, run_dir = pending.cfg, pending.run_dir
    try:
        model_path = resolve_model(cfg.model.name_or_path, log)
    except ValueError as e:
        raise ConfigError(f"model.name_or_path: {e}") from None
    train_rows, heldout_rows = split_queries(load_queries(cfg.data, cfg.run.seed), cfg.data.heldout_queries)
    if pending.done:
        log(f"[sami] resuming {run_dir.path} from {pending.continues_from}; "
            f"next: iteration {pending.done + 1} of {cfg.run.iterations}")
    run_dir.path.mkdir(parents=True, exist_ok=True)
    if cfg.model.name_or_path.startswith("builtin:"):  # in the driver's cache: other nodes read the run folder only
        model_path = run_dir.share_model(model_path)
    save_run_config(cfg, run_dir, pending.done)
    run_dir.write_heldout_queries(heldout_rows)
    replay = cfg.data.replay_groups_from is not None
    log(f"[sami] run {cfg.run.name}: {cfg.run.iterations} iteration(s) of {cfg.objective.name}, model {model_path}, "
        f"{cfg.scaling.num_learners} learner(s), " + ("groups replayed from " + cfg.data.replay_groups_from
                                                    if replay else f"{cfg.rollout.num_engines} {cfg.rollout.engine} rollout engine(s)"))
    # A language-model writer gets an actor of its own; principles from a file or the world are served by the
    # same core inside learner rank 0 (a process less).
    writer = PrincipleWriterActor.options(num_cpus=WRITER_CPUS).remote(cfg.principles, str(run_dir.path)) \
        if cfg.principles.source == "writer" and not replay else None
    actors = ()
    if not replay:
        started, groups = start_rollout_actors(model_path, cfg.rollout, cfg.model, role_selector(ROLLOUT))
        actors = tuple(started)
        engine_groups.extend(groups)
    return RunSpec(cfg, run_dir, model_path, train_rows, actors, writer, attempt)


def place(job: LearnerJob, engine_groups: list, log) -> str:
    """Every node the job needs, asked for at once, so an autoscaler starts them together: the engines' placement
    groups and one of the learners' shape and labels (Ray Train's own, asked for only in `fit()`, stands in for
    until it does), waited for together for `scaling.placement_timeout_s`; a run folder on a node's own disk when
    the learners landed on other machines is refused (ConfigError); then the engines' constructors, so an engine that
    died starting is reported before any learner starts. Returns the learners' torch backend, chosen in their group
    (pipelines/torch_backend.py). Raises RunFailed (one line)."""
    import ray

    from actors.placement import (LEARNER, PlacementTimeout, group_machines, remove_groups, request_group,
                                  role_selector, wait_for_groups)
    from actors.rollout import RolloutEngineError, engines_started
    from pipelines.torch_backend import learners_backend

    cfg = job.runs[0].cfg
    learners = request_group("learners", [learner_bundle(cfg)] * cfg.scaling.num_learners, role_selector(LEARNER))
    try:
        waited = wait_for_groups([learners, *engine_groups], cfg.scaling.placement_timeout_s,
                                 "scaling.placement_timeout_s")
        machines = group_machines(learners) | {ray.util.get_node_ip_address()}
        backend = learners_backend(cfg, learners.group)
    except PlacementTimeout as e:
        raise RunFailed(str(e)) from None
    finally:
        remove_groups([learners])  # Ray Train asks for the same resources again in fit()
    for run in job.runs:  # where the learners landed, so a node-local run folder is refused before any starts
        check_shared_run_folder(run.run_dir.path, machines)
    if waited > 10:
        log(f"[sami] the cluster placed the learners and rollout engines in {waited:.0f} s")
    try:
        for run in job.runs:
            engines_started(list(run.actors))
    except RolloutEngineError as e:
        raise RunFailed(f"run {run.cfg.run.name}: {e}") from None
    return backend


def make_trainer(job: LearnerJob, backend: str):
    """One Ray Train worker group for the whole sequence, shaped by its first run (all runs share the shape), its
    process group on `backend` (`place`)."""
    from ray.train import FailureConfig, RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipelines.loop import train_loop_per_worker

    first = job.runs[0]
    # The one wait for resources (`place`) is Ray Train's too, for the worker group it starts and restarts; the driver's
    # value reaches its controller (ray.train.v2._internal.constants.ENV_VARS_TO_PROPAGATE).
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = f"{first.cfg.scaling.placement_timeout_s:g}"
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=job.as_config(),
        scaling_config=learner_scaling(first.cfg),
        torch_config=TorchConfig(backend=backend),
        run_config=RunConfig(name=first.cfg.run.name, storage_path=str(first.run_dir.ray_train),
                             failure_config=FailureConfig(max_failures=first.cfg.scaling.max_learner_failures)),
    )


def fit(trainer, job: LearnerJob) -> None:
    """`trainer.fit()`, showing learner rank 0's lines as they come. A failure of a learner or an actor becomes
    one line (RunFailed) for the console; its traceback goes to the failed run's error.log."""
    try:
        with console.follow(job.console):
            in_thread(trainer.fit)
    except Exception as e:
        failed = next((r.run_dir for r in job.runs if not run_complete(r.run_dir)), job.runs[-1].run_dir)
        if disk_full(e, failed):
            raise RunFailed(disk_full_line(e, failed)) from e
        failed.error_log.write_text("".join(traceback.format_exception(e)))
        cause = root_cause(e)
        message = " ".join(str(cause).split())[:400]
        raise RunFailed(f"{type(cause).__name__}: {message} (traceback: {failed.error_log}); "
                        f"{how_to_continue(failed)}") from e


def in_thread(call: Callable[[], object]) -> None:
    """`call()` in a thread of its own while the main thread waits, interruptible: Ray Train's `fit()` puts a SIGINT
    handler of its own on the main thread (an abort that let the iterations run on), and not on any other."""
    failure: list[BaseException] = []

    def target() -> None:
        try:
            call()
        except BaseException as e:
            failure.append(e)

    thread = threading.Thread(target=target, name="sami-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.1)  # signal handlers run in the main thread between joins
    if failure:
        raise failure[0]


def stop_actors(runs: list[RunSpec], engine_groups: list) -> None:
    """The rollout and writer actors of the runs prepared so far and the engines' placement groups, whether the
    sequence ended well or not."""
    import ray

    from actors.placement import remove_groups

    for run in runs:
        for actor in run.actors + ((run.writer,) if run.writer is not None else ()):
            ray.kill(actor)
    remove_groups(engine_groups)


def report_stops(todo: list[PendingRun], attempt: str, log) -> None:
    """A run that stopped in order (its STOPPED note from this driver's `attempt`) ends the job with its message."""
    for pending in todo:
        stopped = pending.run_dir.stop_message(attempt)
        if stopped is not None:
            raise RunStopped(stopped)
        log(f"[sami] done: {pending.run_dir.path} (metrics.jsonl, iteration-*/hf)")


def run_complete(run_dir: RunDir) -> bool:
    cfg = load_config(run_dir.config)
    return run_dir.last_complete_iteration() >= cfg.run.iterations


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML config (configs/*.yaml); defaults to the built-in world")
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. optim.lr=1e-4")
    parser.add_argument("--resume", action="store_true", help="continue from the last complete iteration")
    parser.add_argument("--override-config", action="store_true",
                        help="with --resume: continue with settings that differ from the run's config.yaml (the "
                             "differences are listed; the old file is kept as config.iteration-<k>.yaml)")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate the config, principles, data files and what --resume would continue from; "
                             "print the resource plan")
    parser.add_argument("--verbose", action="store_true", help=VERBOSE_HELP + " (<run>/job.log)")
    args = parser.parse_intermixed_args(argv)  # overrides may come after --resume as well as before
    if args.override_config and not args.resume:
        print("error: --override-config only applies with --resume", file=sys.stderr)
        return 2

    def job() -> None:
        cfg = load_config(args.config, args.overrides).with_absolute_paths()  # --dry-run checks what a run reads
        if args.dry_run:
            check_inputs(cfg, contact_endpoints=False)
            check_placements(cfg)
            check_tracking(cfg.tracking)
            _, continues_from = check_run_dir(cfg, args.resume, args.override_config)
            print(format_plan(cfg))
            check_memory(cfg)  # after the plan, which shows the figures the refusal names
            answered = writer_answers(cfg)
            if answered:
                print(f"principles.writer.base_url {cfg.principles.writer.base_url} answers")
            print(dry_run_verdict(unchecked_inputs(cfg, answered), continues_from if args.resume else None))
        else:
            run(cfg, resume=args.resume, override_config=args.override_config)

    with console.session(verbose=args.verbose):
        return exit_code(job)


def dry_run_verdict(unchecked: list[str], continues_from: str | None) -> str:
    """`inputs OK` only when everything was checked; else what was not, one line each."""
    resumed = f"; would continue from {continues_from}" if continues_from else ""
    if not unchecked:
        return f"inputs OK{resumed}"
    return "\n".join([*unchecked, f"the inputs checked here are fine, {len(unchecked)} not checked (above){resumed}"])


def exit_code(job: Callable[[], None]) -> int:
    """Run an entry point's `job`: 0, or one `error: ...` line on the console and 2 for inputs it refused, 1 for
    a run that stopped or failed, 128 + the signal's number for a run interrupted by SIGINT (130) or SIGTERM (143)."""
    try:
        job()
        return 0
    except ConfigError as e:
        console.error(f"error: {e}")
        return 2
    except (RunFailed, RunStopped) as e:
        console.error(f"error: {e}")
        return 1
    except RunInterrupted as e:  # the shell's code for a death by that signal
        console.error(f"error: {e}")
        return 128 + e.signum


if __name__ == "__main__":
    sys.exit(main())
