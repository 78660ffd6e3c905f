"""Job submission: the runtime env and submit helper (fast), and the done-when of the cluster issue (slow):
a loopback `ray start --head` with token authentication, the tiny training config submitted with
`ray job submit`, its status, logs and dashboard metrics read over HTTP, the cluster stopped afterwards."""
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from cluster.runtime_env import build_runtime_env, job_env_vars
from cluster.submit import enable_token_auth_if_available, entrypoint, main as submit_main, relative_config
from evals.run import main as eval_main
from sami.run_dir import RunDir

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
TINY = REPO / "configs" / "tiny.yaml"
# configs/tiny.yaml's iterations at 32 queries and 2 optimiser steps (its 224 and 4 add time, not coverage)
SHORT = ["data.queries_per_iteration=32", "schedule.steps_per_iteration=2"]


# ---------------------------------------------------------------------------------------------------------
# Fast: runtime env and the submit helper


def test_job_env_defaults_never_override_the_user():
    env = job_env_vars(uses_gpu=False, environ={"TOKENIZERS_PARALLELISM": "true", "NCCL_SOCKET_IFNAME": "eth0",
                                                "HF_TOKEN": "secret", "PATH": "/bin"})
    assert env["TOKENIZERS_PARALLELISM"] == "true"  # the user's value wins over the default "false"
    assert env["PYTHONUNBUFFERED"] == "1" and env["DS_ACCELERATOR"] == "cpu"
    assert env["NCCL_SOCKET_IFNAME"] == "eth0"  # NCCL settings travel with the job
    assert "HF_TOKEN" not in env and "PATH" not in env  # secrets and unrelated variables do not
    gpu = job_env_vars(uses_gpu=True, environ={})
    assert "DS_ACCELERATOR" not in gpu
    assert job_env_vars(uses_gpu=False, environ={"DS_ACCELERATOR": "cuda"})["DS_ACCELERATOR"] == "cuda"


def test_runtime_env_uploads_the_repository_without_the_venv(tmp_path):
    env = build_runtime_env(False, REPO, pip=["einops"], environ={})
    assert env["working_dir"] == str(REPO) and ".venv" in env["excludes"] and env["pip"] == ["einops"]
    with pytest.raises(ValueError, match="not the repository root"):
        build_runtime_env(False, tmp_path)


def test_entrypoint_and_config_path():
    assert entrypoint("configs/tiny.yaml", ["optim.lr=1e-4", "run.name=a b"], resume=True) == (
        "python -m pipelines.train --config configs/tiny.yaml optim.lr=1e-4 'run.name=a b' --resume")
    assert entrypoint("configs/tiny.yaml", ["optim.lr=1e-4"], resume=True, override_config=True).endswith(
        "optim.lr=1e-4 --resume --override-config")
    assert relative_config(str(TINY), REPO) == "configs/tiny.yaml"
    from sami.config import ConfigError

    with pytest.raises(ConfigError, match="outside the working dir"):
        relative_config("/etc/hosts", REPO)


def test_token_auth_turns_on_only_when_unset_and_a_token_exists(tmp_path):
    token = tmp_path / "token"
    token.write_text("x" * 64)
    environ = {"RAY_AUTH_TOKEN_PATH": str(token)}
    assert enable_token_auth_if_available(environ) == "token" and environ["RAY_AUTH_MODE"] == "token"
    explicit = {"RAY_AUTH_TOKEN_PATH": str(token), "RAY_AUTH_MODE": "disabled"}
    assert enable_token_auth_if_available(explicit) == "disabled"  # the user's choice stands
    missing = {"RAY_AUTH_TOKEN_PATH": str(tmp_path / "none")}
    assert enable_token_auth_if_available(missing) == "disabled" and "RAY_AUTH_MODE" not in missing


def test_submit_dry_run_prints_plan_and_command(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert submit_main(["--config", "configs/tiny.yaml", "--dry-run", "optim.lr=1e-4"]) == 0
    out = capsys.readouterr().out
    assert "entry point: python -m pipelines.train --config configs/tiny.yaml optim.lr=1e-4" in out
    assert "learners:" in out and "ray job submit" in out


def test_submit_reports_config_errors_without_traceback(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert submit_main(["--config", "configs/tiny.yaml", "--dry-run", "optim.lr=-1"]) == 2
    assert "optim.lr" in capsys.readouterr().err


def test_submit_to_nothing_says_how_to_start_a_cluster(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    port = free_ports(1)[0]  # nothing listens there
    code = submit_main(["--config", "configs/tiny.yaml", "--address", f"http://127.0.0.1:{port}"])
    assert code == 1 and "cannot reach the Ray dashboard" in capsys.readouterr().err


def sparse_file(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)


def test_a_working_dir_over_rays_upload_limit_is_refused_in_one_line(tmp_path, capsys, monkeypatch):
    """Ray's dashboard answers HTTP 413 (a 31-line traceback) to a working_dir zip over 100 MiB. The size counts
    what Ray would zip: not the runtime env's excludes, nor what .rayignore lists. Sparse files: no disk used."""
    from cluster.runtime_env import EXCLUDES
    from cluster.submit import upload_size

    (tmp_path / "pipelines").mkdir()
    (tmp_path / "configs").mkdir()
    shutil.copy(TINY, tmp_path / "configs" / "tiny.yaml")
    sparse_file(tmp_path / "weights.bin", 150 * 2**20)
    (tmp_path / "runs").mkdir()
    sparse_file(tmp_path / "runs" / "old.bin", 300 * 2**20)  # excluded by the runtime env
    small = (tmp_path / "configs" / "tiny.yaml").stat().st_size
    assert upload_size(tmp_path, EXCLUDES) == 150 * 2**20 + small
    monkeypatch.chdir(tmp_path)
    assert submit_main(["--config", "configs/tiny.yaml", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: --working-dir {tmp_path} is 150.0 MiB to upload, over Ray's 100 MiB limit for a job's "
                   f"working_dir; list what the job does not need in {tmp_path / '.rayignore'} (gitignore syntax)\n")
    (tmp_path / ".rayignore").write_text("weights.bin\n")
    assert upload_size(tmp_path, EXCLUDES) == small + len("weights.bin\n")
    assert submit_main(["--config", "configs/tiny.yaml", "--dry-run"]) == 0


# ---------------------------------------------------------------------------------------------------------
# Slow: a real loopback cluster


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def worker_port_range_start(taken: list[int], width: int = 1000) -> int:
    """A worker port range clear of `taken`; Ray refuses to start when a component's port falls inside it."""
    while True:
        low = 10000 + secrets.randbelow(20000)  # below Linux's default ephemeral range (32768+)
        if not any(low <= port < low + width for port in taken):
            return low


class LoopbackCluster:
    """`ray start --head --block` on 127.0.0.1 with its own ports, temp dir and auth token; `head_args` and
    `env` (tests/autoscaling_cluster.py's autoscaler) are added to its command line and environment."""

    def __init__(self, root: Path, head_args: tuple[str, ...] = ("--num-cpus=4",), env: dict | None = None):
        self.root = root
        # Ray's socket paths must stay under 107 bytes: pytest's tmp paths are too long for them.
        self.ray_dir = Path(tempfile.mkdtemp(prefix="sami-ray-", dir="/tmp"))
        self.token = secrets.token_hex(32)
        (root / "token").write_text(self.token)
        (self.gcs_port, self.dashboard_port, client, agent_http, agent_grpc, runtime_env_agent, self.metrics_port,
         node_manager, object_manager) = ports = free_ports(9)
        low = worker_port_range_start(ports)
        self.env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
                    "RAY_AUTH_TOKEN_PATH": str(root / "token"), "RAY_metrics_report_interval_ms": "500",
                    # a test cluster stops at once: no 30 s drain of the head node on SIGTERM (Ray 2.60's default)
                    "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0", **(env or {})}
        self.env.pop("RAY_ADDRESS", None)  # the job's own driver finds the cluster through Ray Jobs
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        command = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
                   f"--port={self.gcs_port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                   f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent_http}",
                   f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={runtime_env_agent}",
                   f"--metrics-export-port={self.metrics_port}", f"--node-manager-port={node_manager}",
                   f"--object-manager-port={object_manager}", f"--min-worker-port={low}",
                   f"--max-worker-port={low + 999}", f"--temp-dir={self.ray_dir}", "--disable-usage-stats",
                   *head_args]
        self.before_start()
        self.log = open(root / "ray_start.log", "w")
        self.process = subprocess.Popen(command, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                        start_new_session=True)

    def before_start(self) -> None:
        """What a subclass writes once the ports are chosen, before `ray start` runs."""

    def get(self, path: str, token: str | None = None, timeout: float = 10.0):
        headers = {"Authorization": f"Bearer {token or self.token}"}
        request = urllib.request.Request(self.address + path, headers=headers)
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ray start exited: {(self.root / 'ray_start.log').read_text()[-2000:]}")
            try:
                self.get("/api/version")
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(1.0)
        raise TimeoutError(f"the dashboard at {self.address} did not come up in {timeout_s}s")

    def scrape_sami_metrics(self) -> list[str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as response:
                return [line for line in response.read().decode().splitlines() if line.startswith("ray_sami_")]
        except (urllib.error.URLError, OSError):
            return []

    def stop(self) -> None:
        """SIGTERM to `ray start --block` stops what it started (no drain: RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S);
        then any process still running from this cluster's temp dir, by pid."""
        import psutil

        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=90)
            except subprocess.TimeoutExpired:
                self.process.kill()
        marker = str(self.ray_dir)
        for proc in psutil.process_iter(["pid", "cmdline"]):
            if any(marker in part for part in proc.info["cmdline"] or []):
                proc.kill()
        self.log.close()
        shutil.rmtree(self.ray_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def loopback_cluster(tmp_path_factory):
    cluster = LoopbackCluster(tmp_path_factory.mktemp("ray-loopback"))
    try:
        cluster.wait_ready()
        yield cluster
    finally:
        cluster.stop()


def follow_job(cluster, job_id: str, timeout_s: float) -> tuple[str, set, str]:
    """(final status, sami_* metric samples scraped from the node's Prometheus endpoint meanwhile, logs),
    the status read over the dashboard's job API."""
    samples, deadline, status = set(), time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        status = cluster.get(f"/api/jobs/{job_id}")["status"]
        samples.update(cluster.scrape_sami_metrics())
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(0.5)
    return status, samples, cluster.get(f"/api/jobs/{job_id}/logs")["logs"]


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_tiny_training_job_on_a_loopback_cluster(loopback_cluster, tmp_path, capsys):
    if not TINY.is_file():
        pytest.skip("configs/tiny.yaml (the training-loop engineer's tiny config) is not there yet")
    cluster = loopback_cluster
    run_dir = tmp_path / "run"
    job_id = f"sami-tiny-{secrets.token_hex(4)}"
    submit = subprocess.run(
        [str(VENV_BIN / "ray"), "job", "submit", "--address", cluster.address, "--working-dir", ".",
         "--submission-id", job_id, "--no-wait", "--", "python", "-m", "pipelines.train", "--config",
         "configs/tiny.yaml", f"run.output_dir={run_dir}", *SHORT],
        cwd=REPO, env=cluster.env, capture_output=True, text=True, timeout=120)
    assert submit.returncode == 0, submit.stdout + submit.stderr

    status, samples, logs = follow_job(cluster, job_id, 720)
    assert status == "SUCCEEDED", logs[-3000:]

    # The per-iteration progress in the job's logs agrees with the run's metrics.jsonl.
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2]
    done = dict(re.findall(r"iteration (\d+) done: loss (-?\d+\.\d{4}) ->", logs))
    assert done == {str(r["iteration"]): f"{r['loss_first_step']:.4f}" for r in records}
    assert (run_dir / "iteration-2" / "hf" / "config.json").is_file()

    # Dashboard metrics from sami/metrics.py: pre-seeded phase gauges of the training job were exported.
    names = {re.match(r"(ray_sami_\w+)", s).group(1) for s in samples}
    assert {"ray_sami_phase", "ray_sami_loss", "ray_sami_iteration"} <= names, sorted(names)
    assert any('job="train"' in s and 'run="tiny"' in s for s in samples)

    # The evaluation job, submitted the same way, on the run's folder alone (`evals.run --run`): no models or data
    # settings; the run's config gives the base model, its complete iterations the exports, heldout_queries.jsonl the
    # queries (the world's drawn again: the same rows). Its plan first, in this process (no second start-up).
    run = RunDir(run_dir)
    assert eval_main(["--run", str(run_dir), "--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert f"evaluation eval-tiny: 3 model(s) against baseline 'base' -> {run.evaluation}" in plan
    assert f"  model iteration-2: {run.hf(2)}" in plan and "  model base: builtin:world-small" in plan
    eval_id = f"sami-eval-{secrets.token_hex(4)}"
    submit = subprocess.run(
        [str(VENV_BIN / "ray"), "job", "submit", "--address", cluster.address, "--working-dir", ".",
         "--submission-id", eval_id, "--no-wait", "--", "python", "-m", "evals.run", "--run", str(run_dir),
         "num_queries=24", "adherence.heldout_principle_queries=8"],
        cwd=REPO, env=cluster.env, capture_output=True, text=True, timeout=120)
    assert submit.returncode == 0, submit.stdout + submit.stderr
    status, samples, logs = follow_job(cluster, eval_id, 600)
    assert status == "SUCCEEDED" and "phase 4/4: report" in logs, logs[-3000:]
    results = json.loads((run.evaluation / "results.json").read_text())
    assert list(results["models"]) == ["base", "iteration-1", "iteration-2"] and results["meta"]["queries"] == 24
    assert results["models"]["iteration-2"]["win_rate_vs_baseline"]["n"] == 24
    assert all(results["models"][m]["adherence"]["mean"] is not None for m in results["models"])
    assert results["models"]["iteration-2"]["adherence"]["heldout_principle"] is not None
    held_out = [json.loads(line)["query_id"] for line in run.heldout_queries.read_text().splitlines()]
    answered = [json.loads(line)["query_id"] for line in (run.evaluation / "responses" / "base.jsonl").read_text().splitlines()]
    assert len(held_out) == 32 and answered == held_out[:24]
    assert "| iteration-2 |" in (run.evaluation / "report.md").read_text()
    assert any('job="eval"' in s and "ray_sami_mi_lower_bound" in s for s in samples)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_failed_job_says_why(loopback_cluster, tmp_path):
    """`job ...: FAILED` alone hid the cause: now Ray's status message and the job's last log lines, exit 1.
    The model folder is checked inside the job (it may exist only on the cluster), so the job itself fails."""
    job_id = f"sami-fails-{secrets.token_hex(4)}"
    missing = tmp_path / "no-such-model"
    result = subprocess.run([sys.executable, "-m", "cluster.submit", "--config", "configs/tiny.yaml", "--address",
                             loopback_cluster.address, "--job-id", job_id, f"model.name_or_path={missing}",
                             f"run.output_dir={tmp_path / 'run'}"], cwd=REPO, env=loopback_cluster.env,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    stderr = result.stderr.splitlines()  # Ray's client logs its upload first
    report = stderr[stderr.index(f"job {job_id}: FAILED: Job entrypoint command failed with exit code 2"):]
    assert report[1] == f"last log lines (all of them: ray job logs {job_id}):"
    assert 3 <= len(report) <= 7 and all(line.startswith("  | ") for line in report[2:]), result.stderr
    assert report[-1].startswith("  | error: model.name_or_path") and str(missing) in report[-1]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_rejected_token_gives_a_clear_error(loopback_cluster, tmp_path):
    wrong = tmp_path / "wrong_token"
    wrong.write_text(secrets.token_hex(32))
    env = {**loopback_cluster.env, "RAY_AUTH_TOKEN_PATH": str(wrong)}
    result = subprocess.run([sys.executable, "-m", "cluster.submit", "--config", "configs/tiny.yaml", "--address",
                             loopback_cluster.address, "--no-wait"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 1
    assert "rejected this client" in result.stderr and "RAY_AUTH_MODE=token" in result.stderr
    assert "Traceback" not in result.stderr
    with pytest.raises(urllib.error.HTTPError) as err:  # the dashboard API itself refuses the wrong token
        loopback_cluster.get("/api/jobs/", token=wrong.read_text())
    assert err.value.code == 403
