"""The main job on the built-in world: SAMI measurably teaches a tiny base model to follow principles.

`python -m pipelines.demo [--seed N] [--out DIR] [--iterations N] [--skip-baselines] [key=value ...]` (what `make demo` runs): builds or reuses the
world's base model, runs SAMI through the real training loop (local Ray, CPU), runs the baselines (SFT on
positive-constitution samples, DPO on positive-vs-contrast pairs, SFT then SAMI) with the same budget of
steps, evaluates every model on held-out queries and writes `<out>/report.json`, `report.md` and a plot.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from sami.config import ConfigError, load_config

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "world_demo.yaml"


def log(message: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {message}", flush=True)


def baseline_overrides(name: str, sami_run: Path) -> list[str]:
    """The comparisons train on the query groups the SAMI run generated, with the same number of steps."""
    replay = [f"data.replay_groups_from={sami_run}"]
    return {
        "sami": [],
        "sft": ["objective.name=sft", "objective.kl_beta=0", *replay],
        "dpo": ["objective.name=dpo", "objective.kl_beta=0", "optim.lr=2e-5", *replay],
        "sft-sami": ["objective.name=sft_then_sami", "objective.sft_iterations=1", *replay],
    }[name]


def train_all(names: list[str], args, extra: list[str]) -> dict[str, Path]:
    """SAMI and the baselines, one after another in one Ray Train worker group (one start-up, not four)."""
    from pipelines.train import run_sequence

    cfgs = [load_config(CONFIG, [f"run.seed={args.seed}", f"run.iterations={args.iterations}", f"run.name=world-{name}",
                                 f"run.output_dir={args.out / name}"] + extra + args.overrides
                        + baseline_overrides(name, args.out / "sami"))
            for name in names]
    t = time.time()
    # a rerun continues where the last one stopped
    run_dirs = run_sequence(cfgs, [(args.out / name / "config.yaml").exists() for name in names], log=log)
    log(f"{', '.join(names)}: trained in {time.time() - t:.0f}s")
    return dict(zip(names, run_dirs))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--skip-baselines", action="store_true", help="SAMI only (no SFT, DPO, SFT-then-SAMI)")
    parser.add_argument("--eval-queries", type=int, default=200)
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides of configs/world_demo.yaml for every run")
    args = parser.parse_args(argv)
    args.out = args.out.resolve()
    started = time.time()
    from evals.world import eval_set, evaluate_model
    from pipelines.demo_report import print_table, write_report
    from sami.world.base_model import BaseModelSpec, ensure_base_model

    try:
        spec = BaseModelSpec(seed=args.seed)
        log("phase 1/3: base model")
        base_path = ensure_base_model(spec, log=log)
        extra = [f"model.name_or_path={base_path}"]
        log("phase 2/3: training: SAMI" + ("" if args.skip_baselines else ", then the baselines (SFT, DPO, SFT then "
                                           "SAMI) on SAMI's groups"))
        runs = train_all(["sami"] + ([] if args.skip_baselines else ["sft", "dpo", "sft-sami"]), args, extra)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    log(f"phase 3/3: evaluation on {args.eval_queries} held-out queries")
    items, heldout = eval_set(args.eval_queries, args.seed), eval_set(args.eval_queries // 2, args.seed, heldout=True)
    models = {"base": str(base_path)}
    models.update({f"sami-iter{k}": str(runs["sami"] / f"iteration-{k}" / "hf") for k in range(1, args.iterations + 1)})
    models.update({name: str(runs[name] / f"iteration-{args.iterations}" / "hf") for name in ("sft", "dpo", "sft-sami") if name in runs})
    results, base_responses = {}, None
    for name, path in models.items():
        t = time.time()
        metrics, responses = evaluate_model(path, items, heldout, seed=args.seed, base_responses=base_responses)
        base_responses = base_responses or responses
        results[name] = metrics
        log(f"evaluated {name}: adherence {metrics['adherence']:.3f}, MI bound {metrics['mi_lower_bound']:.3f} "
            f"({time.time() - t:.0f}s)")
    report = write_report(args.out, results, {"seed": args.seed, "iterations": args.iterations,
                                                "eval_queries": args.eval_queries, "base_model": str(base_path),
                                                "minutes": round((time.time() - started) / 60, 2)})
    print_table(results)
    log(f"done in {(time.time() - started) / 60:.1f} min: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
