"""Where one iteration's wall time goes: principles, generation, training, weight sync, checkpoint.

    python -m benchmarks.iteration_phases [--out runs/bench-phases] [key.path=value ...]

Runs `configs/tiny.yaml` for 2 iterations on a local Ray (CPU) and reports iteration 2 (iteration 1 also
pays for starting the rollout actor and Ray Data); the overhead ratio is the share of the iteration not
spent generating or training. Ray Train's start-up (~40 s per run) is outside every iteration.
"""
from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from sami.config import load_config
from sami.run_dir import RunDir
from pipelines.train import run

PHASES = ("write_principles", "generate", "train", "sync", "checkpoint")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("runs/bench-phases"))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    cfg = load_config("configs/tiny.yaml", [f"run.output_dir={args.out}", *args.overrides])
    started = time.perf_counter()
    run(cfg)
    total_run = time.perf_counter() - started
    row = RunDir(args.out).read_metrics()[-1]
    times = {p: row[f"time_{p}"] for p in PHASES}
    total = sum(times.values())
    print(f"iteration {row['iteration']}: {total:.2f} s in phases ({total_run:.0f} s for the whole run)")
    for phase, seconds in times.items():
        print(f"  {phase:17} {seconds:7.2f} s  {seconds / total:6.1%}")
    overhead = total - times["generate"] - times["train"]
    print(f"  overhead (not generating or training): {overhead:.2f} s = {overhead / total:.1%} of the iteration; "
          f"sync moved {row['sync_bytes'] / 2**20:.1f} MiB in {times['sync']:.3f} s")


if __name__ == "__main__":
    main()
