"""The evaluation job's GSM8K pass@k on vLLM: `evals.generate.model_outputs`, the code one Ray actor per model
runs, with `generation.engine: vllm` (in-process, eager: an engine start of seconds)."""
from evals.config import EvalConfig
from evals.generate import EvalPlan, model_outputs
from evals.gsm8k import load_gsm8k


def test_pass_at_k_uses_k_distinct_samples(tiny_model_dir, fixtures_dir, monkeypatch):
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    cfg = EvalConfig(
        models=[{"name": "tiny", "path": str(tiny_model_dir)}],
        win_rates={"enabled": False}, mi_bound={"enabled": False},
        generation={"engine": "vllm", "dtype": "float32", "gpu_memory_utilization": 0.2, "enforce_eager": True,
                    "gpus_per_model": 1, "max_prompt_tokens": 256},
        gsm8k={"enabled": True, "source": str(fixtures_dir / "gsm8k" / "test.jsonl"), "max_items": 3,
               "num_samples": 4, "k": [1, 4], "temperature": 1.0, "max_new_tokens": 16},
    )
    plan = EvalPlan(rows=[], constitutions=[], constitution_texts=[], generation_prompts=[], training_prompts=[],
                    gsm8k_items=load_gsm8k(cfg.gsm8k.source, "test", 3))
    gsm = model_outputs(cfg.models[0], cfg, plan)["gsm8k"]
    assert gsm["n"] == 3 and set(gsm["pass_at_k"]) == {1, 4}
    # one seed for the whole call gave 1 distinct sample of each problem's 4
    assert [item["distinct_samples"] for item in gsm["items"]] == [4, 4, 4]
