"""Submit the training job to a Ray cluster: `python -m cluster.submit --config configs/X.yaml [key=value ...]`.

Validates the config here first (a typo fails on your machine, not after an upload), then submits
`python -m pipelines.train --config X [overrides]` through the Ray Jobs API of RAY_ADDRESS (default
http://127.0.0.1:8265, e.g. the port `ray dashboard ray_cluster.yaml` forwards). The same job by hand:

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        -- python -m pipelines.train --config configs/hh_mistral7b.yaml

`--eval` submits `python -m evals.run --config X` (an evaluation config) the same way. `--dry-run` prints
the resource plan, the entry point and the runtime env, and submits nothing.

Ray 2.60 token authentication: when RAY_AUTH_MODE is unset and a token is available (RAY_AUTH_TOKEN,
RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token), the client turns token mode on; a rejected or missing token ends
with a message that says what to do.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import time
from pathlib import Path

from sami.config import ConfigError, load_config

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
LOG_TAIL_LINES = 5
MESSAGE_CHARS = 500


class SubmitError(RuntimeError):
    """Could not reach, authenticate with, or submit to the cluster; the message says what to do."""


def token_available(environ=os.environ) -> bool:
    if environ.get("RAY_AUTH_TOKEN"):
        return True
    path = Path(environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    return path.is_file()


def enable_token_auth_if_available(environ=os.environ) -> str:
    """Set RAY_AUTH_MODE=token when the user left it unset and has a token; returns the mode in effect."""
    if "RAY_AUTH_MODE" not in environ and token_available(environ):
        environ["RAY_AUTH_MODE"] = "token"
    return environ.get("RAY_AUTH_MODE", "disabled")


def entrypoint(config_path: str, overrides: list[str], resume: bool = False, module: str = "pipelines.train",
               override_config: bool = False) -> str:
    args = ["python", "-m", module, "--config", config_path, *overrides] + (["--resume"] if resume else []) \
        + (["--override-config"] if override_config else [])
    return shlex.join(args)


def relative_config(config: str, working_dir: Path) -> str:
    """The config's path inside working_dir: the job runs from the uploaded copy of working_dir."""
    path = Path(config).resolve()
    try:
        return str(path.relative_to(working_dir.resolve()))
    except ValueError:
        raise ConfigError(f"--config {config} is outside the working dir {working_dir.resolve()}, which is what gets "
                          f"uploaded; copy the config into it (e.g. configs/)") from None


def connect(address: str):
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    mode = os.environ.get("RAY_AUTH_MODE", "disabled")
    try:
        return JobSubmissionClient(address)
    except AuthenticationError as e:
        first_line = str(e).splitlines()[0]
        raise SubmitError(
            f"the Ray cluster at {address} rejected this client ({first_line}; RAY_AUTH_MODE={mode}). The cluster uses "
            f"token authentication: run with RAY_AUTH_MODE=token and the cluster's token in ~/.ray/auth_token, "
            f"RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN (`ray get-auth-token` on the head node prints it)") from None
    except ConnectionError as e:
        raise SubmitError(f"cannot reach the Ray dashboard at {address} ({e}). Start a cluster (`ray up "
                          f"ray_cluster.yaml` then `ray dashboard ray_cluster.yaml`, or `ray start --head`) or set "
                          f"RAY_ADDRESS to its http://host:port") from None


def wait(client, job_id: str, timeout_s: float, poll_s: float = 2.0, out=sys.stdout) -> str:
    """Stream the job's new log lines until it ends; returns the final status name."""
    shown, deadline = 0, time.monotonic() + timeout_s
    while True:
        status = client.get_job_status(job_id).value
        logs = client.get_job_logs(job_id)
        out.write(logs[shown:])
        out.flush()
        shown = len(logs)
        if status in TERMINAL:
            return status
        if time.monotonic() > deadline:
            raise SubmitError(f"job {job_id} still {status} after {timeout_s:.0f}s (it keeps running; "
                              f"`ray job stop {job_id}` stops it)")
        time.sleep(poll_s)


def failure_report(client, job_id: str, status: str) -> str:
    """Why a job ended without success, in a few lines: Ray's status message (a runtime-env setup or upload error
    is only there) and the last lines of its logs."""
    # Ray appends the log tail to an entrypoint's failure (shown below instead) and a traceback to a runtime-env
    # error: its first line and its last (the exception) say it.
    message = (client.get_job_info(job_id).message or "no message from Ray").split(", last available logs")[0]
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    message = " ... ".join(dict.fromkeys([lines[0], lines[-1]]))[:MESSAGE_CHARS]
    tail = [line for line in client.get_job_logs(job_id).splitlines() if line.strip()][-LOG_TAIL_LINES:]
    lines = [f"job {job_id}: {status}: {message}"]
    lines += [f"last log lines (all of them: ray job logs {job_id}):", *(f"  | {line}" for line in tail)] if tail \
        else ["the job wrote no log lines"]
    return "\n".join(lines)


def upload_size(working_dir: Path, excludes: list[str]) -> int:
    """Bytes Ray would zip of working_dir: its own walk, with the runtime env's excludes, .rayignore and
    .gitignore (unless RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1), uncompressed as Ray stores them."""
    from ray._private.ray_constants import RAY_RUNTIME_ENV_IGNORE_GITIGNORE
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    folder, total = working_dir.resolve(), 0

    def add(path: Path) -> None:
        nonlocal total
        if path.is_file():
            total += path.stat().st_size

    _dir_travel(folder, [_get_excludes(folder, excludes)], add,
                include_gitignore=os.environ.get(RAY_RUNTIME_ENV_IGNORE_GITIGNORE, "0") != "1",
                logger=logging.getLogger(__name__))  # not Ray's INFO line on the ignore files it read
    return total


def check_upload_size(working_dir: Path, excludes: list[str]) -> None:
    """Refuse before uploading what the dashboard would answer with HTTP 413."""
    from ray._private.ray_constants import DASHBOARD_CLIENT_MAX_SIZE

    size = upload_size(working_dir, excludes)
    if size >= DASHBOARD_CLIENT_MAX_SIZE:
        raise ConfigError(f"--working-dir {working_dir.resolve()} is {size / 2**20:.1f} MiB to upload, over Ray's "
                          f"{DASHBOARD_CLIENT_MAX_SIZE / 2**20:.0f} MiB limit for a job's working_dir; list what the "
                          f"job does not need in {working_dir.resolve() / '.rayignore'} (gitignore syntax)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.submit", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="training config (or evaluation config with --eval)")
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides, passed on to the job")
    parser.add_argument("--eval", action="store_true", help="submit `python -m evals.run` instead of training")
    parser.add_argument("--resume", action="store_true", help="training: continue from the last complete iteration")
    parser.add_argument("--override-config", action="store_true",
                        help="training, with --resume: continue with settings that differ from the run's config.yaml")
    parser.add_argument("--address", default=os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS,
                        help=f"Ray dashboard address (default: RAY_ADDRESS or {DEFAULT_ADDRESS})")
    parser.add_argument("--working-dir", default=".", help="repository root to upload (default: .)")
    parser.add_argument("--job-id", help="submission id (default: Ray picks one)")
    parser.add_argument("--no-wait", action="store_true", help="return after submitting instead of following logs")
    parser.add_argument("--timeout", type=float, default=7 * 24 * 3600, help="seconds to follow the job")
    parser.add_argument("--dry-run", action="store_true", help="print plan, entry point and runtime env; submit nothing")
    args = parser.parse_args(argv)

    from cluster.runtime_env import build_runtime_env

    try:
        working_dir = Path(args.working_dir)
        config_path = relative_config(args.config, working_dir)
        if args.eval:
            from evals.config import EvalConfig
            from evals.run import format_plan as format_eval_plan

            eval_cfg = load_config(args.config, args.overrides, model_cls=EvalConfig)
            uses_gpu, plan = eval_cfg.generation.gpus_per_model > 0, format_eval_plan(eval_cfg)
        else:
            from pipelines.memory import check_memory
            from pipelines.plan import format_plan
            from pipelines.preflight import check_placements

            cfg = load_config(args.config, args.overrides)
            check_placements(cfg)  # a placement no node type holds would wait scaling.placement_timeout_s for nothing
            uses_gpu, plan = cfg.scaling.gpus_per_learner > 0, format_plan(cfg)
            check_memory(cfg)  # before any GPU node is paid for
        command = entrypoint(config_path, args.overrides, args.resume, "evals.run" if args.eval else "pipelines.train",
                             args.override_config)
        runtime_env = build_runtime_env(uses_gpu, working_dir)
        check_upload_size(working_dir, runtime_env["excludes"])
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        if plan:
            print(plan)
        print(f"entry point: {command}")
        print(f"runtime env: {json.dumps(runtime_env)}")
        print(f"equivalent: ray job submit --address {args.address} --working-dir {args.working_dir} "
              f"--runtime-env-json {shlex.quote(json.dumps({k: v for k, v in runtime_env.items() if k != 'working_dir'}))}"
              f" -- {command}")
        return 0

    mode = enable_token_auth_if_available()
    try:
        client = connect(args.address)
        job_id = client.submit_job(entrypoint=command, runtime_env=runtime_env, submission_id=args.job_id)
        print(f"submitted {job_id} to {args.address} (auth mode {mode}); dashboard: {args.address}/#/jobs/{job_id}")
        if args.no_wait:
            print(f"follow it: ray job logs --address {args.address} --follow {job_id}")
            return 0
        status = wait(client, job_id, args.timeout)
        if status != "SUCCEEDED":
            print(failure_report(client, job_id, status), file=sys.stderr)
            return 1
    except SubmitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"job {job_id}: {status}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
