"""The cluster config passes Ray's own validation (offline), the resource plan's numbers, metrics without Ray."""
import copy
import json
from pathlib import Path

import pytest
import yaml

from sami.metrics import RunMetrics, gauge_values
from pipelines.plan import checkpoint_bytes, count_parameters, parameter_count, resource_plan
from sami.config import load_config

REPO = Path(__file__).resolve().parents[1]
MISTRAL_7B = dict(hidden_size=4096, num_hidden_layers=32, vocab_size=32000, num_attention_heads=32,
                  num_key_value_heads=8, intermediate_size=14336, tie_word_embeddings=False)


def cluster_config() -> dict:
    return yaml.safe_load((REPO / "ray_cluster.yaml").read_text())


def prepared(config: dict) -> dict:
    """What `ray up` does before touching the cloud: fill defaults, then validate against ray-schema.json."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    out = prepare_config(copy.deepcopy(config))
    validate_config(out)
    return out


def test_cluster_yaml_passes_ray_validation():
    config = prepared(cluster_config())
    types = config["available_node_types"]
    assert config["head_node_type"] == "head" and types["head"]["resources"]["GPU"] == 0
    workers = {name: t for name, t in types.items() if name != "head"}
    assert set(workers) == {"learner", "rollout"}
    for t in workers.values():
        assert t["min_workers"] == 0 and 0 < t["max_workers"] and t["resources"]["GPU"] > 0
    assert sum(t["max_workers"] for t in workers.values()) <= config["max_workers"]
    assert config["idle_timeout_minutes"] > 0
    assert any("[vllm]" in command for command in config["setup_commands"])


def test_cluster_yaml_start_commands_set_auth_timeouts_and_loopback_dashboard():
    config = cluster_config()
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        start = " ".join(commands)
        for needed in ("RAY_AUTH_MODE=token", "RAY_worker_register_timeout_seconds=",
                       "RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S=1800"):
            assert needed in start
        # the wait for nodes is the job's own (scaling.placement_timeout_s), also given to Ray Train
        assert "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S" not in start
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    assert "RAY_enable_autoscaler_v2=1" in head  # only v2 reads the labels when it picks a node type
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


def test_node_types_carry_the_roles_the_requests_select():
    from actors.placement import LEARNER, ROLE, ROLLOUT, node_types

    types = {t.name: t for t in node_types(REPO / "ray_cluster.yaml")}
    assert {name: t.labels.get(ROLE) for name, t in types.items()} == {"learner": LEARNER, "rollout": ROLLOUT}
    assert cluster_config()["available_node_types"]["head"]["labels"][ROLE] == "head"  # roles_in_use() sees it


def test_the_node_types_that_would_fit_a_request():
    from actors.placement import LEARNER, ROLLOUT, fits, node_types

    types = node_types(REPO / "ray_cluster.yaml")

    def fitting(bundles, role):
        return [t.name for t in types if fits(bundles, {"role": role}, t)]

    assert fitting([{"CPU": 8, "GPU": 1}] * 8, LEARNER) == ["learner"]  # hh_mistral7b's learners
    assert fitting([{"CPU": 8, "GPU": 1}] * 16, LEARNER) == ["learner"]  # two learner nodes (max_workers 2)
    assert fitting([{"CPU": 8, "GPU": 1}] * 17, LEARNER) == []  # more GPUs than two nodes hold
    assert fitting([{"GPU": 1, "CPU": 1}] * 4, ROLLOUT) == ["rollout"]  # a TP-4 engine
    assert [t.name for t in types if fits([{"GPU": 1, "CPU": 1}] * 8, {"role": ROLLOUT}, t, "STRICT_PACK")] == []  # TP 8
    assert fitting([{"GPU": 9, "CPU": 1}], ROLLOUT) == []  # no node has 9 GPUs
    assert [t.name for t in types if fits([{"GPU": 1, "CPU": 1}], None, t)] == ["learner", "rollout"]  # no selector


def test_ray_validation_rejects_a_typo():
    """The check above is real: Ray's schema refuses an unknown key in a node type."""
    import jsonschema

    bad = cluster_config()
    bad["available_node_types"]["learner"]["max_worker"] = 3
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        prepared(bad)


def test_parameter_count_matches_published_models():
    assert count_parameters(MISTRAL_7B) == 7_241_732_096  # Mistral-7B-v0.1
    assert count_parameters({**MISTRAL_7B, "num_local_experts": 8}) == 46_702_792_704  # Mixtral-8x7B


def test_parameter_count_from_local_folder(tiny_model_dir):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    params, source = parameter_count(str(tiny_model_dir))
    assert params == sum(p.numel() for p in model.parameters()) and source.endswith("config.json")
    assert parameter_count("mistralai/Mistral-7B-v0.1")[0] == 7_241_732_096
    assert parameter_count("someone/unknown-model") == (None, "unknown (not a local folder nor a known model name)")


def test_checkpoint_bytes_by_precision_and_optimizer():
    gpu = load_config(None, ["scaling.gpus_per_learner=1"])
    # bf16 weights 2 + fp32 master 4 + Adam m, v 8 = 14 bytes per parameter; the HF export is bf16
    assert checkpoint_bytes(1000, gpu) == {"deepspeed": 14_000, "hf_export": 2_000}
    cpu_rmsprop = load_config(None, ["optim.name=rmsprop", "checkpoint.export_hf=false"])
    assert checkpoint_bytes(1000, cpu_rmsprop) == {"deepspeed": 8_000}  # fp32 weights 4 + square average 4


def test_resource_plan_counts_gpus_and_placement_groups():
    cfg = load_config(None, ["model.name_or_path=mistralai/Mistral-7B-v0.1", "rollout.engine=vllm",
                             "rollout.num_engines=2", "rollout.tensor_parallel_size=2", "scaling.num_learners=4",
                             "scaling.gpus_per_learner=1", "run.iterations=3", "schedule.grow_steps=true"])
    plan = resource_plan(cfg)
    assert plan["total"]["gpus"] == 4 * 1 + 2 * 2
    assert plan["groups"]["rollout"]["placement_group"]["bundles"] == [{"GPU": 1, "CPU": 1}] * 2
    assert len(plan["groups"]["learners"]["placement_group"]["bundles"]) == 4
    assert plan["optimizer_steps"] == [2, 4, 6]
    assert plan["checkpoints"]["iteration_bytes"] == 16 * 7_241_732_096
    assert plan["checkpoints"]["run_bytes"] == 3 * 16 * 7_241_732_096
    json.dumps(plan)  # plain data


def test_metrics_without_ray_are_a_no_op():
    import ray

    assert not ray.is_initialized()
    metrics = RunMetrics("train", "unit")
    metrics.set_phase("generate")
    metrics.record(1, {"loss": 0.5})
    assert metrics.enabled is False
    with pytest.raises(ValueError, match="unknown phase 'trian'"):
        metrics.set_phase("trian")


def test_gauge_values_split_record():
    record = {"iteration": 2, "objective": "sami", "loss": 0.25, "mi_lower_bound": None, "time_sync": 1.5,
              "filtered_empty": 3, "filtered_identical": 0, "groups": 61, "loss_per_step": [0.3, 0.2],
              "row_accuracy": float("nan")}
    gauges, filtered = gauge_values(record)
    assert gauges == {"iteration": 2.0, "loss": 0.25, "sync_seconds": 1.5, "groups": 61.0}
    assert filtered == {"empty": 3.0, "identical": 0.0}


def test_the_shared_folder_is_not_world_writable():
    """A resume unpickles DeepSpeed checkpoints from /mnt/efs: only the containers' user may write there."""
    commands = " ".join(cluster_config()["initialization_commands"])
    assert "777" not in commands and "o+w" not in commands and "a+w" not in commands
    assert "sudo chown 1000:100 /mnt/efs && sudo chmod 0750 /mnt/efs" in commands


def test_the_cluster_extra_loads_rays_aws_provider():
    """`ray up ray_cluster.yaml` loads the node provider its `provider.type` names; Ray's AWS provider imports boto3 and
    botocore at module level, which the project's dependencies do not bring. The `cluster` extra does, the `test` extra
    includes it and the cluster's head installs it: so this import runs in every test environment and fails, rather
    than skips, where the extra is missing."""
    import tomllib

    from ray.autoscaler._private.providers import _get_node_provider_cls
    from ray.autoscaler.node_provider import NodeProvider

    assert cluster_config()["provider"]["type"] == "aws"
    assert issubclass(_get_node_provider_cls(cluster_config()["provider"]), NodeProvider)  # what `ray up` resolves
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["cluster"] == ["boto3>=1.4.8"] and "sami-on-ray[cluster,tracking]" in extras["test"]
    assert cluster_config()["head_setup_commands"] == ['pip install -q -e "$HOME/sami-on-ray[cluster]"']
