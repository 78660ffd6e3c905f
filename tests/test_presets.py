"""Every published-experiment preset validates and plans (`--dry-run`), and says what it reproduces."""
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.plan import format_plan, resource_plan
from sami.config import load_config
from sami.run_dir import RunDir

REPO = Path(__file__).resolve().parents[1]
TRAIN_PRESETS = ["hh_mistral7b", "hh_mistral7b_lora", "tldr_mistral7b", "tldr_mixtral_weak_writer", "mtbench_multitask_sami",
                 "mtbench_multitask_dpo", "mtbench_multitask_sft", "gsm8k_sami", "gsm8k_sft", "gsm8k_sft_then_sami"]


@pytest.mark.parametrize("name", TRAIN_PRESETS)
def test_training_preset_plans(name):
    path = REPO / "configs" / f"{name}.yaml"
    cfg = load_config(path)
    assert cfg.run.name == name
    plan = resource_plan(cfg)
    assert plan["total"]["gpus"] > 0 and cfg.rollout.engine == "vllm"
    assert "learners:" in format_plan(cfg)
    assert cfg.principles.num_constitutions == 2  # C = 2 in every published run
    if cfg.principles.source == "file":
        assert (REPO / cfg.principles.path).is_file()


def test_hh_preset_is_the_papers_schedule():
    cfg = load_config(REPO / "configs" / "hh_mistral7b.yaml")
    assert (cfg.run.iterations, cfg.schedule.init, cfg.schedule.grow_steps, cfg.optim.lr, cfg.optim.groups_per_step,
            cfg.principles.num_constitutions) == (3, "base", True, 5e-7, 128, 2)
    assert [cfg.steps_for_iteration(i) for i in (1, 2, 3)] == [2, 4, 6]
    plan = resource_plan(cfg)
    assert plan["parameters"] == 7_241_732_096
    # RMSprop: bf16 weights 2 + fp32 master 4 + square average 4 bytes per parameter; the HF export is bf16
    assert plan["checkpoints"]["per_iteration"] == {"deepspeed": 10 * 7_241_732_096, "hf_export": 2 * 7_241_732_096}


def test_hh_lora_preset_needs_two_gpus_and_checkpoints_the_adapter_only():
    full, lora = (load_config(REPO / "configs" / f"{name}.yaml") for name in ("hh_mistral7b", "hh_mistral7b_lora"))
    same = {k for k in ("data", "principles", "sampling", "schedule", "objective") if getattr(full, k) != getattr(lora, k)}
    assert not same  # the paper's run, only the way it trains differs
    plans = {name: resource_plan(cfg) for name, cfg in (("full", full), ("lora", lora))}
    assert (plans["full"]["total"]["gpus"], plans["lora"]["total"]["gpus"]) == (10, 2)
    adapter = 32 * 16 * (2 * (4096 + 4096) + 2 * (4096 + 1024) + 3 * (4096 + 14336))  # r (in + out): q o, k v, mlp
    assert plans["lora"]["trained_parameters"] == adapter == 41_943_040
    # RMSprop: bf16 adapter 2 + fp32 master 4 + square average 4 bytes per trained parameter; the adapter in bf16
    assert plans["lora"]["checkpoints"]["per_iteration"] == {"deepspeed": 10 * adapter, "adapter": 2 * adapter}
    assert plans["full"]["checkpoints"]["iteration_bytes"] > 150 * plans["lora"]["checkpoints"]["iteration_bytes"]
    assert "trained: a LoRA adapter of rank 16" in format_plan(lora)


def test_the_plan_names_what_training_holds_out():
    """The demo's world holds out `exclaim` and three colour members; its positive control trains every member; a
    published preset (principles from a file, none held out) says nothing of it."""
    demo = format_plan(load_config(REPO / "configs" / "world_demo.yaml")).splitlines()
    assert "  held out of training: exclaim; family members word-pink, word-white, word-black" in demo
    assert "  family members trained: word-red, word-blue, word-yellow, word-purple, word-orange" in demo
    control = format_plan(load_config(REPO / "configs" / "world_demo.yaml", ["principles.heldout=[exclaim]"]))
    assert "  held out of training: exclaim\n  family members trained: word-red, word-blue, word-yellow, word-purple, " \
           "word-orange, word-pink, word-white, word-black\n" in control
    assert "held out" not in format_plan(load_config(REPO / "configs" / "hh_mistral7b.yaml"))


def test_weak_writer_preset_writes_principles_with_mistral_instruct_for_mixtral():
    cfg = load_config(REPO / "configs" / "tldr_mixtral_weak_writer.yaml")
    assert "mixtral-8x7b" in cfg.model.name_or_path.lower()
    assert cfg.principles.source == "writer" and "Mistral-7B-Instruct" in cfg.principles.writer.model
    assert resource_plan(cfg)["total"]["gpus"] == 16 + 4


def test_comparison_arms_differ_only_where_they_should():
    arms = {name: load_config(REPO / "configs" / f"mtbench_multitask_{name}.yaml") for name in ("sami", "dpo", "sft")}
    assert {n: c.objective.name for n, c in arms.items()} == {"sami": "sami", "dpo": "dpo", "sft": "sft"}
    assert arms["dpo"].model.name_or_path == f"{arms['sft'].run.output_dir}/iteration-1/hf"  # DPO starts from SFT
    assert len({c.data.dataset for c in arms.values()}) == 1
    gsm = load_config(REPO / "configs" / "gsm8k_sft_then_sami.yaml")
    assert (gsm.objective.name, gsm.objective.sft_iterations, gsm.run.iterations) == ("sft_then_sami", 1, 2)


@pytest.mark.timeout(120)
def test_train_dry_run_subprocess():
    result = subprocess.run([sys.executable, "-m", "pipelines.train", "--config", "configs/hh_mistral7b.yaml",
                             "--dry-run", "run.iterations=2"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "2 iteration(s) of sami on mistralai/Mistral-7B-v0.1" in result.stdout
    assert "10 GPU" in result.stdout


EVAL_PRESETS = ["eval_hh_mistral7b", "eval_tldr_mistral7b", "eval_tldr_mixtral_weak_writer", "eval_mtbench_multitask",
                "eval_gsm8k", "eval_world"]


@pytest.mark.parametrize("name", EVAL_PRESETS)
def test_evaluation_preset_dry_run(name, capsys):
    from evals.config import EvalConfig
    from evals.run import main

    path = REPO / "configs" / f"{name}.yaml"
    assert main(["--config", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    cfg = load_config(path, model_cls=EvalConfig)
    assert f"{len(cfg.models)} model(s) against baseline {cfg.baseline_name!r}" in out
    header = path.read_text().split("\nrun:")[0]
    assert "python -m evals.run --config configs/" + name + ".yaml" in header
    if name != "eval_world":
        assert cfg.generation.engine == "vllm"


def test_evaluation_presets_read_what_their_training_runs_wrote():
    from evals.config import EvalConfig

    for train, evaluation in [("hh_mistral7b", "eval_hh_mistral7b"), ("tldr_mistral7b", "eval_tldr_mistral7b"),
                              ("tldr_mixtral_weak_writer", "eval_tldr_mixtral_weak_writer")]:
        t = load_config(REPO / "configs" / f"{train}.yaml")
        e = load_config(REPO / "configs" / f"{evaluation}.yaml", model_cls=EvalConfig)
        assert e.data == t.data  # the same held-out rows
        assert e.principles.path == f"{t.run.output_dir}/principles.yaml"
        iterations = [m.path for m in e.models if m.name.startswith("sami-iter")]
        assert iterations == [str(RunDir(t.run.output_dir).hf(k)) for k in range(1, t.run.iterations + 1)]
    gsm = load_config(REPO / "configs" / "eval_gsm8k.yaml", model_cls=EvalConfig)
    assert (gsm.gsm8k.num_samples, gsm.gsm8k.k, gsm.needs_queries) == (10, [1, 10], False)


@pytest.mark.timeout(120)
def test_submit_eval_dry_run_prints_the_evaluation_plan():
    result = subprocess.run([sys.executable, "-m", "cluster.submit", "--eval", "--config", "configs/eval_gsm8k.yaml",
                             "--dry-run", "gsm8k.max_items=100"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "benchmarks: GSM8K (openai/gsm8k test; greedy, pass@[1, 10] from 10 samples)" in result.stdout
    assert "entry point: python -m evals.run --config configs/eval_gsm8k.yaml gsm8k.max_items=100" in result.stdout
