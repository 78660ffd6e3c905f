"""The jobs on a local autoscaling cluster (tests/autoscaling_cluster.py: ray_cluster.yaml's node types, logical
GPUs): `ray job submit` starts exactly the worker nodes a job needs, learners land on `learner` nodes and engines
on `rollout` nodes (read from the nodes' labels), and the cluster goes back to 0 workers when the jobs are done."""
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pyarrow.parquet
import pytest

from autoscaling_cluster import AutoscalingCluster
from sami.run_dir import RunDir
from test_job_submit import REPO, SHORT, TINY, VENV_BIN

pytestmark = [pytest.mark.slow]
# configs/tiny.yaml with a logical GPU per learner and per engine: 1 learner node (2 GPUs) and 1 rollout node.
# (gloo: the logical GPUs are no CUDA devices.)
ON_GPUS = ["scaling.gpus_per_learner=1", "rollout.gpus_per_engine=1", "scaling.torch_backend=gloo"]
# Three short iterations (a rollout node lost in iteration 2, a learner node in iteration 3): 32 queries, 2 steps.
SMALL = ["run.iterations=3", *SHORT, "sampling.batch_size=8"]
TINY = str(TINY)
ENGINE_CLASSES = {"RolloutWorker", "ModelWorker"}  # training's and the evaluation's engines


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = AutoscalingCluster(tmp_path_factory.mktemp("ray-autoscaling"))
    try:
        cluster.wait_ready()
        yield cluster
    finally:
        cluster.stop()


class Job:
    """A `ray job submit --no-wait` of a `python -m` entry point, followed to its end over the dashboard while
    the worker nodes alive are recorded (node id -> role label). No `--working-dir`: every fake node shares one
    session folder, where a node's runtime-env agent unpacks the package again under the processes of the other
    nodes running in it (a job's TrainController died in MKL for its lost working directory); the code reaches
    every node through the cluster's PYTHONPATH instead (test_job_submit.py tests the upload)."""

    def __init__(self, cluster: AutoscalingCluster, module: str, *args: str, env_vars: dict | None = None):
        self.cluster, self.id = cluster, f"sami-{module.split('.')[0]}-{secrets.token_hex(4)}"
        self.workers_seen: dict[str, str] = {}
        submit = subprocess.run(
            [str(VENV_BIN / "ray"), "job", "submit", "--address", cluster.address, "--runtime-env-json",
             json.dumps({"env_vars": env_vars or {}}), "--submission-id", self.id, "--no-wait", "--", "python", "-m",
             module, *args],
            env=cluster.env, capture_output=True, text=True, timeout=120)
        assert submit.returncode == 0, submit.stdout + submit.stderr

    def status(self) -> str:
        self.workers_seen.update({n["node_id"]: n["labels"].get("role") for n in self.cluster.alive_workers()})
        return self.cluster.get(f"/api/jobs/{self.id}")["status"]

    def logs(self) -> str:
        return self.cluster.get(f"/api/jobs/{self.id}/logs")["logs"]

    def wait(self, timeout_s: float, until=lambda: False) -> str:
        """The job's final status, or None once `until()` holds first."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status = self.status()
            if status in ("SUCCEEDED", "FAILED", "STOPPED"):
                return status
            if until():
                return None
            time.sleep(1.0)
        raise TimeoutError(f"job {self.id} still {status} after {timeout_s}s:\n{self.logs()[-3000:]}")

    def actors(self) -> list[dict]:
        """This job's actors (alive or dead) with the role label of the node each ran on."""
        job_id = next(j["job_id"] for j in self.cluster.get("/api/jobs/") if j["submission_id"] == self.id)
        roles = {n["node_id"]: n["labels"].get("role") for n in self.cluster.nodes()}
        actors = self.cluster.get(f"/api/v0/actors?limit=10000&detail=true&filter_keys=job_id&filter_predicates=%3D"
                                  f"&filter_values={job_id}")["data"]["result"]["result"]
        return [{**a, "role": roles.get(a["node_id"])} for a in actors]


@pytest.fixture(scope="module")
def training_run(cluster, tmp_path_factory):
    """configs/tiny.yaml submitted to the cluster at 0 workers, every file its processes open recorded by node
    (tests/file_audit): (the job, its run folder, the audit folder, seconds since the submission)."""
    assert cluster.alive_workers() == []
    started, root = time.monotonic(), tmp_path_factory.mktemp("training-run")
    run_dir, audit = root / "run", root / "opened"
    audit.mkdir()
    train = Job(cluster, "pipelines.train", "--config", TINY, f"run.output_dir={run_dir}", *ON_GPUS, *SHORT,
                env_vars={"PYTHONPATH": f"{REPO / 'tests' / 'file_audit'}:{REPO}", "SAMI_FILE_AUDIT": str(audit)})
    assert train.wait(300) == "SUCCEEDED", train.logs()[-3000:]
    return train, run_dir, audit, time.monotonic() - started


@pytest.mark.timeout(600)
def test_jobs_scale_the_cluster_up_to_the_node_types_they_need(cluster, training_run, tmp_path):
    train, run_dir, _, _ = training_run
    # Exactly the node types the job asked for: one learner node (2 learners, a GPU each), one rollout node.
    assert sorted(train.workers_seen.values()) == ["learner", "rollout"], train.workers_seen
    placed = {(a["class_name"], a["role"]) for a in train.actors()}
    assert {role for name, role in placed if name == "RayTrainWorker"} == {"learner"}, placed
    assert {role for name, role in placed if name in ENGINE_CLASSES} == {"rollout"}, placed
    # What outlives the job (Ray Data's per-cluster actors, detached) is on the head node, not on a GPU node it
    # would keep from scaling down.
    kept = {(a["class_name"], a["role"]) for a in train.actors() if a["is_detached"] and a["state"] == "ALIVE"}
    assert ("_StatsActor", "head") in kept and {role for _, role in kept} == {"head"}, kept
    rows = RunDir(run_dir).read_metrics()
    assert [r["iteration"] for r in rows] == [1, 2]
    # The weights crossed from the learner node to the rollout node and the engine scored the probe as they did.
    assert all(r["sync_bytes"] > 0 and r["probe_abs_diff"] <= 1e-4 for r in rows), rows

    eval_dir = tmp_path / "eval"
    models = (f"models=[{{name: base, path: 'builtin:world-small'}}, "
              f"{{name: sami-iter2, path: '{run_dir}/iteration-2/hf'}}]")
    evaluate = Job(cluster, "evals.run", "--config", str(REPO / "configs" / "eval_world.yaml"), models,
                   f"run.output_dir={eval_dir}", "baseline=base", "data.max_queries=256", "data.heldout_queries=32",
                   "num_queries=16", "adherence.heldout_principle_queries=8", "generation.gpus_per_model=1")
    assert evaluate.wait(300) == "SUCCEEDED", evaluate.logs()[-3000:]
    assert {a["role"] for a in evaluate.actors() if a["class_name"] in ENGINE_CLASSES} == {"rollout"}
    assert json.loads((eval_dir / "results.json").read_text())["meta"]["queries"] == 16


def kill_raylet(node_id: str) -> int:
    """SIGKILL the raylet of one worker node (its workers end with it): the node is lost, as a spot node is."""
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if cmdline and cmdline[0].endswith("/raylet") and f"--node_id={node_id}" in cmdline:
            os.kill(proc.pid, signal.SIGKILL)
            return proc.pid
    raise AssertionError(f"no raylet for node {node_id}")


def lose_node_of(job: Job, actor_class: str) -> str:
    """Kill the node holding the job's live `actor_class` actor; its id."""
    lost = next(a["node_id"] for a in job.actors() if a["class_name"] == actor_class and a["state"] == "ALIVE")
    kill_raylet(lost)
    return lost


def replaced(cluster: AutoscalingCluster, job: Job, lost: str, actor_class: str) -> str:
    """The lost node is dead and the autoscaler replaced it: the actor's last home another node of its type. The
    lost node's role."""
    assert {n["node_id"]: n["state"] for n in cluster.nodes()}[lost] == "DEAD"
    role = job.workers_seen[lost]
    homes = {a["node_id"] for a in job.actors() if a["class_name"] == actor_class and a["node_id"] != lost}
    assert homes and all(job.workers_seen[h] == role for h in homes), (homes, job.workers_seen)
    return role


@pytest.mark.timeout(600)
def test_lost_rollout_and_learner_nodes_are_replaced_the_engine_resynced_and_the_group_continues(cluster, tmp_path):
    """One 3-iteration job: its rollout node is lost once iteration 1 is complete, its learner node once iteration 2
    is. The job must succeed, each iteration once, every query's group generated exactly once."""
    started, run_dir = time.monotonic(), tmp_path / "run"
    job = Job(cluster, "pipelines.train", "--config", TINY, f"run.output_dir={run_dir}", *ON_GPUS, *SMALL)
    assert job.wait(240, until=(run_dir / "iteration-1" / "COMPLETE").is_file) is None, job.logs()[-3000:]
    lost_rollout = lose_node_of(job, "RolloutWorker")
    assert job.wait(300, until=(run_dir / "iteration-2" / "COMPLETE").is_file) is None, job.logs()[-3000:]
    lost_learner = lose_node_of(job, "RayTrainWorker")
    assert job.wait(300) == "SUCCEEDED", job.logs()[-3000:]
    rows = RunDir(run_dir).read_metrics()
    assert [r["iteration"] for r in rows] == [1, 2, 3], job.logs()[-3000:]
    for row in rows:  # no group lost or generated twice
        ids = [g["query_id"] for g in pyarrow.parquet.read_table(RunDir(run_dir).groups(row["iteration"])).to_pylist()]
        filtered = sum(v for k, v in row.items() if k.startswith("filtered_"))
        assert len(ids) == len(set(ids)) == row["groups"] and row["groups"] + filtered == 32, row
    assert all(r["probe_abs_diff"] <= 1e-4 for r in rows), rows  # every sync verified, the last ones on new nodes
    assert replaced(cluster, job, lost_rollout, "RolloutWorker") == "rollout"
    assert replaced(cluster, job, lost_learner, "RayTrainWorker") == "learner"
    # The rollout node's loss: the engine restarted in iteration 2, got the weights back and was checked.
    assert [r["engine_restarts"] for r in rows] == [0, 1, 0], rows
    assert rows[1]["restart_probe_abs_diff"] <= 1e-4
    assert "rollout engine 0 restarted: current weights loaded, probe check passed" in job.logs()
    # The learner node's loss: the group restarted once, in iteration 3, from iteration 2's checkpoint.
    assert [r["learner_restarts"] for r in rows] == [0, 0, 1], rows
    assert "learner group restarted after a failure (restart 1): continuing from iteration 2" in job.logs()
    print(f"rollout node and learner node lost and replaced: {time.monotonic() - started:.0f}s")


def opened_by_node(audit: Path) -> dict[str, dict[str, set]]:
    """node id -> {"r": paths read, "w": paths written} from tests/file_audit's records."""
    nodes: dict[str, dict[str, set]] = {}
    for record in audit.glob("*.tsv"):
        opened = nodes.setdefault(record.name.split(".")[0], {"r": set(), "w": set()})
        for line in record.read_text().splitlines():
            kind, path = line.split("\t", 1)
            opened[kind].add(path)
    return nodes


def strays(opened: dict, roles: dict, run_dir: Path, software: list[Path]) -> dict[str, set]:
    """role -> the files a node read that are neither in the run folder, nor software, nor the node's own: written
    on another node, or (on a worker node) there before the job. Paths compare resolved (the venv is a symlink).
    A temp file no audited process wrote is a node's own scratch, made outside Python's `open` (e.g. in C)."""
    found = {}
    for node, files in opened.items():
        written_elsewhere = set().union(*(f["w"] for other, f in opened.items() if other != node))
        for path in files["r"] - files["w"]:
            p = Path(os.path.realpath(path))
            if p.is_relative_to(run_dir.resolve()) or any(p.is_relative_to(s.resolve()) for s in software):
                continue
            if path in written_elsewhere or (roles[node] != "head" and not p.is_relative_to(tempfile.gettempdir())):
                found.setdefault(roles[node], set()).add(path)
    return found


def test_what_one_node_reads_from_another_lives_in_the_run_folder(cluster, training_run):
    """On a real cluster the nodes share only the run folder (a shared mount or cloud storage): a file a learner
    or engine node reads must be in it, or be the node's own (software, Ray's session folder, what the node itself
    wrote). All fake nodes share this machine's disk, so the test reads what each process opened (Python `open`).
    The head (the driver's node) may read what was there before the job (the built-in model's cache)."""
    train, run_dir, audit, _ = training_run
    roles = {n["node_id"]: n["labels"].get("role") for n in cluster.nodes()}
    opened = opened_by_node(audit)
    assert {roles[node] for node in opened} >= {"head", "learner", "rollout"}, opened.keys()
    software = [Path(sys.prefix), Path(sys.base_prefix), REPO, cluster.ray_dir, cluster.root, Path("/proc"),
                Path("/sys"), Path("/dev"), Path("/etc"), Path("/usr"), Path("/lib")]
    assert strays(opened, roles, run_dir, software) == {}


@pytest.mark.timeout(300)
def test_the_cluster_goes_back_to_zero_workers_once_the_jobs_are_done(cluster, training_run):
    """Last in the module, once every job is done (each job above starts on the nodes the one before left idle):
    the worker nodes, the replacements of lost ones too, go away after the idle timeout; nothing a job left on
    one keeps it busy. The timeout drops to 6 s now that no job can race it (the minute the jobs needed is waiting)."""
    train, _, _, seconds = training_run
    assert sorted(set(train.workers_seen.values())) == ["learner", "rollout"]  # there were workers to scale down
    cluster.set_idle_timeout(0.1)
    idle = cluster.wait_for_workers(0, 180)
    print(f"all workers gone {idle:.0f}s after the last job; {seconds:.0f}s for the training job")
