"""Seconds per iteration with `schedule.rollout: sync` against `one_step_off`, side by side in one run.

    python -m benchmarks.rollout_schedule [--out runs/bench-schedule] [--iterations 4] [--pairs 1] [key.path=value ...]

Runs `configs/tiny.yaml` (local Ray, CPU) once per schedule per pair, alternating, and compares
`time_iteration` (from the start of an iteration's generate phase to its metrics row, as metrics.jsonl records
it; the iterations of a run add up to its loop's wall-clock) two ways: over all iterations (what a run of
that length pays: iteration 1 overlaps nothing, the last one has nothing to generate) and over the steady
state, iterations 2 to N-1 (what every further iteration costs). Ray Train's start-up is outside both.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
from pathlib import Path

from pipelines.train import run
from sami.config import load_config
from sami.run_dir import RunDir

SCHEDULES = ("sync", "one_step_off")


def iteration_rows(run_dir: Path) -> list[dict]:
    return RunDir(run_dir).read_metrics()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("runs/bench-schedule"))
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--pairs", type=int, default=1, help="runs of each schedule, alternating")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    rows = {schedule: [] for schedule in SCHEDULES}  # every run's metrics rows
    for pair in range(args.pairs):
        for schedule in SCHEDULES:
            out = args.out / f"{schedule}-{pair}"
            run(load_config("configs/tiny.yaml", [f"run.output_dir={out}", f"run.iterations={args.iterations}",
                                                  f"schedule.rollout={schedule}", *args.overrides]))
            rows[schedule].append(iteration_rows(out))
    means = {}
    for schedule, runs in rows.items():
        every, steady = [r for run_rows in runs for r in run_rows], [r for run_rows in runs for r in run_rows[1:-1]]
        means[schedule] = {name: statistics.mean(r["time_iteration"] for r in chosen)
                           for name, chosen in (("all", every), ("steady", steady))}
        phases = {p: statistics.mean(r[f"time_{p}"] for r in steady) for p in ("generate", "train", "wait_generation", "sync")}
        print(f"{schedule:13} {means[schedule]['all']:6.2f} s per iteration over iterations 1-{args.iterations}, "
              f"{means[schedule]['steady']:6.2f} s over 2-{args.iterations - 1} (x {args.pairs} run(s)); steady state: "
              + ", ".join(f"{p} {s:.2f} s" for p, s in phases.items())
              + f"; staleness {sorted({r['staleness'] for r in every})}")
    for name in ("all", "steady"):
        print(f"one_step_off / sync, {name} iterations: {means['one_step_off'][name] / means['sync'][name]:.3f}")


if __name__ == "__main__":
    main()
