"""The training job: `python -m pipelines.train --config configs/<name>.yaml [key.path=value ...] [--resume] [--dry-run]`.

Connects to the Ray cluster it runs in (under `ray job submit`, or with RAY_ADDRESS set), else starts a
local Ray; starts the principle writer and the rollout actors; runs the whole online loop inside one Ray
Train `fit()` (pipelines/loop.py).
"""
from __future__ import annotations

import argparse
import json
import sys
import uuid
from pathlib import Path

from pipelines.plan import WRITER_CPUS, format_plan
from sami.config import ConfigError, TrainConfig, dump_config, load_config
from sami.run_dir import last_complete_iteration, stop_message

class RunStopped(RuntimeError):
    """The run stopped in order (a non-finite loss, a failed weight sync check, an engine failing too often)."""


def run(cfg: TrainConfig, resume: bool = False, log=print) -> Path:
    """Run the training job; returns the run directory."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from actors.principle_writer import PrincipleWriterActor
    from actors.ray_session import connect_ray
    from actors.rollout import start_rollout_actors
    from pipelines.loop import train_loop_per_worker
    from sami.data import load_queries, split_queries
    from sami.world.base_model import resolve_model  # torch and transformers: not for --dry-run

    run_dir = Path(cfg.run.output_dir).resolve()
    done = last_complete_iteration(run_dir)
    if (run_dir / "metrics.jsonl").exists() and not resume:
        raise ConfigError(f"run.output_dir {run_dir} already holds a run (iteration {done} complete); pass --resume "
                          f"to continue it or choose another run.output_dir")
    if resume and done >= cfg.run.iterations:
        log(f"[sami] {run_dir}: all {cfg.run.iterations} iterations are complete; nothing to do")
        return run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run_dir / "config.yaml")
    try:
        model_path = resolve_model(cfg.model.name_or_path, log)
    except ValueError as e:
        raise ConfigError(f"model.name_or_path: {e}") from None
    train_rows, heldout_rows = split_queries(load_queries(cfg.data, cfg.run.seed), cfg.data.heldout_queries)
    (run_dir / "heldout_queries.jsonl").write_text("".join(json.dumps(r) + "\n" for r in heldout_rows))

    use_gpu = cfg.scaling.gpus_per_learner > 0
    # Logical CPUs above the learners + actors leave room for Ray Train's own actors (the 2-CPU deadlock).
    connect_ray(cfg.scaling.num_learners + cfg.rollout.num_engines + 4, uses_gpu=use_gpu)
    log(f"[sami] run {cfg.run.name}: {cfg.run.iterations} iteration(s) of {cfg.objective.name}, model {model_path}, "
        f"{cfg.scaling.num_learners} learner(s), {cfg.rollout.num_engines} {cfg.rollout.engine} rollout engine(s)")
    # A language-model writer gets an actor of its own; principles from a file or the world are served by the
    # same core inside learner rank 0 (a process less).
    writer = PrincipleWriterActor.options(num_cpus=WRITER_CPUS).remote(cfg.principles, str(run_dir)) \
        if cfg.principles.source == "writer" else None
    actors = start_rollout_actors(model_path, cfg.rollout, cfg.model)
    attempt = uuid.uuid4().hex  # this driver's run: tells its learner restarts and its stop note from older ones
    resources = {"CPU": cfg.scaling.cpus_per_learner, **({"GPU": cfg.scaling.gpus_per_learner} if use_gpu else {})}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "cfg": cfg, "actors": actors, "writer": writer, "model_path": model_path, "run_dir": str(run_dir),
            "train_queries": train_rows, "attempt": attempt,
        },
        scaling_config=ScalingConfig(num_workers=cfg.scaling.num_learners, use_gpu=use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(name=cfg.run.name, storage_path=str(run_dir / "ray_train"),
                             failure_config=FailureConfig(max_failures=cfg.scaling.max_learner_failures)),
    )
    try:
        trainer.fit()
    finally:
        for actor in actors + ([writer] if writer is not None else []):
            ray.kill(actor)
    stopped = stop_message(run_dir, attempt)
    if stopped is not None:
        raise RunStopped(stopped)
    log(f"[sami] done: {run_dir} (metrics.jsonl, iteration-*/hf)")
    return run_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML config (configs/*.yaml); defaults to the built-in world")
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. optim.lr=1e-4")
    parser.add_argument("--resume", action="store_true", help="continue from the last complete iteration")
    parser.add_argument("--dry-run", action="store_true", help="validate the config and print the resource plan")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.dry_run:
            print(format_plan(cfg))
            return 0
        run(cfg, resume=args.resume)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RunStopped as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
