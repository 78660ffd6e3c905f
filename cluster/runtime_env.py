"""The runtime env of a submitted job: the repository as working_dir, plus environment variables.

Defaults (actors.ray_session.LOCAL_ENV; DS_ACCELERATOR=cpu for a job that asks for no GPU) apply only where
the user has not set the variable: a value in the submitting shell for one of those names, or for any
NCCL_* / TORCH_NCCL_* variable, travels with the job instead. Secrets (tokens, keys) are never copied: a
runtime env is shown on the dashboard; set them on the cluster's nodes.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Optional

from actors.ray_session import LOCAL_ENV

# Never uploaded: the local virtual env, run outputs, caches (working_dir uploads are capped by Ray).
EXCLUDES = [".venv", "runs", ".git", "**/__pycache__", ".pytest_cache", "*.egg-info", "benchmarks/results"]
FORWARDED_PREFIXES = ("NCCL_", "TORCH_NCCL_")


def job_env_vars(uses_gpu: bool, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    defaults = dict(LOCAL_ENV)
    if not uses_gpu:
        defaults["DS_ACCELERATOR"] = "cpu"  # DeepSpeed would otherwise look for CUDA and fail
    env = {key: environ.get(key, value) for key, value in defaults.items()}
    env.update({key: value for key, value in environ.items() if key.startswith(FORWARDED_PREFIXES)})
    # actors.ray_session.connect_ray passes LOCAL_ENV again; Ray refuses a driver runtime env that repeats a job's
    # keys unless told to combine them.
    env["RAY_OVERRIDE_JOB_RUNTIME_ENV"] = "1"
    return env


def build_runtime_env(uses_gpu: bool, working_dir: str | os.PathLike = ".", pip: Optional[list[str]] = None,
                      environ: Mapping[str, str] = os.environ) -> dict:
    """`runtime_env` for `JobSubmissionClient.submit_job` (same keys as `ray job submit --runtime-env-json`)."""
    folder = Path(working_dir).resolve()
    if not (folder / "pipelines").is_dir():
        raise ValueError(f"working_dir {folder} is not the repository root (no pipelines/ folder in it)")
    env = {"working_dir": str(folder), "excludes": list(EXCLUDES), "env_vars": job_env_vars(uses_gpu, environ)}
    if pip:
        env["pip"] = list(pip)
    return env
