"""The main job on the built-in world: SAMI measurably teaches a tiny base model to follow principles.

`python -m pipelines.demo [--seed N | --seeds N ...] [--out DIR] [--iterations N] [--skip-baselines] [key=value ...]`
(what `make demo` runs): builds or reuses the world's base model, runs SAMI through the real training loop
(local Ray, CPU), runs the baselines (SFT on positive-constitution samples, DPO on positive-vs-contrast
pairs, SFT then SAMI) with the same budget of steps, evaluates every model with the evaluation job
(`evals.run`, configs/eval_world.yaml, the world's rule judge) in the same Ray session, and writes
`<out>/report.json`, `report.md` and a plot. With `--seeds` (alone: seeds 0-4), one such demo per seed in
`<out>/seed-<N>/`, then `<out>/seeds.json` and `seeds.md`: each figure's mean with 95% intervals over seeds and over
items. With `--controls`, two more models test the held-out colour family: a positive control trained on the
held-out members too, and a negative control that replays SAMI's groups with responses moved to random
constitutions (`data.replay_shuffled`).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from pipelines.train import exit_code
from sami.config import build_config, load_config, load_yaml
from sami.console import VERBOSE_HELP, console
from sami.run_dir import RunDir

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CONFIG = CONFIGS / "world_demo.yaml"
EVAL_CONFIG = CONFIGS / "eval_world.yaml"
BASELINES = ("sft", "dpo", "sft-sami")
CONTROLS = ("control-all-members", "control-shuffled")
DEFAULT_SEEDS = (0, 1, 2, 3, 4)


def log(message: str) -> None:
    console.say(f"[demo {time.strftime('%H:%M:%S')}] {message}")


def baseline_overrides(name: str, sami_run: Path) -> list[str]:
    """The comparisons train on the query groups the SAMI run generated, with the same number of steps."""
    replay = [f"data.replay_groups_from={sami_run}"]
    return {
        "sami": [],
        "sft": ["objective.name=sft", "objective.kl_beta=0", *replay],
        "dpo": ["objective.name=dpo", "objective.kl_beta=0", "optim.lr=2e-5", *replay],
        "sft-sami": ["objective.name=sft_then_sami", "objective.sft_iterations=1", *replay],
        # every family member trained (only the six-principle axis's held-out principle kept out)
        "control-all-members": ["principles.heldout=[exclaim]"],
        "control-shuffled": [*replay, "data.replay_shuffled=true"],
    }[name]


def time_breakdown(started: float, trained: float, evaluated: float, finished: float, run_dirs: list[Path]) -> dict:
    """Seconds of the demo by phase; overhead is what is neither training work (the iterations' wall time,
    `time_iteration` in each run's metrics.jsonl: generating, training, syncing, saving, and under
    `schedule.rollout: one_step_off` generation hidden inside training counted once) nor evaluation: starting
    Ray and the worker group, loading models, tearing down. Building the base model (once per seed, then cached) is
    stated apart and left out of the overhead and of the share it is taken of."""
    rows = [row for d in run_dirs for row in RunDir(d).read_metrics()]
    work = sum(row["time_iteration"] for row in rows)
    total, base_model, evaluation = finished - started, trained - started, finished - evaluated
    overhead = total - base_model - work - evaluation
    return {"total_s": round(total, 1), "base_model_s": round(base_model, 1), "training_s": round(evaluated - trained, 1),
            "training_work_s": round(work, 1), "evaluation_s": round(evaluation, 1), "overhead_s": round(overhead, 1),
            "overhead_share": round(overhead / (total - base_model), 3)}


def tracking_overrides(args, out: Path, name: str) -> list[str]:
    """With `tracking.trackers` among the overrides, every model of the demo in one place per tracker: runs of one
    MLflow experiment in one store, one TensorBoard folder (`tensorboard --logdir <out>/tensorboard`), one W&B
    project. Without, none (the runs' config.yaml stays as before, so an older demo folder still continues)."""
    if not load_config(CONFIG, args.overrides).tracking.trackers:
        return []
    return ["tracking.experiment=world-demo", f"tracking.mlflow.tracking_uri=sqlite:///{out / 'mlflow.db'}",
            f"tracking.tensorboard.log_dir={out / 'tensorboard' / name}"]


def train_all(names: list[str], args, seed: int, out: Path, extra: list[str]) -> dict[str, Path]:
    """SAMI and the baselines, one after another in one Ray Train worker group (one start-up, not four)."""
    from pipelines.train import run_sequence

    cfgs = [load_config(CONFIG, [f"run.seed={seed}", f"run.iterations={args.iterations}", f"run.name=world-{name}",
                                 f"run.output_dir={out / name}"] + extra + tracking_overrides(args, out, name) + args.overrides
                        + baseline_overrides(name, out / "sami"))
            for name in names]
    t = time.time()
    # a rerun continues where the last one stopped
    run_dirs = run_sequence(cfgs, [RunDir(out / name).config.exists() for name in names], log=log)
    log(f"{', '.join(names)}: trained in {time.time() - t:.0f}s")
    return dict(zip(names, run_dirs))


def evaluation_config(args, seed: int, out: Path, models: dict[str, str]):
    """configs/eval_world.yaml for this seed's models: `--eval-queries` held-out queries, half as many more for
    the held-out principle, all after the queries training drew from."""
    from evals.config import EvalConfig

    data = load_yaml(EVAL_CONFIG)
    heldout_principle = args.eval_queries // 2
    data.update(run={"name": f"world-eval-seed{seed}", "output_dir": str(out / "eval"), "seed": seed},
                models=[{"name": name, "path": path} for name, path in models.items()], baseline="base",
                num_queries=args.eval_queries)
    data["data"] = {**data["data"], "max_queries": load_config(CONFIG, args.overrides).data.max_queries,
                    "heldout_queries": args.eval_queries + heldout_principle}
    data["adherence"] = {**data["adherence"], "heldout_principle_queries": heldout_principle}
    tracking = tracking_overrides(args, out, "eval")
    if tracking:
        data["tracking"] = {**load_config(CONFIG, tracking + args.overrides).tracking.model_dump(mode="json"),
                            "training_run": str(out / "sami")}
    return build_config(EvalConfig, data, [], str(EVAL_CONFIG))


def evaluate(cfg) -> dict:
    """The evaluation job's results for `cfg`: the saved ones when this config already ran to the end."""
    from evals.config import EvalConfig
    from evals.run import run

    out = Path(cfg.run.output_dir)
    if (out / "results.json").is_file() and (out / "config.yaml").is_file() \
            and load_config(out / "config.yaml", model_cls=EvalConfig) == cfg:
        log(f"evaluation: {out} already has this evaluation's results; reusing them")
    else:
        run(cfg)
    return json.loads((out / "results.json").read_text())


def run_seed(args, seed: int, out: Path) -> dict:
    """One whole demo for `seed` into `out`; returns the evaluation's results."""
    from pipelines.demo_report import demo_figures, table, write_report
    from sami.world.base_model import BaseModelSpec, ensure_base_model

    started = time.time()
    log(f"seed {seed}: phase 1/3: base model")
    base_path = ensure_base_model(BaseModelSpec(seed=seed), log=log)
    extra = [f"model.name_or_path={base_path}"]
    log(f"seed {seed}: phase 2/3: training: SAMI" + ("" if args.skip_baselines else
                                                     ", then the baselines (SFT, DPO, SFT then SAMI) on SAMI's groups"))
    trained = time.time()
    others = ([] if args.skip_baselines else list(BASELINES)) + (list(CONTROLS) if args.controls else [])
    runs = train_all(["sami"] + others, args, seed, out, extra)
    evaluated = time.time()
    log(f"seed {seed}: phase 3/3: evaluation on {args.eval_queries} held-out queries (evals.run)")
    models = {"base": str(base_path)}
    models.update({f"sami-iter{k}": str(RunDir(runs["sami"]).hf(k)) for k in range(1, args.iterations + 1)})
    models.update({name: str(RunDir(runs[name]).hf(args.iterations)) for name in BASELINES + CONTROLS if name in runs})
    results = evaluate(evaluation_config(args, seed, out, models))
    figures = demo_figures(results)
    timing = time_breakdown(started, trained, evaluated, time.time(), list(runs.values()))
    report = write_report(out, figures, {"seed": seed, "iterations": args.iterations, "eval_queries": args.eval_queries,
                                         "base_model": str(base_path), "evaluation": str(out / "eval"),
                                         "minutes": round(timing["total_s"] / 60, 2), "time": timing})
    console.say(table(figures))
    log(f"seed {seed}: done in {timing['total_s'] / 60:.1f} min: training {timing['training_work_s']:.0f}s of work in "
        f"{timing['training_s']:.0f}s, evaluation {timing['evaluation_s']:.0f}s, overhead {timing['overhead_s']:.0f}s "
        f"({timing['overhead_share']:.0%}): {report}")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.demo", description=__doc__.splitlines()[0])
    seeds = parser.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=int, default=0, help="one seed, into --out")
    seeds.add_argument("--seeds", type=int, nargs="*", help="several seeds (none given: 0 1 2 3 4), each into "
                                                           "<out>/seed-<N>, then seeds.md")
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--skip-baselines", action="store_true", help="SAMI only (no SFT, DPO, SFT-then-SAMI)")
    parser.add_argument("--controls", action="store_true",
                        help="also the held-out family's controls: SAMI trained on every member, and SAMI's groups "
                             "replayed with shuffled constitution-response pairs")
    parser.add_argument("--eval-queries", type=int, default=200)
    parser.add_argument("--verbose", action="store_true", help=VERBOSE_HELP + " (<out>/demo.log)")
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides of configs/world_demo.yaml for every run")
    args = parser.parse_args(argv)
    args.out = args.out.resolve()
    if args.seeds == []:
        args.seeds = list(DEFAULT_SEEDS)
    if args.seeds and len(set(args.seeds)) != len(args.seeds):
        print(f"error: --seeds {' '.join(map(str, args.seeds))} repeats a seed", file=sys.stderr)
        return 2
    if args.eval_queries < 2:
        print(f"error: --eval-queries must be at least 2, got {args.eval_queries}", file=sys.stderr)
        return 2

    def job() -> None:
        opened = console.open_log(args.out / "demo.log")
        if opened:
            log(opened)
        if not args.seeds:
            run_seed(args, args.seed, args.out)
            return
        from pipelines.demo_report import write_seeds_report

        results = {seed: run_seed(args, seed, args.out / f"seed-{seed}") for seed in args.seeds}
        log(f"seeds {' '.join(map(str, args.seeds))}: {write_seeds_report(args.out, results, args.iterations)}")

    with console.session(verbose=args.verbose):
        return exit_code(job)


if __name__ == "__main__":
    sys.exit(main())
