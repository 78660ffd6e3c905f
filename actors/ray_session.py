"""Joining or starting Ray, the same way for the training job, the evaluation job and the demo.

Under `ray job submit` (RAY_ADDRESS set) a job joins the cluster; otherwise it starts a local Ray with the
dashboard on loopback and enough logical CPUs for its actors (the 2-CPU starvation deadlock, DESIGN §4).
"""
from __future__ import annotations

import os

# Set for every process of a local run (and by cluster/runtime_env.py for submitted jobs).
LOCAL_ENV = {"TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


def connect_ray(min_cpus: int, uses_gpu: bool = False) -> None:
    """Join the cluster of RAY_ADDRESS, else start a local Ray with at least `min_cpus` logical CPUs."""
    import ray

    if ray.is_initialized():
        return
    env = dict(LOCAL_ENV)
    if not uses_gpu:
        env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed would otherwise look for CUDA and fail
    for key, value in env.items():
        os.environ.setdefault(key, value)
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env={"env_vars": env})
        return
    # The dashboard (loopback only) shows the run; Ray Train's placement-group cleaner also polls its state
    # API and warns every few seconds without it.
    # No prestarted idle workers: the jobs run actors and a few tasks, and each idle worker costs ~300 MiB.
    ray.init(num_cpus=max(os.cpu_count() or 1, min_cpus), include_dashboard=True, dashboard_host="127.0.0.1",
             runtime_env={"env_vars": env}, log_to_driver=True,
             _system_config={"prestart_worker_first_driver": False, "enable_worker_prestart": False})
