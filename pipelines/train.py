"""The training job: `python -m pipelines.train --config configs/<name>.yaml [key.path=value ...] [--resume] [--dry-run]`.

Connects to the Ray cluster it runs in (under `ray job submit`, or with RAY_ADDRESS set), else starts a
local Ray; starts the principle writer and the rollout actors; runs the whole online loop inside one Ray
Train `fit()` (pipelines/learner.py).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from pipelines.config import ConfigError, TrainConfig, dump_config, load_config

# Set for every process of a local run (and by cluster/runtime_env.py for submitted jobs).
LOCAL_ENV = {"TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


def resolve_model(name_or_path: str, log=print) -> str:
    """`builtin:world` (and `builtin:world-small`) is the built-in world's cached base model."""
    if name_or_path.startswith("builtin:"):
        from pipelines.world import BaseModelSpec, ensure_base_model

        kind = name_or_path.split(":", 1)[1]
        specs = {"world": BaseModelSpec(), "world-small": BaseModelSpec.small()}
        if kind not in specs:
            raise ConfigError(f"model.name_or_path: unknown built-in model {name_or_path!r}; known: "
                              f"{['builtin:' + k for k in specs]}")
        return str(ensure_base_model(specs[kind], log=log))
    return name_or_path


def connect_ray(cfg: TrainConfig):
    import ray

    if ray.is_initialized():
        return
    env = dict(LOCAL_ENV)
    if cfg.scaling.gpus_per_learner == 0:
        env["DS_ACCELERATOR"] = "cpu"
    for key, value in env.items():
        os.environ.setdefault(key, value)
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env={"env_vars": env})
    else:
        # Logical CPUs above the learners + actors leave Ray Data room to run (the 2-CPU starvation deadlock).
        needed = cfg.scaling.num_learners + cfg.rollout.num_engines + 4
        # The dashboard (loopback only) shows the run; Ray Train's placement-group cleaner also polls its
        # state API and warns every few seconds without it.
        ray.init(num_cpus=max(os.cpu_count() or 1, needed), include_dashboard=True, dashboard_host="127.0.0.1",
                 runtime_env={"env_vars": env}, log_to_driver=True)


def run(cfg: TrainConfig, resume: bool = False, log=print) -> Path:
    """Run the training job; returns the run directory."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from actors.principle_writer import principle_writer_actor
    from actors.rollout import start_rollout_actors
    from pipelines.data import load_queries, split_queries
    from pipelines.learner import last_complete_iteration, train_loop_per_worker

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
    model_path = resolve_model(cfg.model.name_or_path, log)
    train_rows, heldout_rows = split_queries(load_queries(cfg.data, cfg.run.seed), cfg.data.heldout_queries)
    (run_dir / "heldout_queries.jsonl").write_text("".join(json.dumps(r) + "\n" for r in heldout_rows))

    connect_ray(cfg)
    log(f"[sami] run {cfg.run.name}: {cfg.run.iterations} iteration(s) of {cfg.objective.name}, model {model_path}, "
        f"{cfg.scaling.num_learners} learner(s), {cfg.rollout.num_engines} {cfg.rollout.engine} rollout engine(s)")
    writer = principle_writer_actor().options(num_cpus=0.1).remote(cfg.principles, str(run_dir))
    actors = start_rollout_actors(model_path, cfg.rollout, cfg.model)
    use_gpu = cfg.scaling.gpus_per_learner > 0
    resources = {"CPU": cfg.scaling.cpus_per_learner, **({"GPU": cfg.scaling.gpus_per_learner} if use_gpu else {})}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "cfg": cfg, "actors": actors, "writer": writer, "model_path": model_path, "run_dir": str(run_dir),
            "tokenizer_path": cfg.model.tokenizer or model_path, "train_queries": train_rows, "resume": resume,
        },
        scaling_config=ScalingConfig(num_workers=cfg.scaling.num_learners, use_gpu=use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(name=cfg.run.name, storage_path=str(run_dir / "ray_train")),
    )
    try:
        trainer.fit()
    finally:
        for actor in actors + [writer]:
            ray.kill(actor)
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
            from cluster.plan import format_plan

            print(format_plan(cfg))
            return 0
        run(cfg, resume=args.resume)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
