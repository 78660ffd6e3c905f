"""Which GPU each side gets, measured with Ray's logical GPUs on CPU (`ray.init(num_gpus=N)`): Ray hands out GPU
ids and Ray Train sets CUDA_VISIBLE_DEVICES from them exactly as on a GPU node, so a CPU shows the assignment.
What runs on the GPUs is not here (the vLLM engine is a stand-in actor holding the engine's Ray options; the
learner is the job's Ray Train scaling and torch config, whose learners choose gloo: they see no CUDA device)."""
import json
import os

import pytest

from sami.config import load_config

ONE_GPU_SHARE = ["rollout.engine=vllm", "rollout.gpus_per_engine=0.5", "scaling.gpus_per_learner=0.5",
                 "rollout.weight_sync=object_store"]


@pytest.mark.timeout(300)
def test_engine_and_learner_share_the_one_gpu_of_a_one_gpu_node(tmp_path):
    """Also: the learners' process group on logical GPUs is gloo, chosen in the learners' own placement group
    (scaling.torch_backend auto; Ray Train's own choice, NCCL, dies here: "Distributed package doesn't have NCCL
    built in"), and an hf engine takes the GPU rollout.gpus_per_engine asks for."""
    import ray
    from ray.train import RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from actors.placement import remove_groups, request_group
    from actors.rollout import rollout_placement
    from pipelines.plan import learner_bundle
    from pipelines.torch_backend import learners_backend
    from pipelines.train import learner_scaling

    def assigned() -> dict:  # what Ray gave the calling process (defined here: Ray workers cannot import tests/)
        return {"ids": [str(i) for i in ray.get_gpu_ids()], "visible": os.environ.get("CUDA_VISIBLE_DEVICES")}

    class EngineHolderStandIn:  # where the vLLM engine would be built (vLLM needs CUDA)
        def gpus(self) -> dict:
            return assigned()

    def learner_gpus(config: dict) -> None:
        import torch.distributed as dist

        with open(config["out"], "w") as f:
            json.dump({**assigned(), "backend": dist.get_backend()}, f)

    cfg = load_config(None, ONE_GPU_SHARE)
    hf_on_a_gpu = load_config(None, ["rollout.engine=hf", "rollout.gpus_per_engine=1"]).rollout
    ray.init(num_gpus=2, num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        holder = ray.remote(EngineHolderStandIn).options(**rollout_placement(0, cfg.rollout)[1]).remote()
        engine = ray.get(holder.gpus.remote())
        hf_holder = ray.remote(EngineHolderStandIn).options(**rollout_placement(0, hf_on_a_gpu)[1]).remote()
        hf_engine = ray.get(hf_holder.gpus.remote())
        learners = request_group("learners", [learner_bundle(cfg)] * cfg.scaling.num_learners, None)  # as place() does
        ray.get(learners.group.ready(), timeout=60)
        backend = learners_backend(cfg, learners.group)
        remove_groups([learners])
        TorchTrainer(learner_gpus, train_loop_config={"out": str(tmp_path / "learner.json")},
                     scaling_config=learner_scaling(cfg), torch_config=TorchConfig(backend=backend),
                     run_config=RunConfig(storage_path=str(tmp_path / "ray_train"))).fit()
        learner = json.loads((tmp_path / "learner.json").read_text())
    finally:
        ray.shutdown()
    # the node's device "0": the vLLM engine and the learner hold a share of it, and each sees it
    assert engine == {"ids": ["0"], "visible": "0"}
    assert backend == "gloo" and learner == {"ids": ["0"], "visible": "0", "backend": "gloo"}
    assert hf_engine == {"ids": ["1"], "visible": "1"}  # the node's other device, whole


def test_the_backend_is_the_learners_choice_only_where_they_hold_gpus():
    from pipelines.torch_backend import backend_for, learners_backend

    assert (backend_for([True, True]), backend_for([True, False]), backend_for([False])) == ("nccl", "gloo", "gloo")
    # asked for, or no GPUs: no probe (no group needed)
    assert learners_backend(load_config(None), None) == "gloo"
    assert learners_backend(load_config(None, ["scaling.gpus_per_learner=1", "scaling.torch_backend=nccl"]), None) == "nccl"
    assert learners_backend(load_config(None, ["scaling.gpus_per_learner=1", "scaling.torch_backend=gloo"]), None) == "gloo"


def test_a_gpu_share_is_refused_where_it_cannot_work():
    from sami.config import ConfigError

    with pytest.raises(ConfigError, match="rollout.weight_sync=object_store"):  # NCCL: two ranks on one device
        load_config(None, ONE_GPU_SHARE[:3])
    with pytest.raises(ConfigError, match="tensor_parallel_size"):
        load_config(None, ONE_GPU_SHARE + ["rollout.tensor_parallel_size=2"])
    with pytest.raises(ConfigError, match="rollout.gpus_per_engine is 0"):
        load_config(None, ["rollout.engine=vllm", "scaling.gpus_per_learner=1", "rollout.gpus_per_engine=0"])
    with pytest.raises(ConfigError, match="scaling.torch_backend is 'nccl' .GPU only. but scaling.gpus_per_learner is 0"):
        load_config(None, ["scaling.torch_backend=nccl"])


def test_the_plan_of_a_shared_gpu_asks_for_one_gpu():
    from pipelines.plan import format_plan, resource_plan

    cfg = load_config(None, ONE_GPU_SHARE)
    plan = resource_plan(cfg)
    assert plan["groups"]["rollout"]["placement_group"]["bundles"] == [{"GPU": 0.5, "CPU": 1}]
    assert plan["total"]["gpus"] == 1.0
    assert "total:            1 GPU" in format_plan(cfg)
