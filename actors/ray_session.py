"""Joining or starting Ray, the same way for the training job, the evaluation job and the demo.

Under `ray job submit` (RAY_ADDRESS set) a job joins the cluster; otherwise it starts a local Ray with the
dashboard on loopback and enough logical CPUs for its actors (the 2-CPU starvation deadlock: Ray Train's own
actors wait for CPUs the workers hold).
"""
from __future__ import annotations

import os
from typing import Optional

# Set for every process of a local run (and by cluster/runtime_env.py for submitted jobs).
# No "Loading weights" / "Writing model shards" bars from transformers (through huggingface_hub) in the workers:
# carriage returns in a log file, nothing a person needs.
# Ray Data's block metadata read in its scheduling loop, not on a thread: the thread's answer waits for the loop's next
# pass (up to 0.1 s), so each generated batch reached its learner rank 0.1 s late (benchmarks/README.md, "Data plane").
LOCAL_ENV = {"TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
             "RAY_DATA_METADATA_PREFETCH_ON_THREAD": "0"}


def connect_ray(min_cpus: int, uses_gpu: bool = False) -> Optional[str]:
    """Join the cluster of RAY_ADDRESS, else start a local Ray with at least `min_cpus` logical CPUs; returns the
    local Ray's dashboard address (Ray's own line about it goes where its output goes: the log file)."""
    import ray

    if ray.is_initialized():
        return None
    env = dict(LOCAL_ENV)
    if not uses_gpu:
        env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed would otherwise look for CUDA and fail
    for key, value in env.items():
        os.environ.setdefault(key, value)
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env={"env_vars": env})
        return None
    # The dashboard (loopback only) shows the run; Ray Train's placement-group cleaner also polls its state
    # API and warns every few seconds without it.
    # No prestarted idle workers: the jobs run actors and a few tasks, and each idle worker costs ~300 MiB.
    context = ray.init(num_cpus=max(os.cpu_count() or 1, min_cpus), include_dashboard=True, dashboard_host="127.0.0.1",
             runtime_env={"env_vars": env}, log_to_driver=True,
             _system_config={"prestart_worker_first_driver": False, "enable_worker_prestart": False})
    return f"http://{context.dashboard_url}" if context.dashboard_url else None
