"""The evaluation job on vLLM: `evals.generate.model_outputs`, the code one Ray actor per model runs, with
`generation.engine: vllm` (in-process, eager: an engine start of seconds)."""
import pytest

from evals.config import EvalConfig
from evals.generate import engine_model_config, model_outputs
from evals.gsm8k import load_gsm8k
from evals.mi_bound import mi_bounds
from evals.plan import EvalPlan
from sami.groups import QueryGroup
from sami.rollout_engines import HFEngine

VLLM_GENERATION = {"engine": "vllm", "dtype": "float32", "gpu_memory_utilization": 0.2, "enforce_eager": True,
                   "gpus_per_model": 1}


def test_pass_at_k_uses_k_distinct_samples(tiny_model_dir, fixtures_dir, monkeypatch):
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    cfg = EvalConfig(
        models=[{"name": "tiny", "path": str(tiny_model_dir)}],
        win_rates={"enabled": False}, mi_bound={"enabled": False},
        generation={**VLLM_GENERATION, "max_prompt_tokens": 256},
        gsm8k={"enabled": True, "source": str(fixtures_dir / "gsm8k" / "test.jsonl"), "max_items": 3,
               "num_samples": 4, "k": [1, 4], "temperature": 1.0, "max_new_tokens": 16},
    )
    plan = EvalPlan([], gsm8k_items=load_gsm8k(cfg.gsm8k.source, "test", 3))
    gsm = model_outputs(cfg.models[0], cfg, plan).gsm8k
    assert gsm["n"] == 3 and set(gsm["pass_at_k"]) == {1, 4}
    # one seed for the whole call gave 1 distinct sample of each problem's 4
    assert [item["distinct_samples"] for item in gsm["items"]] == [4, 4, 4]


def test_the_mi_bound_scores_training_prompts_longer_than_the_engine_takes(tiny_model_dir, monkeypatch):
    """Training prompts of over twice generation.max_prompt_tokens: vLLM refuses a sequence of max_model_len
    tokens or more, so they are cut as training cuts them, and the bound equals the HF engine's on the same cut."""
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    cfg = EvalConfig(models=[{"name": "tiny", "path": str(tiny_model_dir)}], win_rates={"enabled": False},
                     generation={**VLLM_GENERATION, "max_prompt_tokens": 16,
                                 "sampling": {"max_new_tokens": 6, "batch_size": 4}})
    long = "".join(f"{i}. Be polite, be concise and name the river.\n" for i in range(1, 9))
    queries = ["Tell me about the river.", "Tell me about the mountain."]
    plan = EvalPlan([QueryGroup(f"q{i}", q, constitutions=[long + "Be kind.", long + "Be rude."],
                                generation_prompts=[f"{q} kind", f"{q} rude"]) for i, q in enumerate(queries)])
    out = model_outputs(cfg.models[0], cfg, plan)
    hf = HFEngine(str(tiny_model_dir), engine_model_config(cfg.models[0], cfg))
    groups = [(g.training_prompts(cfg.data.task), r) for g, r in zip(plan.groups, out.responses)]
    assert out.mi_bounds == pytest.approx(mi_bounds(hf, groups, 16, 6), abs=1e-4)
