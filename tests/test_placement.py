"""Where the jobs' requests land on the real node types, with Ray's logical resources on one machine: placement
only, no training.

One raylet per node of `ray_cluster.yaml` (`ray.cluster_utils.Cluster`; its processes are ended by pid, no `ray
stop`): the head (CPU 8, `role: head`) and every worker node its node types may start (2 `learner` nodes of CPU
96 and GPU 8, 4 `rollout` nodes of CPU 48 and GPU 4), each with its type's labels; the GPUs are logical. What it
does not show is which node type an autoscaler starts (the local autoscaling cluster's test does).
"""
import shutil

import pytest
import ray

from actors.placement import (CLUSTER_YAML, LEARNER, ROLE, ROLLOUT, bundle_text, count_bundles, node_types,
                               remove_groups, request_group, role_selector, wait_for_groups)
from sami.config import load_config

TRAINING_PRESETS = ["hh_mistral7b", "tldr_mistral7b", "tldr_mixtral_weak_writer", "gsm8k_sami", "gsm8k_sft",
                    "gsm8k_sft_then_sami", "mtbench_multitask_sami", "mtbench_multitask_sft", "mtbench_multitask_dpo",
                    "tiny", "world_demo"]
EVAL_PRESETS = ["eval_hh_mistral7b", "eval_tldr_mistral7b", "eval_tldr_mixtral_weak_writer", "eval_gsm8k",
                "eval_mtbench_multitask", "eval_world"]


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    small = {"object_store_memory": 80 * 2**20}  # logical nodes: Ray's smallest object store each
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 8, "num_gpus": 0, "labels": {ROLE: "head"},
                                                            "include_dashboard": False, **small})
    for t in node_types(CLUSTER_YAML):
        for _ in range(t.max_workers):
            nodes.add_node(num_cpus=int(t.resources["CPU"]), num_gpus=int(t.resources["GPU"]), labels=t.labels, **small)
    ray.init(address=nodes.address, log_to_driver=False)
    try:
        yield nodes
    finally:
        ray.shutdown()
        nodes.shutdown()


def landing(request) -> str:
    """Where a placed group's bundles are: node type x bundles, per node (the node's `role` label names its type)."""
    from ray.util.placement_group import placement_group_table

    roles = {n["NodeID"]: n["Labels"].get(ROLE) for n in ray.nodes()}
    by_node: dict[str, int] = {}
    for node in placement_group_table(request.group)["bundles_to_node_id"].values():
        by_node[node] = by_node.get(node, 0) + 1
    return " + ".join(f"{roles[node]} ({count})" for node, count in sorted(by_node.items(), key=lambda kv: -kv[1]))


def training_requests(cfg) -> list:
    """What the training job asks for (pipelines/train.py: place): the learners' group, one group per engine."""
    from actors.rollout import rollout_placement
    from pipelines.plan import learner_bundle

    learners = request_group("learners", [learner_bundle(cfg)] * cfg.scaling.num_learners, role_selector(LEARNER))
    return [learners] + [rollout_placement(i, cfg.rollout, role_selector(ROLLOUT))[0]
                         for i in range(cfg.rollout.num_engines)]


def placed_table() -> list[str]:
    """Every preset's requests placed on the cluster, one at a time: a Markdown row per preset."""
    from evals.config import EvalConfig
    from evals.generate import model_placement

    rows = []
    for name in TRAINING_PRESETS + EVAL_PRESETS:
        path = f"configs/{name}.yaml"
        if name.startswith("eval_"):
            cfg = load_config(path, model_cls=EvalConfig)
            requests = [model_placement(m.name, cfg)[0] for m in cfg.models]
            learners, engines = "-", requests
        else:
            requests = training_requests(load_config(path))
            learners, engines = requests[0], requests[1:]
        try:
            wait_for_groups(requests, 60, "test")
            where = [landing(learners) if learners != "-" else "-"] + [landing(e) for e in engines]
        finally:
            remove_groups(requests)
        learner_cells = f"{len(learners.bundles)} x {bundle_text(learners.bundles[0])} | {where[0]}" \
            if learners != "-" else "- | -"
        rows.append(f"| `{name}` | {learner_cells} | {len(engines)} x {engine_shape(engines[0])} | {', '.join(where[1:])} |")
    return rows


def engine_shape(request) -> str:
    """One engine's bundles: `{...}`, or `(4 x {...})` for a tensor-parallel one."""
    (bundle, count), = count_bundles(request.bundles)
    return f"({count} x {bundle_text(bundle)})" if count > 1 else bundle_text(bundle)


@pytest.mark.timeout(300)
def test_every_preset_lands_on_the_node_types_meant_for_it(cluster):
    """Learners on `learner` nodes only, every engine on `rollout` nodes only; docs/cluster.md shows this table."""
    rows = placed_table()
    print("\n".join(rows))
    for row in rows:
        _, name, _, learners, _, engines, _ = [cell.strip() for cell in row.split("|")]
        assert learners == "-" or set(part.split(" (")[0] for part in learners.split(" + ")) == {"learner"}, row
        assert {part.split(" (")[0] for e in engines.split(", ") for part in e.split(" + ")} == {"rollout"}, row
    assert "| `hh_mistral7b` | 8 x {CPU 8, GPU 1} | learner (8) |" in "\n".join(rows)  # one A100 node, not L40S
    assert "| `tldr_mixtral_weak_writer` | 16 x {CPU 8, GPU 1} | learner (8) + learner (8) |" in "\n".join(rows)
    documented = (CLUSTER_YAML.parent / "docs" / "cluster.md").read_text()
    missing = [row for row in rows if row not in documented]
    assert not missing, "docs/cluster.md's placement table is not what the cluster does:\n" + "\n".join(missing)


@pytest.mark.timeout(180)
def test_what_cannot_be_placed_is_one_line_naming_it_and_the_node_type_that_fits(cluster, tiny_model_dir, tmp_path):
    """Nine GPUs per learner: no node holds them. The engines, asked for at the same time, were placed; the learners
    are named, with their shape, their role and the verdict from ray_cluster.yaml; no learner started."""
    from pipelines.train import RunFailed, run

    cfg = load_config("configs/tiny.yaml", [f"model.name_or_path={tiny_model_dir}", f"run.output_dir={tmp_path / 'run'}",
                                            "scaling.gpus_per_learner=9", "scaling.placement_timeout_s=3"])
    with pytest.raises(RunFailed) as failed:
        run(cfg)
    message = str(failed.value)
    assert "\n" not in message
    assert message.startswith("could not place learners (2 x {CPU 0.5, GPU 9} on role=learner nodes: no node type of "
                              "ray_cluster.yaml fits it) within 3 s (scaling.placement_timeout_s)"), message
    assert "rollout engine" not in message  # placed
    assert not (tmp_path / "run" / "learner_starts").exists()


@pytest.mark.timeout(180)
def test_an_engine_that_dies_starting_is_reported_before_any_learner_starts(cluster, tiny_model_dir, tmp_path):
    """A model folder without its weights (the driver's checks see config.json and the tokenizer): the engine's
    constructor raises on a rollout node; the run ends with that reason, before Ray Train starts a learner."""
    from pipelines.train import RunFailed, run

    model = tmp_path / "no-weights"
    shutil.copytree(tiny_model_dir, model)
    for weights in model.glob("*.safetensors"):
        weights.unlink()
    cfg = load_config("configs/tiny.yaml", [f"model.name_or_path={model}", f"run.output_dir={tmp_path / 'run'}"])
    with pytest.raises(RunFailed) as failed:
        run(cfg)
    message = str(failed.value)
    assert message.startswith("run tiny: rollout engine 0 died while starting: OSError:"), message
    assert "\n" not in message
    assert not (tmp_path / "run" / "learner_starts").exists()
