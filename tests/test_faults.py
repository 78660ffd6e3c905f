"""Faults on a real run of configs/tiny.yaml (local Ray, CPU): a killed rollout actor (mid-generation, or inside
its weight sync), a killed learner worker, a loss that turns NaN. Each run is `python -m pipelines.train` in a subprocess, so processes can be killed by
pid (found among the driver's descendants by their Ray names) and the exit code read as a user sees it. A run is
mostly start-up, so the faults a run survives share runs: one per rollout schedule."""
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pyarrow.parquet
import pytest

from actors.rollout import EXIT_IN_UPDATE_WEIGHTS
from sami.run_dir import RunDir
from test_job_submit import SHORT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
REPO = Path(__file__).resolve().parents[1]
# Three short iterations: 32 queries, 2 steps each.
SMALL = ["run.iterations=3", *SHORT, "sampling.batch_size=8"]


def start(out: Path, *overrides: str, env: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "pipelines.train", "--config", "configs/tiny.yaml",
                             f"run.output_dir={out}", *SMALL, *overrides], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def kill_when_iteration_completes(driver: subprocess.Popen, out: Path, iteration: int, process_name: str) -> int:
    """SIGKILL the first descendant of the driver named `process_name` once `iteration` is complete."""
    deadline = time.time() + 300
    while not (out / f"iteration-{iteration}" / "COMPLETE").is_file():
        assert driver.poll() is None and time.time() < deadline, f"the run ended or stalled before iteration {iteration} completed"
        time.sleep(0.2)
    for proc in psutil.Process(driver.pid).children(recursive=True):
        try:
            if proc.cmdline() and proc.cmdline()[0].startswith(process_name):
                os.kill(proc.pid, signal.SIGKILL)
                return proc.pid
        except psutil.NoSuchProcess:
            continue
    raise AssertionError(f"no process named {process_name} under the driver")


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def finished(driver: subprocess.Popen, out: Path) -> tuple[str, list[dict]]:
    """(console, metrics rows) of a 3-iteration run that must finish."""
    log, _ = driver.communicate(timeout=500)
    assert driver.returncode == 0, log[-3000:]
    rows = metrics(out)
    assert [r["iteration"] for r in rows] == [1, 2, 3], log[-3000:]  # none generated or trained twice
    return log, rows


@dataclass
class FaultedRun:
    out: Path
    engine_exited: Path  # written by the engine as it ended inside update_weights
    log: str
    rows: list[dict]


@pytest.fixture(scope="module")
def three_faults(tmp_path_factory) -> FaultedRun:
    """One `sync` run of 3 iterations, one fault per iteration (each real run is ~55 s of start-up for a few seconds
    per iteration): its engine's process ends inside iteration 1's weight sync (the test hook EXIT_IN_UPDATE_WEIGHTS),
    a learner worker is killed once iteration 1 is complete (iteration 2 trains again), the rollout actor once
    iteration 2 is complete (iteration 3 is being generated)."""
    folder = tmp_path_factory.mktemp("three-faults")
    out, exited = folder / "run", folder / "engine-exited"
    driver = start(out, env={EXIT_IN_UPDATE_WEIGHTS: str(exited)})
    try:
        kill_when_iteration_completes(driver, out, 1, "ray::RayTrainWorker")
        kill_when_iteration_completes(driver, out, 2, "ray::RolloutWorker")
        log, rows = finished(driver, out)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.communicate()
    return FaultedRun(out, exited, log, rows)


def assert_rollout_actor_came_back(out: Path, rows: list[dict], log: str, generating: int) -> None:
    """The actor killed while `generating` was generated restarted in that iteration, probe-checked, and every
    query's group of it was generated exactly once."""
    restarted = rows[generating - 1]
    assert restarted["engine_restarts"] == 1 and restarted["restart_probe_abs_diff"] <= 1e-4  # the probe check passed
    groups = pyarrow.parquet.read_table(RunDir(out).groups(generating)).to_pylist()
    ids = [g["query_id"] for g in groups]
    assert len(ids) == len(set(ids)) == restarted["groups"]
    filtered = sum(v for k, v in restarted.items() if k.startswith("filtered_"))
    assert restarted["groups"] + filtered == 32  # every query's group generated exactly once
    assert "rollout engine 0 restarted: current weights loaded, probe check passed" in log


def test_a_killed_rollout_actor_comes_back_and_nothing_is_lost(three_faults):
    """`sync`: killed once iteration 2 is complete, so while iteration 3 is generated."""
    run = three_faults
    assert [r["engine_restarts"] for r in run.rows] == [1, 0, 1]  # 1: the engine lost in the sync (below)
    assert_rollout_actor_came_back(run.out, run.rows, run.log, generating=3)
    assert run.log.count("rollout engine 0 restarted: current weights loaded, probe check passed") == 2, run.log[-3000:]


def test_a_killed_rollout_actor_comes_back_and_nothing_is_lost_one_step_off(tmp_path):
    """`one_step_off`: killed once iteration 1 is complete, while iteration 3 is being generated (on the weights of
    1) as iteration 2 trains."""
    out = tmp_path / "run"
    driver = start(out, "schedule.rollout=one_step_off")
    kill_when_iteration_completes(driver, out, 1, "ray::RolloutWorker")
    log, rows = finished(driver, out)
    assert [r["engine_restarts"] for r in rows] == [0, 0, 1]
    assert_rollout_actor_came_back(out, rows, log, generating=3)


def test_an_engine_lost_inside_the_weight_sync_is_restarted_without_the_learners(three_faults):
    """The engine's process ends inside its first `update_weights` (iteration 1's sync): the sync restarts it, loads
    the learner's weights into it and probe-checks it; the learners and the iteration go on as if nothing happened."""
    run = three_faults
    assert run.engine_exited.is_file()  # the engine did end inside update_weights
    assert run.rows[0]["learner_restarts"] == 0 and run.rows[0]["engine_restarts"] == 1
    assert run.rows[0]["restart_probe_abs_diff"] <= 1e-4 and all(r["probe_abs_diff"] <= 1e-4 for r in run.rows)
    assert run.log.count(": iteration 1/3 [") == 1, run.log[-3000:]
    assert run.log.count("rollout engine 0 lost during the weight sync (Actor") == 1, run.log[-3000:]  # -Unavailable or -Died


def test_a_killed_learner_worker_restarts_the_group_from_the_last_iteration(three_faults):
    """Killed once iteration 1 is complete: iteration 2 trains again on a new group, and no engine restarts for it."""
    run = three_faults
    assert [r["learner_restarts"] for r in run.rows] == [0, 1, 1]
    assert run.rows[1]["engine_restarts"] == 0
    assert "learner group restarted after a failure (restart 1): continuing from iteration 1" in run.log
    assert all(r["probe_abs_diff"] <= 1e-4 for r in run.rows)


@pytest.mark.parametrize("schedule", ["sync", "one_step_off"])  # one_step_off: iteration 2 is generating meanwhile
def test_a_nan_loss_stops_the_run_before_anything_is_saved(tmp_path, schedule):
    out = tmp_path / "run"
    # lr 1e30: the first step is finite, its update is not, so the second step's loss is NaN.
    driver = start(out, "optim.lr=1e30", f"schedule.rollout={schedule}")
    log, _ = driver.communicate(timeout=500)
    assert driver.returncode != 0
    assert "iteration 1, optimiser step 2: the loss is nan" in log, log[-3000:]
    assert log.strip().splitlines()[-1].startswith("error: ") and "\r" not in log and "\x1b[" not in log, log
    assert f"log: {out / 'job.log'}" in log and "(RayTrainWorker pid=" in (out / "job.log").read_text()
    assert not (out / "iteration-1" / "COMPLETE").exists() and not (out / "iteration-1" / "hf").exists()
    assert not (out / "deepspeed").exists()
    assert all(json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()) \
        if (out / "metrics.jsonl").exists() else True
