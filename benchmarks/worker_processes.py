"""How many Ray worker processes a training run starts, and their memory: sampled with `ps` every 0.5 s.

    python -m benchmarks.worker_processes [--out runs/bench-workers] [key.path=value ...]

Runs `python -m pipelines.train --config configs/tiny.yaml sampling.batch_size=8` (plus the overrides) as
a child process and counts processes whose command line starts with `ray::` (Ray names its workers so).
The per-node agents (`ray::DashboardAgent`, `ray::RuntimeEnvAgent`) are listed but not counted: they are
not workers and a node has them whatever runs. Peak RSS is the largest sum over the counted workers.
"""
from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import time
from pathlib import Path

AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")


def ray_processes() -> list[tuple[str, int]]:
    """(name, RSS KiB) of every `ray::` process on this machine."""
    out = subprocess.run(["ps", "-eo", "rss=,args="], capture_output=True, text=True).stdout.splitlines()
    rows = [line.split(None, 1) for line in out if line.strip()]
    return [(args.split()[0], int(rss)) for rss, args in rows if args.startswith("ray::")]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("runs/bench-workers"))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    command = [sys.executable, "-m", "pipelines.train", "--config", "configs/tiny.yaml", "sampling.batch_size=8",
               f"run.output_dir={args.out}", *args.overrides]
    log = open(args.out.with_suffix(".log"), "w")
    child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    peak, peak_names, peak_rss, started = 0, {}, 0.0, time.time()
    while child.poll() is None:
        workers = [(n, rss) for n, rss in ray_processes() if n not in AGENTS]
        if len(workers) > peak:
            peak, peak_names = len(workers), dict(collections.Counter(n for n, _ in workers))
        peak_rss = max(peak_rss, sum(rss for _, rss in workers) / 1024)
        time.sleep(0.5)
    print(f"exit {child.returncode} after {time.time() - started:.0f} s (log: {log.name})")
    print(f"peak Ray worker processes: {peak} (node agents not counted)")
    for name, count in sorted(peak_names.items()):
        print(f"  {count:3d}  {name}")
    print(f"peak worker RSS: {peak_rss:.0f} MiB")


if __name__ == "__main__":
    main()
