"""How many Ray worker processes a training run starts, and their memory: sampled with `ps` every 0.5 s.

    python -m benchmarks.worker_processes [--out runs/bench-workers] [key.path=value ...]

Runs `python -m pipelines.train --config configs/tiny.yaml sampling.batch_size=8` (plus the overrides) as
a child process and counts its descendants whose command line starts with `ray::` (Ray names its workers so;
other Ray sessions on the machine are not counted).
The per-node agents (`ray::DashboardAgent`, `ray::RuntimeEnvAgent`) are listed but not counted: they are
not workers and a node has them whatever runs. Peak RSS is the largest sum over the counted workers. Both are
reported for the whole run and for the iterations alone (from the first "generating" line of the log on), since
start-up briefly holds workers that are about to become actors.
"""
from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil

AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")


def ray_processes(root: int) -> list[tuple[str, int]]:
    """(name, RSS KiB) of every `ray::` process started under process `root` (the run's driver)."""
    found = []
    for proc in psutil.Process(root).children(recursive=True):
        try:
            args = proc.cmdline()
            if args and args[0].startswith("ray::"):
                found.append((args[0].split()[0], proc.memory_info().rss // 1024))
        except psutil.NoSuchProcess:
            continue
    return found


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
    peaks = {"whole run": (0, {}, 0.0), "iterations": (0, {}, 0.0)}
    started = time.time()
    while child.poll() is None:
        try:
            workers = [(n, rss) for n, rss in ray_processes(child.pid) if n not in AGENTS]
        except psutil.NoSuchProcess:  # the driver exited between poll() and the scan
            break
        phases = ["whole run"] + (["iterations"] if ": generating" in args.out.with_suffix(".log").read_text() else [])
        for phase in phases:
            count, names, rss = peaks[phase]
            if len(workers) > count:
                count, names = len(workers), dict(collections.Counter(n for n, _ in workers))
            peaks[phase] = (count, names, max(rss, sum(r for _, r in workers) / 1024))
        time.sleep(0.5)
    print(f"exit {child.returncode} after {time.time() - started:.0f} s (log: {log.name})")
    for phase, (count, names, rss) in peaks.items():
        print(f"{phase}: peak {count} Ray worker processes (node agents not counted), peak worker RSS {rss:.0f} MiB")
        for name, n in sorted(names.items()):
            print(f"  {n:3d}  {name}")


if __name__ == "__main__":
    main()
