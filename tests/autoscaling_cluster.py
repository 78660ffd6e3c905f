"""A local autoscaling Ray cluster: the node types of ray_cluster.yaml (same names and labels, small logical
sizes), each worker a Ray node on this machine started and stopped by Ray's own autoscaler.

Ray's `ray.cluster_utils.AutoscalingCluster` cannot be used: its example.yaml is missing from the 2.60 wheel and
its start/shutdown run `ray stop --force`, which ends every Ray on the machine. Its provider class works as an
`external` provider under our own `ray start --head --autoscaling-config=...` (LoopbackCluster: own ports, temp
dir and token), torn down by pid. The GPUs are logical: Ray schedules by them, nothing runs on a GPU."""
import json
import os
import time
from pathlib import Path

import yaml

from test_job_submit import LoopbackCluster

REPO = Path(__file__).resolve().parents[1]
FAKE_PROVIDER = "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider"
# The fake provider names the head node's type and id itself (node_provider.py: FAKE_HEAD_NODE_*).
FAKE_HEAD_TYPE = "ray.head.default"
FAKE_HEAD_ID = "fffffffffffffffffffffffffffffffffffffffffffffffffff00000"
# Logical sizes that fit configs/tiny.yaml's two learners (a GPU each) and one engine per rollout node.
SMALL_SIZES = {"head": {"CPU": 1}, "learner": {"CPU": 2, "GPU": 2}, "rollout": {"CPU": 1, "GPU": 1}}
SMALL_MAX_WORKERS = {"learner": 1, "rollout": 2}


def autoscaling_config(gcs_address: str, idle_timeout_minutes: float, sizes: dict = SMALL_SIZES,
                       max_workers: dict = SMALL_MAX_WORKERS) -> dict:
    """ray_cluster.yaml's node types with `sizes` and `max_workers`, on the fake multi-node provider."""
    real = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
    types = {}
    for name, node_type in real["available_node_types"].items():
        head = name == real["head_node_type"]
        types[FAKE_HEAD_TYPE if head else name] = {
            "resources": dict(sizes[name]), "labels": dict(node_type["labels"]), "node_config": {},
            "min_workers": 0, "max_workers": 0 if head else max_workers[name]}
    return {
        "cluster_name": real["cluster_name"], "max_workers": sum(max_workers.values()),
        "upscaling_speed": real["upscaling_speed"], "idle_timeout_minutes": idle_timeout_minutes,
        "provider": {"type": "external", "module": FAKE_PROVIDER, "gcs_address": gcs_address,
                     "head_node_id": FAKE_HEAD_ID, "launch_multiple": True, "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True},
        "available_node_types": types, "head_node_type": FAKE_HEAD_TYPE,
        "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously":
        False, "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
        "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": []}


class AutoscalingCluster(LoopbackCluster):
    """The head of LoopbackCluster running autoscaler v2 (the one that reads node labels) over the fake
    provider; worker nodes are started by the autoscaler's process inside this cluster's temp dir, so
    LoopbackCluster.stop ends them by pid with the rest."""

    # Idle workers go after 1 minute: at 0.5 the learner node went idle between the driver's placement check and Ray
    # Train's own request on a slow run, and a second learner node booted for the job.
    def __init__(self, root: Path, idle_timeout_minutes: float = 1):
        self.config_path = root / "autoscaling.yaml"
        real = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
        head = real["available_node_types"][real["head_node_type"]]
        head_labels = ",".join(f"{k}={v}" for k, v in head["labels"].items())
        head_cpus = SMALL_SIZES[real["head_node_type"]]["CPU"]
        self._idle_timeout_minutes = idle_timeout_minutes
        super().__init__(root, head_args=(f"--num-cpus={head_cpus}", "--num-gpus=0", f"--labels={head_labels}",
                                          f"--autoscaling-config={self.config_path}"),
                         env={"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
                              # this checkout's code on every node (jobs need no working_dir upload)
                              "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
                              "RAY_enable_autoscaler_v2": "1", "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_ID,
                              "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_ID})

    def before_start(self) -> None:
        self.set_idle_timeout(self._idle_timeout_minutes)

    def set_idle_timeout(self, minutes: float) -> None:
        """Write the node types with this idle timeout; a running autoscaler v2 reads its config file again at every
        update (autoscaler.py: refresh_cached_autoscaling_config)."""
        self._idle_timeout_minutes = minutes
        written = self.config_path.with_suffix(".new")  # whole, then renamed: the autoscaler never reads half a file
        written.write_text(json.dumps(autoscaling_config(f"127.0.0.1:{self.gcs_port}", minutes)))
        os.replace(written, self.config_path)

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        """The dashboard answers and the state API lists the head (it lists nothing for a moment before)."""
        deadline = time.monotonic() + timeout_s
        super().wait_ready(timeout_s)
        while not any(n["is_head_node"] and n["state"] == "ALIVE" for n in self.nodes()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the head node did not register in {timeout_s}s")
            time.sleep(0.5)

    def nodes(self) -> list[dict]:
        """Every node the GCS knows (alive or dead), with `labels` and `resources_total`, from the state API."""
        return self.get("/api/v0/nodes?limit=100&detail=true")["data"]["result"]["result"]

    def alive_workers(self) -> list[dict]:
        return [n for n in self.nodes() if n["state"] == "ALIVE" and not n["is_head_node"]]

    def wait_for_workers(self, count: int, timeout_s: float) -> float:
        """Seconds until exactly `count` worker nodes are alive."""
        start = time.monotonic()
        while time.monotonic() - start < timeout_s:
            if len(self.alive_workers()) == count:
                return time.monotonic() - start
            time.sleep(1.0)
        alive = [(n["node_id"][-5:], n["labels"].get("role")) for n in self.alive_workers()]
        raise TimeoutError(f"{len(alive)} worker nodes alive after {timeout_s}s, not {count}: {alive}")


def main() -> None:
    """By hand (docs/cluster.md): start the cluster, print how to reach it, stop it by pid on Ctrl-C."""
    import tempfile

    cluster = AutoscalingCluster(Path(tempfile.mkdtemp(prefix="sami-autoscaling-")))
    try:
        cluster.wait_ready()
        print(f"autoscaling cluster up: {cluster.config_path} (node types), ray logs in {cluster.ray_dir}\n"
              f"export RAY_ADDRESS={cluster.address} RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={cluster.root / 'token'}\n"
              f"Ctrl-C stops it", flush=True)
        while cluster.process.poll() is None:
            time.sleep(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
