"""Experiment tracking end to end on CPU: a tiny run with TensorBoard, MLflow (a real `mlflow server` on 127.0.0.1)
and W&B (offline run files) on, resumed, evaluated, read back through each tracker's own reader; then the MLflow
server killed mid-run, and no key in any file.

One Ray session and one MLflow server for the module; the tracked run (3 iterations, then --resume to 4) is shared.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from sami.run_dir import RunDir

slow = pytest.mark.slow  # the tests with a Ray session; the others take well under a second

MARKERS = {"WANDB_API_KEY": "wandb-key-marker-5f1c0e", "MLFLOW_TRACKING_TOKEN": "mlflow-token-marker-9a7d42"}
EXPERIMENT = "tracking-test"


@pytest.fixture(scope="module")
def ray_session():
    import ray

    from actors.ray_session import LOCAL_ENV

    # The keys the trackers read from the environment, as a user sets them: markers the last test searches for
    env = {**LOCAL_ENV, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **MARKERS}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    ray.init(num_cpus=8, include_dashboard=False, runtime_env={"env_vars": env}, log_to_driver=False)
    yield
    ray.shutdown()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 (its own process group, ended by its id): (URI, its pid, its folder)."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job workers: 8 processes fewer
    server = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1",
                               "--port", str(port), "--workers", "1",
                               "--backend-store-uri", f"sqlite:///{folder}/mlflow.db",
                               "--artifacts-destination", str(folder / "artifacts")],
                              stdout=open(folder / "server.log", "w"), stderr=subprocess.STDOUT, env=env,
                              start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2)
            break
        except OSError:
            assert server.poll() is None and time.time() < deadline, (folder / "server.log").read_text()[-2000:]
            time.sleep(0.5)
    yield uri, server.pid, folder
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def tiny(out, *overrides):
    from sami.config import load_config

    return load_config("configs/tiny.yaml", [f"run.output_dir={out}", "schedule.steps_per_iteration=2",
                                             "data.queries_per_iteration=16", *overrides])


def tracked(uri: str) -> list[str]:
    return ["tracking.trackers=[tensorboard,mlflow,wandb]", f"tracking.mlflow.tracking_uri={uri}",
            "tracking.wandb.mode=offline", f"tracking.experiment={EXPERIMENT}", "tracking.tags={purpose: test}"]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def numbers(row: dict) -> dict:
    """The figures a tracker gets of a metrics.jsonl row."""
    return {k: float(v) for k, v in row.items() if k not in ("iteration", "loss_per_step")
            and isinstance(v, (int, float))}


@pytest.fixture(scope="module")
def tracked_run(ray_session, mlflow_server, tmp_path_factory):
    """3 iterations, then --resume to 4, every tracker on: the run folder."""
    from pipelines.train import run

    uri = mlflow_server[0]
    out = run(tiny(tmp_path_factory.mktemp("tracked") / "run", "run.iterations=3", *tracked(uri)))
    run(tiny(out, "run.iterations=4", *tracked(uri)), resume=True)
    return out


def expected_steps(rows: list[dict]) -> list[tuple[int, float]]:
    losses = [loss for row in rows for loss in row["loss_per_step"]]
    return list(enumerate(losses, start=1))


@slow
@pytest.mark.timeout(900)
def test_tensorboard_event_files_hold_the_config_every_step_and_every_iteration(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows = metrics(tracked_run)
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4]
    events = EventAccumulator(str(RunDir(tracked_run).tensorboard), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()  # both event files: the first run's and the resume's
    steps = [(e.step, e.value) for e in events.Scalars("step/loss")]
    assert [s for s, _ in steps] == [s for s, _ in expected_steps(rows)] == list(range(1, 9))  # 4 x 2, none twice
    assert [v for _, v in steps] == pytest.approx([v for _, v in expected_steps(rows)], rel=1e-6)  # float32 there
    for row in rows:
        for key, value in numbers(row).items():
            (logged,) = [e.value for e in events.Scalars(f"iteration/{key}") if e.step == row["iteration"]]
            assert logged == pytest.approx(value, rel=1e-6, abs=1e-6), (row["iteration"], key)
    (config,) = events.Tensors("config/text_summary")  # logged once, not again on the resume
    assert f"output_dir: {tracked_run}" in config.tensor_proto.string_val[0].decode()


@slow
@pytest.mark.timeout(900)
def test_mlflow_server_holds_the_config_every_step_and_every_iteration(tracked_run, mlflow_server):
    from mlflow import MlflowClient

    rows = metrics(tracked_run)
    state = json.loads(RunDir(tracked_run).tracking_state.read_text())
    client = MlflowClient(mlflow_server[0])
    (run,) = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id],
                                "tags.`sami.job` = 'training'")
    assert run.info.run_id == state["mlflow"]["run_id"] and run.info.run_name == "tiny"  # the resume continued it
    assert run.info.status == "FINISHED" and run.data.tags["purpose"] == "test"
    params = run.data.params
    assert params["optim.lr"] == "0.0003" and params["tracking.mlflow.tracking_uri"] == mlflow_server[0]
    assert len(params["git_commit"]) == 40 and params["version.torch"].startswith("2.")
    history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "step/loss"))
    assert history == expected_steps(rows)  # doubles: equal exactly; steps 1..8, none twice
    for row in rows:
        for key, value in numbers(row).items():
            logged = [m.value for m in client.get_metric_history(run.info.run_id, f"iteration/{key}")
                      if m.step == row["iteration"]]
            assert logged == [pytest.approx(value)], (row["iteration"], key)


def wandb_records(run_dir: Path) -> tuple[list[str], list[dict]]:
    """The W&B offline run folders (in the order they were written) and every record of their transaction logs,
    read by W&B's own reader (`wandb leet inspect --json`)."""
    folders = sorted((run_dir / "wandb").glob("offline-run-*"))
    records = []
    for folder in folders:
        (log,) = folder.glob("*.wandb")
        shown = subprocess.run([str(Path(sys.executable).parent / "wandb"), "leet", "inspect", "--json", str(log)],
                               capture_output=True, text=True, timeout=120, check=True)
        records += [json.loads(line) for line in shown.stdout.splitlines() if line.startswith("{")]
    return [f.name for f in folders], records


@slow
@pytest.mark.timeout(900)
def test_wandb_offline_files_hold_the_config_every_step_and_every_iteration(tracked_run):
    rows = metrics(tracked_run)
    state = json.loads(RunDir(tracked_run).tracking_state.read_text())
    folders, records = wandb_records(tracked_run)
    assert len(folders) == 2 and all(f.endswith(f"-{state['wandb']['run_id']}") for f in folders)  # one run, resumed
    history = [r["history"]["item"] for r in records if r["type"] == "history"]
    steps = [(h["global_step"], h["step/loss"]) for h in history if "global_step" in h]
    assert [s for s, _ in steps] == list(range(1, 9))
    assert [v for _, v in steps] == pytest.approx([v for _, v in expected_steps(rows)], rel=1e-12)
    iterations = {h["iteration"]: h for h in history if "iteration" in h}
    assert sorted(iterations) == [1, 2, 3, 4]
    for row in rows:
        assert {k: iterations[row["iteration"]][f"iteration/{k}"] for k in numbers(row)} == \
               pytest.approx(numbers(row)), row["iteration"]
    config = {k: v for r in records if r["type"] == "config" for k, v in r["config"]["update"].items()}
    assert config["optim.lr"] == 0.0003 and config["run.output_dir"] == str(tracked_run)


@slow
@pytest.mark.timeout(900)
def test_the_evaluation_lands_in_the_same_experiment_linked_to_the_training_run(tracked_run, mlflow_server):
    from mlflow import MlflowClient

    from evals.run import main

    assert main(["--run", str(tracked_run), "num_queries=4"]) == 0
    results = json.loads((RunDir(tracked_run).evaluation / "results.json").read_text())
    client = MlflowClient(mlflow_server[0])
    trained = json.loads(RunDir(tracked_run).tracking_state.read_text())["mlflow"]["run_id"]
    (run,) = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id],
                                f"tags.`mlflow.parentRunId` = '{trained}'")
    assert run.info.run_name == "eval-tiny" and run.data.tags["sami.training_run"] == str(tracked_run)
    win = results["models"]["iteration-4"]["win_rate_vs_baseline"]["balanced"]
    figures = run.data.metrics
    assert figures["eval/iteration-4/win_rate_vs_baseline/balanced/win_rate"] == win["win_rate"]
    assert figures["eval/iteration-4/win_rate_vs_baseline/balanced/ci/0"] == win["ci"][0]
    assert figures["eval/iteration-4/mi_lower_bound"] == results["models"]["iteration-4"]["mi_lower_bound"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.md", "results.json"} <= artifacts
    report = Path(client.download_artifacts(run.info.run_id, "report.md", str(tracked_run.parent)))
    assert report.read_text() == (RunDir(tracked_run).evaluation / "report.md").read_text()


def test_dry_run_names_the_field_and_the_extra(tmp_path, capsys, monkeypatch):
    import importlib.util

    from pipelines.train import main

    base = ["--dry-run", "--config", "configs/tiny.yaml", f"run.output_dir={tmp_path}"]
    assert main(base + ["tracking.trackers=[mlflow]", "tracking.mlflow.tracking_uri=http://127.0.0.1:port"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: tracking.mlflow.tracking_uri: cannot be parsed") and "\n" not in err, err
    # W&B is installed here; a machine without it is what find_spec answering None stands in for
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    assert main(base + ["tracking.trackers=[tensorboard,wandb]"]) == 2
    assert capsys.readouterr().err.strip() == ("error: tracking.trackers: wandb is not installed here: "
                                               "pip install 'sami-on-ray[wandb]'")


def test_a_tracker_that_cannot_start_is_one_warning_and_a_resume_logs_only_what_is_missing(tmp_path):
    """No Ray: Trackers as learner rank 0 drives it, with TensorBoard and an MLflow URI that cannot be parsed."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from sami.config import load_config
    from sami.tracking import Trackers

    cfg = load_config(None, [f"run.output_dir={tmp_path}", "tracking.trackers=[mlflow,tensorboard]",
                             "tracking.mlflow.tracking_uri=http://127.0.0.1:port"])
    rows = [{"iteration": 1, "loss_per_step": [0.5, 0.4], "loss": 0.45, "objective": "sami", "kl": None},
            {"iteration": 2, "loss_per_step": [0.3, 0.2], "loss": 0.25, "objective": "sami", "kl": 0.01}]
    lines = []
    first = Trackers.start(cfg.tracking, tmp_path, "r", cfg, lines.append, rows[:1])
    first.close(completed=False)  # the run stopped after iteration 1
    assert lines == ["warning: tracking: mlflow: could not start (ValueError: tracking.mlflow.tracking_uri cannot "
                     "be parsed (Port could not be cast to integer value as 'port')); the run goes on without it "
                     "(metrics.jsonl has every figure)"]
    resumed = Trackers.start(cfg.tracking, tmp_path, "r", cfg, lines.append, rows)  # logs iteration 2 only
    resumed.close(completed=True)
    assert json.loads(RunDir(tmp_path).tracking_state.read_text()) == {
        "tensorboard": {"log_dir": str(RunDir(tmp_path).tensorboard), "logged_through": 2}}
    events = EventAccumulator(str(RunDir(tmp_path).tensorboard))
    events.Reload()
    losses = events.Scalars("step/loss")
    assert [e.step for e in losses] == [1, 2, 3, 4]  # iteration 2 at steps 3 and 4; iteration 1 not again
    assert [e.value for e in losses] == pytest.approx([0.5, 0.4, 0.3, 0.2])
    assert [(e.step, round(e.value, 6)) for e in events.Scalars("iteration/kl")] == [(2, 0.01)]  # none for 1's null
    assert len(events.Tensors("config/text_summary")) == 1


def test_a_tracking_uri_with_a_password_is_refused():
    from sami.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"tracking.mlflow.tracking_uri: holds credentials; give them in "
                                          r"MLFLOW_TRACKING_USERNAME"):
        load_config(None, ["tracking.mlflow.tracking_uri=https://me:hunter2@mlflow.example.com"])


@slow
@pytest.mark.timeout(900)
def test_the_mlflow_server_killed_mid_run_costs_one_warning_and_no_key_is_written(
        tracked_run, mlflow_server, tmp_path, capsys):
    """Last in the module: it kills the module's server. The run goes on (exit 0) with one warning line, every
    iteration in metrics.jsonl and the other trackers; then no file of either run folder (job.log included), nor
    the server's store, holds a key."""
    from pipelines.train import main

    uri, pid, server_folder = mlflow_server
    out = tmp_path / "server-killed"

    def kill_in_iteration_two():  # iteration 1 is logged before iteration 2 starts (its folder appears)
        while not RunDir(out).iteration(2).exists():
            time.sleep(0.05)
        os.killpg(pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_in_iteration_two, daemon=True)
    killer.start()
    code = main(["--config", "configs/tiny.yaml", f"run.output_dir={out}", "run.iterations=2",
                 "schedule.steps_per_iteration=2", "data.queries_per_iteration=16", *tracked(uri)])
    shown = capsys.readouterr()
    killer.join(timeout=1)
    # the console's lines; not Ray's echo of the worker's output, which a run outside pytest sends to job.log
    warnings = [line for line in (shown.out + shown.err).splitlines()
                if "warning: tracking" in line and "RayTrainWorker pid=" not in line]
    assert code == 0 and not killer.is_alive()
    assert len(warnings) == 1 and "mlflow: failed logging iteration 2" in warnings[0], warnings
    assert [r["iteration"] for r in metrics(out)] == [1, 2]
    state = json.loads(RunDir(out).tracking_state.read_text())
    assert state["mlflow"]["logged_through"] == 1 and state["tensorboard"]["logged_through"] == 2
    assert state["wandb"]["logged_through"] == 2
    files = [p for folder in (out, tracked_run, server_folder) for p in folder.rglob("*") if p.is_file()]
    assert RunDir(out).job_log in files and any(p.suffix == ".wandb" for p in files)
    leaks = [str(p) for p in files for marker in MARKERS.values() if marker.encode() in p.read_bytes()]
    assert not leaks, leaks
