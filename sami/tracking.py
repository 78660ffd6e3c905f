"""Experiment trackers: every run's figures in TensorBoard, MLflow and Weights & Biases, beside metrics.jsonl.

Learner rank 0 (Ray's advice for Ray Train: the tracker on rank 0 of the train function) and the evaluation job's
driver log through a `Trackers`, built from the config's `tracking` section:

    trackers = Trackers.start(cfg.tracking, run_dir.path, cfg.run.name, cfg, log, history=rows_so_far)
    trackers.log_rows(history)        # after each iteration: the rows no tracker has yet
    trackers.close(completed=True)

What each gets: the resolved config once (params / hparams), with the git commit and package versions; every
optimiser step's loss as `step/loss` at a global step (1, 2, ... over the whole run), and every iteration's
metrics.jsonl figures as `iteration/<field>` at its iteration. The global step is counted from metrics.jsonl's
rows, so it only grows across iterations, resumes, learner restarts and `one_step_off`; rows are logged only once
complete (after their metrics row), and `tracking.json` in the run folder keeps each tracker's run id and the last
iteration it logged, so a resume continues the same tracker run, logs nothing twice and catches up what a tracker
missed. W&B gets its own x-axes (`define_metric`) and never an explicit `step`, so no step is ever out of order.

A tracker that fails (not installed, a server down or gone, a bad URI, a full disk) costs the run nothing: one
warning line naming the tracker and why, and it is left out for the rest of the job; metrics.jsonl stays the record.
Keys come from the environment the trackers read themselves (WANDB_API_KEY, MLFLOW_TRACKING_TOKEN, ...).
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import math
import os
import subprocess
import time
import uuid
from pathlib import Path
from typing import Callable, Iterable, Optional
from urllib.parse import urlparse

import yaml

from sami.config import ConfigError, TrackingConfig
from sami.run_dir import RunDir

INSTALL = {"tensorboard": "pip install 'sami-on-ray[tensorboard]'", "mlflow": "pip install 'sami-on-ray[mlflow]'",
           "wandb": "pip install 'sami-on-ray[wandb]'"}
MLFLOW_SCHEMES = ("sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks", "databricks-uc", "file")
VERSIONS_OF = ("sami-on-ray", "torch", "ray", "transformers", "deepspeed", "peft", "vllm")
# A server that is down costs seconds, not the minutes of MLflow's default retries (7, backoff factor 2)
MLFLOW_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                        "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
NOT_METRICS = ("iteration", "loss_per_step")  # the step axis, and the per-step losses logged step by step


# ---------------------------------------------------------------------------------------------------------
# Settings


def uri_problem(uri: str) -> Optional[str]:
    """What is wrong with an MLflow tracking URI, or None."""
    try:
        parsed = urlparse(uri)
        parsed.port  # raises on a port that is not a number
    except ValueError as e:
        return f"cannot be parsed ({e})"
    scheme = parsed.scheme.split("+")[0]
    if scheme not in MLFLOW_SCHEMES:
        return (f"scheme {parsed.scheme!r} is not one MLflow stores runs at (a server http://HOST:PORT, or "
                f"sqlite:///PATH/mlflow.db)")
    if scheme in ("http", "https") and not parsed.hostname:
        return "names no host (e.g. http://127.0.0.1:5000)"
    return None


def check_tracking(tracking: TrackingConfig) -> None:
    """--dry-run's check: every tracker named is installed and the MLflow URI can be used. Raises ConfigError."""
    for name in tracking.trackers:
        if importlib.util.find_spec(name) is None:
            raise ConfigError(f"tracking.trackers: {name} is not installed here: {INSTALL[name]}")
    uri = tracking.mlflow.tracking_uri
    if "mlflow" in tracking.trackers and uri and uri_problem(uri):
        raise ConfigError(f"tracking.mlflow.tracking_uri: {uri_problem(uri)} (got {uri!r})")


def mlflow_uri(tracking: TrackingConfig, folder: Path) -> str:
    """The MLflow store a job in `folder` logs to: the configured one, else a SQLite file under the folder."""
    return tracking.mlflow.tracking_uri or f"sqlite:///{RunDir(folder).mlflow_store}"


def flat(data: dict, prefix: str = "") -> dict:
    """{"optim": {"lr": 1e-4}} -> {"optim.lr": 1e-4}."""
    out = {}
    for key, value in data.items():
        out.update(flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def provenance() -> dict:
    """The git commit of the code and the versions of the packages that ran it."""
    try:
        found = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                               text=True, timeout=10)
        commit = found.stdout.strip() if found.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    versions = {}
    for package in VERSIONS_OF:
        try:
            versions[f"version.{package}"] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return {"git_commit": commit, **versions}


def figures(row: dict) -> dict[str, float]:
    """A metrics.jsonl row's figures: its finite numbers (the iteration and the per-step losses left out)."""
    return {k: float(v) for k, v in row.items() if k not in NOT_METRICS and isinstance(v, (int, float))
            and math.isfinite(v)}


def numeric_leaves(data, prefix: str = "") -> dict[str, float]:
    """Every finite number of a nested result, keyed by its path ("m/win_rate/ci/0"); lists longer than two (the
    per-item figures) are left out."""
    if isinstance(data, bool) or data is None:
        return {}
    if isinstance(data, (int, float)):
        return {prefix.rstrip("/"): float(data)} if math.isfinite(data) else {}
    if isinstance(data, dict):
        return {k: v for key, value in data.items() for k, v in numeric_leaves(value, f"{prefix}{key}/").items()}
    if isinstance(data, list) and len(data) <= 2:
        return {k: v for i, value in enumerate(data) for k, v in numeric_leaves(value, f"{prefix}{i}/").items()}
    return {}


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:300]}" if text else type(error).__name__


# ---------------------------------------------------------------------------------------------------------
# The trackers


class Tracker:
    """One tracker's run. `state` is what tracking.json keeps of it (its run id, `logged_through`)."""

    name = ""

    def __init__(self, tracking: TrackingConfig, folder: Path, run_name: str, state: dict):
        self.tracking, self.folder, self.run_name, self.state = tracking, Path(folder), run_name, state

    @property
    def new(self) -> bool:
        """Whether this tracker run starts now (not a resume of one): the config is logged then only."""
        return "logged_through" not in self.state

    def log_config(self, params: dict, text: str) -> None: ...

    def log_steps(self, steps: list[tuple[int, float]]) -> None: ...

    def log_iteration(self, iteration: int, values: dict[str, float]) -> None: ...

    def log_results(self, values: dict[str, float], artifacts: list[Path]) -> None: ...

    def close(self, completed: bool) -> None: ...

    def abandon(self) -> None:
        """Let go of what the tracker holds after it failed (no more writes are tried)."""


class TensorBoardTracker(Tracker):
    name = "tensorboard"

    def __init__(self, *args):
        super().__init__(*args)
        from torch.utils.tensorboard import SummaryWriter

        log_dir = self.tracking.tensorboard.log_dir or RunDir(self.folder).tensorboard
        self.writer = SummaryWriter(log_dir=str(log_dir))  # a resume adds an event file to the same folder
        self.state["log_dir"] = str(log_dir)

    def log_config(self, params: dict, text: str) -> None:
        from torch.utils.tensorboard.summary import hparams

        values = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in params.items()}
        for summary in hparams(values, {}):
            self.writer.file_writer.add_summary(summary)
        self.writer.add_text("config", f"```yaml\n{text}```")
        self.writer.flush()

    def log_steps(self, steps: list[tuple[int, float]]) -> None:
        for step, loss in steps:
            self.writer.add_scalar("step/loss", loss, step)

    def log_iteration(self, iteration: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(f"iteration/{key}", value, iteration)
        self.writer.flush()

    def log_results(self, values: dict[str, float], artifacts: list[Path]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, 0)
        for path in artifacts:
            if path.suffix == ".md":
                self.writer.add_text(path.name, path.read_text())
        self.writer.flush()

    def close(self, completed: bool) -> None:
        self.writer.close()

    def abandon(self) -> None:
        self.writer.close()


class MLflowTracker(Tracker):
    name = "mlflow"

    def __init__(self, *args):
        super().__init__(*args)
        for key, value in MLFLOW_HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)
        from mlflow import MlflowClient

        uri = mlflow_uri(self.tracking, self.folder)
        problem = uri_problem(uri)
        if problem:
            raise ValueError(f"tracking.mlflow.tracking_uri {problem}")
        self.client = MlflowClient(tracking_uri=uri)
        if self.state.get("run_id"):
            self.run_id = self.state["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            return
        experiment = self.client.get_experiment_by_name(self.tracking.experiment)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:  # a SQLite store keeps its artifacts beside it, not in the working directory
            location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri() \
                if uri.startswith("sqlite:///") else None
            experiment_id = self.client.create_experiment(self.tracking.experiment, artifact_location=location)
        tags = {"sami.job": "training", **self.state.pop("tags", {}), **self.tracking.tags}  # an evaluation's: links
        self.run_id = self.client.create_run(experiment_id, run_name=self.run_name, tags=tags).info.run_id
        self.state.update(run_id=self.run_id, tracking_uri=uri)

    def log_config(self, params: dict, text: str) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow takes 100 params per batch
            self.client.log_batch(self.run_id, params=items[start:start + 100])
        self.client.log_text(self.run_id, text, "config.yaml")

    def _metrics(self, metrics: list) -> None:
        for start in range(0, len(metrics), 1000):  # and 1000 metrics
            self.client.log_batch(self.run_id, metrics=metrics[start:start + 1000])

    def log_steps(self, steps: list[tuple[int, float]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._metrics([Metric("step/loss", loss, now, step) for step, loss in steps])

    def log_iteration(self, iteration: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._metrics([Metric(f"iteration/{k}", v, now, iteration) for k, v in values.items()])

    def log_results(self, values: dict[str, float], artifacts: list[Path]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._metrics([Metric(k, v, now, 0) for k, v in values.items()])
        for path in artifacts:
            self.client.log_artifact(self.run_id, str(path))

    def close(self, completed: bool) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if completed else "KILLED")


class WandbTracker(Tracker):
    name = "wandb"

    def __init__(self, *args):
        super().__init__(*args)
        import wandb

        w = self.tracking.wandb
        self.state.setdefault("run_id", uuid.uuid4().hex[:12])
        link = self.state.pop("link", {})
        # console off: the run's output stays in the job's log; the run id from tracking.json continues the W&B run
        self.run = wandb.init(id=self.state["run_id"], resume="allow", reinit="create_new", dir=str(RunDir(self.folder).wandb),
                              project=w.project or self.tracking.experiment, entity=w.entity, mode=w.mode,
                              name=self.run_name, group=self.state.setdefault("group", link.get("group") or self.run_name),
                              job_type=link.get("job_type", "train"),
                              tags=[f"{k}:{v}" if v else k for k, v in self.tracking.tags.items()] or None,
                              settings=wandb.Settings(console="off", silent=True))
        if link.get("config"):
            self.run.config.update(link["config"], allow_val_change=True)
        self.run.define_metric("global_step")
        self.run.define_metric("step/*", step_metric="global_step")
        self.run.define_metric("iteration")
        self.run.define_metric("iteration/*", step_metric="iteration")

    def log_config(self, params: dict, text: str) -> None:
        self.run.config.update(params, allow_val_change=True)

    def log_steps(self, steps: list[tuple[int, float]]) -> None:
        for step, loss in steps:  # no explicit step: W&B's own counts up, never out of order
            self.run.log({"global_step": step, "step/loss": loss})

    def log_iteration(self, iteration: int, values: dict[str, float]) -> None:
        self.run.log({"iteration": iteration, **{f"iteration/{k}": v for k, v in values.items()}})

    def log_results(self, values: dict[str, float], artifacts: list[Path]) -> None:
        import wandb

        self.run.log(values)
        artifact = wandb.Artifact(f"{self.run_name}-report", type="evaluation")
        for path in artifacts:
            artifact.add_file(str(path))
        self.run.log_artifact(artifact)

    def close(self, completed: bool) -> None:
        self.run.finish(exit_code=0 if completed else 1)

    def abandon(self) -> None:
        self.run.finish(exit_code=1)


TRACKERS = {t.name: t for t in (TensorBoardTracker, MLflowTracker, WandbTracker)}


# ---------------------------------------------------------------------------------------------------------
# All of them


class Trackers:
    """The trackers `tracking.trackers` names, each of which may fail alone (a warning, then it is left out)."""

    def __init__(self, folder: Path, log: Callable[[str], None], live: list[Tracker], state: dict):
        self.folder, self.log, self.live, self.state = Path(folder), log, live, state

    @classmethod
    def start(cls, tracking: TrackingConfig, folder: Path, run_name: str, config, log: Callable[[str], None],
              history: Iterable[dict] = (), links: Optional[dict] = None, continue_runs: bool = True) -> "Trackers":
        """Each tracker's run, new or continued from tracking.json; the config logged on a new one; then the rows of
        `history` a tracker has not logged yet (a resume, a restart, a tracker that failed before). `links`: per
        tracker, what ties the run to another (the evaluation's to the training run it evaluated); `continue_runs`
        False: new tracker runs whatever tracking.json holds (each evaluation is a run of its own)."""
        if not tracking.trackers:  # nothing is written, nor git asked
            return cls(folder, log, [], {})
        saved = read_state(RunDir(folder).tracking_state, log) if continue_runs else {}
        trackers = cls(folder, log, [], saved)
        name = tracking.run_name or run_name
        text = yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
        params = {**flat(config.model_dump(mode="json")), **provenance()}
        for tracker_name in tracking.trackers:
            state = {**saved.get(tracker_name, {}), **(links or {}).get(tracker_name, {})}
            try:
                tracker = TRACKERS[tracker_name](tracking, folder, name, state)
            except ImportError as e:
                trackers.warn(tracker_name, f"not installed ({e.name or e}); {INSTALL[tracker_name]}")
                continue
            except Exception as e:
                trackers.warn(tracker_name, f"could not start ({one_line(e)})")
                continue
            trackers.live.append(tracker)
            if tracker.new and trackers.call(tracker, "logging the config", lambda t: t.log_config(params, text)):
                state["logged_through"] = 0
            saved[tracker_name] = state
        trackers.save()
        trackers.log_rows(list(history))
        return trackers

    def warn(self, name: str, why: str) -> None:
        self.log(f"warning: tracking: {name}: {why}; the run goes on without it (metrics.jsonl has every figure)")

    def call(self, tracker: Tracker, what: str, action: Callable[[Tracker], None]) -> bool:
        """`action(tracker)`; on a failure, one warning and the tracker is left out. Whether it succeeded."""
        try:
            action(tracker)
            return True
        except Exception as e:
            self.live.remove(tracker)
            self.warn(tracker.name, f"failed {what} ({one_line(e)})")
            try:
                tracker.abandon()
            except Exception:  # it failed already; the warning says so
                pass
            return False

    def save(self) -> None:
        """tracking.json, replaced whole (what a resume continues from)."""
        path = RunDir(self.folder).tracking_state
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.with_suffix(".json.partial").write_text(json.dumps(self.state, indent=1) + "\n")
            os.replace(path.with_suffix(".json.partial"), path)
        except OSError as e:
            self.log(f"warning: tracking: could not save {path} ({one_line(e)}); a resume may log an iteration twice")

    def log_rows(self, history: list[dict]) -> None:
        """Every complete iteration of `history` (metrics.jsonl's rows, in order) that a tracker has not logged:
        its per-step losses at their global steps, then its figures at its iteration."""
        if not self.live:
            return
        offsets, step = [], 0
        for row in history:
            offsets.append(step)
            step += len(row.get("loss_per_step") or [])
        for tracker in list(self.live):
            for row, offset in zip(history, offsets):
                if row["iteration"] <= tracker.state.get("logged_through", 0):
                    continue
                steps = [(offset + i + 1, loss) for i, loss in enumerate(row.get("loss_per_step") or [])
                         if loss is not None]
                if not self.call(tracker, f"logging iteration {row['iteration']}",
                                 lambda t: (t.log_steps(steps), t.log_iteration(row["iteration"], figures(row)))):
                    break
                tracker.state["logged_through"] = row["iteration"]
        self.save()

    def log_results(self, results: dict, artifacts: list[Path]) -> None:
        """The evaluation's figures (every number of `results`, by path) and its report files."""
        values = {f"eval/{k}": v for k, v in numeric_leaves(results).items()}
        for tracker in list(self.live):
            self.call(tracker, "logging the evaluation", lambda t: t.log_results(values, artifacts))

    def close(self, completed: bool) -> None:
        for tracker in list(self.live):
            self.call(tracker, "closing its run", lambda t: t.close(completed))
        self.live.clear()


def read_state(path: Path, log: Callable[[str], None]) -> dict:
    """tracking.json's contents; none (new tracker runs, with a warning) where it cannot be read."""
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        log(f"warning: tracking: {path} cannot be read ({one_line(e)}); the trackers start new runs")
        return {}


def evaluation_links(tracking: TrackingConfig) -> dict:
    """What ties an evaluation's tracker runs to the training run it evaluated (`tracking.training_run`, whose
    tracking.json names that run's ids): MLflow's parent run, W&B's group and the training run's id."""
    if not tracking.training_run:
        return {"mlflow": {"tags": {"sami.job": "evaluation"}}, "wandb": {"link": {"job_type": "eval"}}}
    trained = read_state(RunDir(tracking.training_run).tracking_state, lambda line: None)  # unlinked if unreadable
    mlflow_run, wandb_run = trained.get("mlflow", {}).get("run_id"), trained.get("wandb", {}).get("run_id")
    tags = {"sami.job": "evaluation", "sami.training_run": str(tracking.training_run)}
    if mlflow_run:
        tags.update({"mlflow.parentRunId": mlflow_run, "sami.training_run_id": mlflow_run})
    group = trained.get("wandb", {}).get("group")
    return {"mlflow": {"tags": tags},
            "wandb": {"link": {"job_type": "eval", "group": group,
                               "config": {"training_run_id": wandb_run, "training_run": str(tracking.training_run)}}}}
