"""The jobs on a local autoscaling cluster (tests/autoscaling_cluster.py: ray_cluster.yaml's node types, logical
GPUs): `ray job submit` starts exactly the worker nodes a job needs, learners land on `learner` nodes and engines
on `rollout` nodes (read from the nodes' labels), and the cluster goes back to 0 workers when the jobs are done."""
import json
import secrets
import subprocess
import time
from pathlib import Path

import pytest

from autoscaling_cluster import AutoscalingCluster
from test_job_submit import REPO, VENV_BIN

pytestmark = [pytest.mark.slow]
# configs/tiny.yaml with a logical GPU per learner and per engine: 1 learner node (2 GPUs) and 1 rollout node.
ON_GPUS = ["scaling.gpus_per_learner=1", "rollout.gpus_per_engine=1", "scaling.torch_backend=auto"]
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
    the worker nodes alive are recorded (node id -> role label)."""

    def __init__(self, cluster: AutoscalingCluster, module: str, *args: str):
        self.cluster, self.id = cluster, f"sami-{module.split('.')[0]}-{secrets.token_hex(4)}"
        self.workers_seen: dict[str, str] = {}
        submit = subprocess.run(
            [str(VENV_BIN / "ray"), "job", "submit", "--address", cluster.address, "--working-dir", ".",
             "--submission-id", self.id, "--no-wait", "--", "python", "-m", module, *args],
            cwd=REPO, env=cluster.env, capture_output=True, text=True, timeout=120)
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


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.timeout(600)
def test_jobs_scale_the_cluster_up_to_the_node_types_they_need_and_back_to_zero(cluster, tmp_path):
    started = time.monotonic()
    assert cluster.alive_workers() == []
    run_dir = tmp_path / "run"
    train = Job(cluster, "pipelines.train", "--config", "configs/tiny.yaml", f"run.output_dir={run_dir}", *ON_GPUS)
    assert train.wait(300) == "SUCCEEDED", train.logs()[-3000:]
    # Exactly the node types the job asked for: one learner node (2 learners, a GPU each), one rollout node.
    assert sorted(train.workers_seen.values()) == ["learner", "rollout"], train.workers_seen
    placed = {(a["class_name"], a["role"]) for a in train.actors()}
    assert {role for name, role in placed if name == "RayTrainWorker"} == {"learner"}, placed
    assert {role for name, role in placed if name in ENGINE_CLASSES} == {"rollout"}, placed
    rows = metrics(run_dir)
    assert [r["iteration"] for r in rows] == [1, 2]
    # The weights crossed from the learner node to the rollout node and the engine scored the probe as they did.
    assert all(r["sync_bytes"] > 0 and r["probe_abs_diff"] <= 1e-4 for r in rows), rows

    eval_dir = tmp_path / "eval"
    models = (f"models=[{{name: base, path: 'builtin:world-small'}}, "
              f"{{name: sami-iter2, path: '{run_dir}/iteration-2/hf'}}]")
    evaluate = Job(cluster, "evals.run", "--config", "configs/eval_world.yaml", models, f"run.output_dir={eval_dir}",
                   "baseline=base", "data.max_queries=256", "data.heldout_queries=32", "num_queries=16",
                   "adherence.heldout_principle_queries=8", "generation.gpus_per_model=1")
    assert evaluate.wait(300) == "SUCCEEDED", evaluate.logs()[-3000:]
    assert {a["role"] for a in evaluate.actors() if a["class_name"] in ENGINE_CLASSES} == {"rollout"}
    assert json.loads((eval_dir / "results.json").read_text())["meta"]["queries"] == 16

    idle = cluster.wait_for_workers(0, 180)
    print(f"jobs done, all workers gone {idle:.0f}s later; {time.monotonic() - started:.0f}s in all")
