"""Which GPU each side gets, measured with Ray's logical GPUs on CPU (`ray.init(num_gpus=N)`): Ray hands out GPU
ids and Ray Train sets CUDA_VISIBLE_DEVICES from them exactly as on a GPU node, so a CPU shows the assignment.
What runs on the GPUs is not here (the vLLM engine is a stand-in actor holding the engine's Ray options; the
learner is the job's Ray Train scaling with a gloo group, since NCCL needs CUDA)."""
import json
import os

import pytest

from sami.config import load_config

ONE_GPU_SHARE = ["rollout.engine=vllm", "rollout.gpus_per_engine=0.5", "scaling.gpus_per_learner=0.5",
                 "rollout.weight_sync=object_store"]


@pytest.mark.timeout(300)
def test_engine_and_learner_share_the_one_gpu_of_a_one_gpu_node(tmp_path):
    import ray
    from ray.train import RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from actors.rollout import rollout_actor_options
    from pipelines.train import learner_scaling

    def assigned() -> dict:  # what Ray gave the calling process (defined here: Ray workers cannot import tests/)
        return {"ids": [str(i) for i in ray.get_gpu_ids()], "visible": os.environ.get("CUDA_VISIBLE_DEVICES")}

    class EngineHolderStandIn:  # where the vLLM engine would be built (vLLM needs CUDA)
        def gpus(self) -> dict:
            return assigned()

    def learner_gpus(config: dict) -> None:
        with open(config["out"], "w") as f:
            json.dump(assigned(), f)

    cfg = load_config(None, ONE_GPU_SHARE)
    ray.init(num_gpus=1, num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        holder = ray.remote(EngineHolderStandIn).options(**rollout_actor_options(cfg.rollout)).remote()
        engine = ray.get(holder.gpus.remote())
        TorchTrainer(learner_gpus, train_loop_config={"out": str(tmp_path / "learner.json")},
                     scaling_config=learner_scaling(cfg), torch_config=TorchConfig(backend="gloo"),
                     run_config=RunConfig(storage_path=str(tmp_path / "ray_train"))).fit()
        learner = json.loads((tmp_path / "learner.json").read_text())
    finally:
        ray.shutdown()
    # the node's one device is "0": both hold a share of it, and each sees it
    assert engine == {"ids": ["0"], "visible": "0"}
    assert learner == {"ids": ["0"], "visible": "0"}


def test_a_gpu_share_is_refused_where_it_cannot_work():
    from sami.config import ConfigError

    with pytest.raises(ConfigError, match="rollout.weight_sync=object_store"):  # NCCL: two ranks on one device
        load_config(None, ONE_GPU_SHARE[:3])
    with pytest.raises(ConfigError, match="tensor_parallel_size"):
        load_config(None, ONE_GPU_SHARE + ["rollout.tensor_parallel_size=2"])


def test_the_plan_of_a_shared_gpu_asks_for_one_gpu():
    from pipelines.plan import format_plan, resource_plan

    cfg = load_config(None, ONE_GPU_SHARE)
    plan = resource_plan(cfg)
    assert plan["groups"]["rollout"]["placement_group"]["bundles"] == [{"GPU": 0.5, "CPU": 1}]
    assert plan["total"]["gpus"] == 1.0
    assert "total:            1 GPU" in format_plan(cfg)
