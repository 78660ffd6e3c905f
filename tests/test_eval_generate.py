"""The evaluation's generation phase without Ray: what one model answers and the MI bound it scores."""
import pytest

from evals.config import EvalConfig
from evals.generate import engine_model_config
from evals.plan import EvalPlan
from sami.config import SamplingConfig
from sami.groups import QueryGroup
from sami.rollout_engines import HFEngine, RolloutEngine, max_model_len

LONG = "".join(f"{i}. Be polite, be concise and name the river.\n" for i in range(1, 9))


class VLLMLengthRule(RolloutEngine):
    """An HF engine's answers and scores behind the one vLLM rule this test is about: a prompt of `max_model_len`
    tokens or more is refused (vLLM 0.33 vllm/v1/engine/input_processor.py `_validate_prompt_len`; HF accepts it).
    vLLM itself cannot run in this suite; the vLLM lane runs the real engine."""

    def __init__(self, hf: HFEngine, limit: int):
        self.hf, self.tokenizer, self.limit = hf, hf.tokenizer, limit

    def generate(self, prompts: list[str], sampling: SamplingConfig, seeds):
        return self.hf.generate(prompts, sampling, seeds)

    def sequence_logprob(self, prompt_ids: list[int], response_ids: list[int]) -> float:
        if len(prompt_ids) + len(response_ids) >= self.limit:
            raise ValueError(f"The decoder prompt (length {len(prompt_ids) + len(response_ids)}) is longer than the "
                             f"maximum model length of {self.limit}")
        return self.hf.sequence_logprob(prompt_ids, response_ids)


@pytest.mark.timeout(120)
def test_the_mi_bound_on_vllm_cuts_training_prompts_as_training_does(tiny_model_dir, monkeypatch, one_thread):
    """Training prompts longer than generation.max_prompt_tokens: vLLM scores them cut to their last
    max_prompt_tokens tokens (as the learner does), and the bound equals the HF engine's batched one."""
    import evals.generate as generate
    from evals.mi_bound import mi_bounds

    cfg = EvalConfig(models=[{"name": "m", "path": str(tiny_model_dir)}], win_rates={"enabled": False},
                     generation={"max_prompt_tokens": 16, "sampling": {"max_new_tokens": 6, "batch_size": 4}})
    model_cfg = engine_model_config(cfg.models[0], cfg)
    hf = HFEngine(str(tiny_model_dir), model_cfg)
    queries = ["Tell me about the river.", "Tell me about the mountain."]
    plan = EvalPlan([QueryGroup(f"q{i}", q, constitutions=[LONG + "Be kind.", LONG + "Be rude."],
                                generation_prompts=[f"{q} kind", f"{q} rude"]) for i, q in enumerate(queries)])
    training = [g.training_prompts(cfg.data.task) for g in plan.groups]
    assert min(len(hf.tokenizer(p).input_ids) for g in training for p in g) > 2 * model_cfg.max_prompt_tokens
    monkeypatch.setattr(generate, "load_engine", lambda model, cfg: VLLMLengthRule(hf, max_model_len(model_cfg)))
    out = generate.model_outputs(cfg.models[0], cfg, plan)

    groups = list(zip(training, out.responses))
    cut = mi_bounds(hf, groups, model_cfg.max_prompt_tokens, cfg.generation.sampling.max_new_tokens)
    assert out.mi_bounds == pytest.approx(cut, abs=1e-5) and len(cut) == 2
    assert out.mi_lower_bound == pytest.approx(sum(cut) / 2)
    assert mi_bounds(hf, groups) != pytest.approx(cut, rel=0.05)  # the cut changed what was scored
