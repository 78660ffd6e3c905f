"""The two data planes side by side: Ray Data (the default) against rank 0's direct path, on the tiny config
and with a slower engine stand-in. One JSON line per case.

    python -m benchmarks.data_plane [--out runs/bench-data-plane] [--iterations 4]

Each case runs `python -m pipelines.train --config configs/tiny.yaml` once per data plane (the same seed), as
a child process whose `ray::` descendants are sampled every 0.5 s (benchmarks/worker_processes.py). Per
iteration, from metrics.jsonl: `time_iteration` (the mean over iterations 2.., once the processes are up; the
first is reported apart) and `time_to_first_micro_batch` (from the start of the iteration's generation to learner
rank 0's first micro-batch in hand). The slow case adds `GENERATE_DELAY_S` to every engine call (a stand-in for an
engine of realistic speed next to this tiny model) with 2 engines and generation batches of 4 groups.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil

from actors.rollout import GENERATE_DELAY_S
from benchmarks.worker_processes import AGENTS, ray_processes
from sami.run_dir import RunDir

CASES = {
    "tiny": ([], {}),
    "slow_engine": (["rollout.num_engines=2", "sampling.batch_size=8"], {GENERATE_DELAY_S: "0.25"}),
}


def run(out: Path, iterations: int, overrides: list[str], env: dict) -> dict:
    """One training run: its per-iteration figures and its peak `ray::` processes and RSS during the iterations."""
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pipelines.train", "--config", "configs/tiny.yaml", f"run.output_dir={out}",
               f"run.iterations={iterations}", *overrides]
    with open(out.with_suffix(".log"), "w") as log:
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env})
        processes, rss = 0, 0.0
        while child.poll() is None:
            try:
                workers = [r for n, r in ray_processes(child.pid) if n not in AGENTS]
            except psutil.NoSuchProcess:
                break
            if ": generating" in out.with_suffix(".log").read_text():
                processes, rss = max(processes, len(workers)), max(rss, sum(workers) / 1024)
            time.sleep(0.5)
    if child.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed: see {out.with_suffix('.log')}")
    rows = RunDir(out).read_metrics()
    return {"iteration_s": statistics.mean(r["time_iteration"] for r in rows[1:]), "first_iteration_s": rows[0]["time_iteration"],
            "first_micro_batch_s": statistics.mean(r["time_to_first_micro_batch"] for r in rows[1:]),
            "generate_s": statistics.mean(r["time_generate"] for r in rows[1:]), "processes": processes, "rss_mib": round(rss),
            "loss_last_step": rows[-1]["loss_last_step"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("runs/bench-data-plane"))
    parser.add_argument("--iterations", type=int, default=4)
    args = parser.parse_args()
    for case, (overrides, env) in CASES.items():
        figures = {plane: run(args.out / f"{case}-{plane}", args.iterations, [*overrides, f"rollout.data_plane={plane}"], env)
                   for plane in ("direct", "ray_data")}
        direct, ray_data = figures["direct"], figures["ray_data"]
        print(json.dumps({"case": case, "direct_s": round(direct["iteration_s"], 2), "ray_data_s": round(ray_data["iteration_s"], 2),
                          "extra_s": round(ray_data["iteration_s"] - direct["iteration_s"], 2),
                          "first_micro_batch_direct_s": round(direct["first_micro_batch_s"], 2),
                          "first_micro_batch_ray_data_s": round(ray_data["first_micro_batch_s"], 2),
                          "first_iteration_direct_s": round(direct["first_iteration_s"], 2),
                          "first_iteration_ray_data_s": round(ray_data["first_iteration_s"], 2),
                          "processes_direct": direct["processes"], "processes_ray_data": ray_data["processes"],
                          "rss_mib_direct": direct["rss_mib"], "rss_mib_ray_data": ray_data["rss_mib"]}), flush=True)


if __name__ == "__main__":
    main()
