"""The typed training config: YAML + overrides, and errors that name the field and the bad value."""
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sami.config import ConfigError, TrainConfig, dump_config, load_config, parse_overrides


def test_overrides_parse_yaml_scalars_into_nested_keys():
    assert parse_overrides(["optim.lr=1e-4", "run.iterations=3", "principles.heldout=[a, b]", "run.name=x"]) == {
        "optim": {"lr": 1e-4},
        "run": {"iterations": 3, "name": "x"},
        "principles": {"heldout": ["a", "b"]},
    }


def test_file_values_are_overridden_and_round_trip(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run:\n  iterations: 5\noptim:\n  lr: 0.001\n  name: rmsprop\n")
    cfg = load_config(path, ["optim.lr=2e-4"])
    assert (cfg.run.iterations, cfg.optim.lr, cfg.optim.name) == (5, 2e-4, "rmsprop")
    dump_config(cfg, tmp_path / "out.yaml")
    assert load_config(tmp_path / "out.yaml") == cfg


@pytest.mark.parametrize(
    "override, expected",
    [
        ("optim.lr=-1", "optim.lr: Input should be greater than 0 (got -1)"),
        ("objective.name=ppo", "objective.name"),
        ("optim.lrr=1", "optim.lrr: unknown field"),
        ("run.iterations=zero", "run.iterations"),
        ("optim.groups_per_step=3", "optim.groups_per_step (3) must be a multiple of scaling.num_learners (2)"),
        ("sampling.temperature=2.5", "sampling.temperature: Input should be less than or equal to 2"),  # vLLM's limit
        ("schedule.rollout=async", "schedule.rollout: Input should be 'sync' or 'one_step_off'"),
    ],
)
def test_errors_name_the_field_and_the_bad_value(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["scaling.num_learners=2", override])
    assert expected in str(err.value)
    if "unknown" not in expected and "multiple" not in expected:
        assert override.split("=", 1)[1] in str(err.value)


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key.path=value"):
        parse_overrides(["optim.lr"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(tmp_path / "list.yaml")


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="principles.path is not set"):
        load_config(None, ["principles.source=file"])
    with pytest.raises(ConfigError, match="data.dataset is not set"):
        load_config(None, ["data.source=hf"])


def test_a_share_of_a_gpu_with_nccl_weight_sync_is_refused():
    """Issue 22, defect 8: gpus_per_learner 0.5 with weight_sync auto would put two NCCL ranks on one GPU."""
    shared = ["rollout.engine=vllm", "scaling.gpus_per_learner=0.5"]
    with pytest.raises(ConfigError) as refused:
        load_config(None, shared)
    line = str(refused.value)
    assert line.startswith("invalid config (defaults): scaling.gpus_per_learner is 0.5, a share of a GPU, but "
                           "rollout.weight_sync 'auto'") and "\n" not in line
    assert "rollout.weight_sync=object_store" in line
    assert load_config(None, [*shared, "rollout.weight_sync=object_store"]).scaling.gpus_per_learner == 0.5
    assert load_config(None, ["rollout.engine=vllm", "scaling.gpus_per_learner=2"]).rollout.weight_sync == "auto"
    assert load_config(None, ["scaling.gpus_per_learner=0.5"]).rollout.engine == "hf"  # HF engines: object store


def test_a_share_of_a_gpu_with_several_learners_is_refused():
    """Ray packs fractional requests onto the fullest GPU that fits: two 0.5-GPU learners would share one device,
    which DeepSpeed hands each rank as its own (`set_device(LOCAL_RANK)`), whatever the weight sync."""
    shared = ["scaling.gpus_per_learner=0.5", "rollout.weight_sync=object_store", "optim.groups_per_step=4"]
    assert load_config(None, shared).scaling.num_learners == 1  # one learner on a share: allowed
    with pytest.raises(ConfigError) as refused:
        load_config(None, [*shared, "scaling.num_learners=2"])
    assert "scaling.gpus_per_learner is 0.5, a share of a GPU, with scaling.num_learners 2" in str(refused.value)
    assert load_config(None, ["scaling.gpus_per_learner=1", "scaling.num_learners=2", "optim.groups_per_step=4"])


def test_the_world_registers_its_heldout_principles_and_the_core_never_imports_it():
    from sami.principles import PrincipleError, builtin_library

    import sami.world.rules

    held = ("word-pink", "word-white", "word-black")
    trained = ("word-red", "word-blue", "word-yellow", "word-purple", "word-orange")
    assert load_config(None).principles.heldout_names == builtin_library("world").heldout == ("exclaim", *held)
    assert (load_config(None).principles.trained_members, load_config(None).principles.heldout_members) == (trained, held)
    assert load_config(None).principles.heldout_principles == ("exclaim",)
    # the positive control: every member trained
    everything = load_config(None, ["principles.heldout=[exclaim]"]).principles
    assert everything.heldout_names == ("exclaim",) and everything.trained_members == trained + held
    assert everything.heldout_members == ()
    assert load_config(None, ["principles.heldout=[polite]"]).principles.heldout_names == ("polite",)
    file = load_config(None, ["principles.source=file", "principles.path=x.yaml"]).principles
    assert file.heldout_names == () and file.trained_members == () == file.heldout_members
    with pytest.raises(PrincipleError, match="no built-in principle library of that name is registered"):
        builtin_library("moon")
    loaded = subprocess.run([sys.executable, "-c", "import sys, sami.config; print(sorted(m for m in sys.modules "
                             "if m.startswith('sami.world')))"], capture_output=True, text=True, timeout=60)
    assert loaded.returncode == 0 and loaded.stdout.strip() == "[]", loaded.stderr


def test_paper_schedule_grows_steps():
    cfg = TrainConfig.model_validate({"schedule": {"steps_per_iteration": 2, "grow_steps": True}})
    assert [cfg.steps_for_iteration(k) for k in (1, 2, 3)] == [2, 4, 6]
    assert TrainConfig().steps_for_iteration(3) == TrainConfig().schedule.steps_per_iteration


def test_overrides_index_lists_and_the_eval_schema_checks_itself(tmp_path):
    from evals.config import EvalConfig

    path = tmp_path / "eval.yaml"
    path.write_text("models:\n  - {name: base, path: a}\n  - {name: sami, path: b}\n")
    cfg = load_config(path, ["models.1.path=c", "baseline=sami"], model_cls=EvalConfig)
    assert [(m.name, m.path) for m in cfg.models] == [("base", "a"), ("sami", "c")] and cfg.baseline_name == "sami"
    with pytest.raises(ConfigError, match="override index '2' is out of range: the list has 2 entries"):
        load_config(path, ["models.2.path=x"], model_cls=EvalConfig)
    for override, expected in [("models.1.name=base", "names must be unique, ['base'] repeat"),
                               ("judge.backend=openai", "judge.model is not set"),
                               ("data.source=jsonl", "judge.backend 'world' judges the built-in world only"),
                               ("mtbench.enabled=true", "mtbench.judge_prompts"),
                               ("gsm8k.num_samples=4", "gsm8k.k")]:
        extra = ["data.path=q.jsonl"] if override == "data.source=jsonl" else []
        extra += ["gsm8k.k=[1, 8]"] if override.startswith("gsm8k") else []
        with pytest.raises(ConfigError, match=re.escape(expected)):
            load_config(path, [override, *extra], model_cls=EvalConfig)


def test_non_finite_settings_are_refused_before_ray_starts():
    started = time.time()
    done = subprocess.run([sys.executable, "-m", "pipelines.train", "--config", "configs/tiny.yaml", "optim.lr=.inf"],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip() == ("error: invalid config (configs/tiny.yaml): "
                                                   "optim.lr: Input should be a finite number (got inf)")
    assert time.time() - started < 30 and "Started a local Ray instance" not in done.stderr
