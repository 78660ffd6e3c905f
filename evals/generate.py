"""Everything the evaluation job needs from one model, produced by one Ray actor that loads it once.

The engine is the training job's own rollout engine: `hf` (transformers generate, CPU or GPU) or `vllm`
(GPU; pip install -e .[vllm]). Per model the task returns
- responses to every held-out query under each of its C constitutions (the positive one first),
- the MI bound on those groups (the model's log-probs under the training prompts), per group and its mean,
- responses to the held-out-principle queries under their positive constitution (world adherence),
- MT-Bench answers (both turns) and GSM8K greedy / sampled completions when those benchmarks are on.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from evals.config import EvalConfig, EvalModel
from sami.config import ModelConfig, SamplingConfig
from sami.rollout_engines import make_engine


@dataclass
class HeldoutPrincipleItems:
    """Queries whose positive constitution also states the held-out principle(s); only that prompt is answered."""

    rows: list[dict]
    constitutions: list  # the positive `Constitution` per query
    constitution_texts: list[str]
    generation_prompts: list[str]


@dataclass
class EvalPlan:
    """What every model is asked, built once on the driver."""

    rows: list[dict]  # held-out queries: {"query_id", "query", "subject"}
    constitutions: list[list]  # per query, C `Constitution`s, the positive one first
    constitution_texts: list[list[str]]  # per query, C rendered constitutions, the positive one first
    generation_prompts: list[list[str]]  # per query, C prompts the model answers
    training_prompts: list[list[str]]  # per query, C prompts the MI bound scores under
    mtbench_questions: list = field(default_factory=list)
    gsm8k_items: list[dict] = field(default_factory=list)
    heldout_principle: HeldoutPrincipleItems | None = None


def engine_model_config(model: EvalModel, cfg: EvalConfig) -> ModelConfig:
    """The model section of the evaluation's engine: its response budget is the longest any enabled benchmark
    asks for (vLLM cuts every request at its context length, silently)."""
    budgets = [cfg.generation.sampling.max_new_tokens]
    budgets += [cfg.mtbench.max_new_tokens] if cfg.mtbench.enabled else []
    budgets += [cfg.gsm8k.max_new_tokens] if cfg.gsm8k.enabled else []
    gen = cfg.generation
    return ModelConfig(name_or_path=model.path, dtype=gen.dtype, max_prompt_tokens=gen.max_prompt_tokens,
                       max_response_tokens=max(budgets), trust_remote_code=gen.trust_remote_code)


def load_engine(model: EvalModel, cfg: EvalConfig):
    return make_engine(model.path, cfg.generation, engine_model_config(model, cfg))


def generate(engine, prompts: list[str], sampling: SamplingConfig, seed: int) -> list[str]:
    """One stripped completion per prompt."""
    return [c.text.strip() for c in engine.generate(prompts, sampling, seed)]


def chat_renderer(tokenizer):
    """MT-Bench conversations as prompts: the tokenizer's chat template, or a plain transcript for base models."""
    from evals.mtbench import plain_transcript

    if getattr(tokenizer, "chat_template", None):
        return lambda messages: tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return plain_transcript


def model_outputs(model: EvalModel, cfg: EvalConfig, plan: EvalPlan) -> dict:
    """{"responses", "mi_lower_bound", "mi_bounds", "heldout_principle_responses", "mtbench_answers", "gsm8k",
    "seconds"} for one model (see module doc)."""
    from evals.mi_bound import mi_bounds

    started = time.time()
    engine = load_engine(model, cfg)
    seed, sampling = cfg.run.seed, cfg.generation.sampling
    c = len(plan.generation_prompts[0]) if plan.generation_prompts else 0
    # One call per constitution position, each with its own seed, so every model sees the same sampling noise.
    by_position = [generate(engine, [p[i] for p in plan.generation_prompts], sampling, seed + i) for i in range(c)]
    responses = [[by_position[i][q] for i in range(c)] for q in range(len(plan.rows))]
    out = {"responses": responses, "mi_lower_bound": None, "mi_bounds": None, "heldout_principle_responses": None,
           "mtbench_answers": None, "gsm8k": None}
    if plan.heldout_principle:
        out["heldout_principle_responses"] = generate(engine, plan.heldout_principle.generation_prompts, sampling, seed + c)
    if cfg.mi_bound.enabled and responses:
        groups = list(zip(plan.training_prompts, responses))
        out["mi_bounds"] = mi_bounds(engine, groups, cfg.generation.max_prompt_tokens, sampling.max_new_tokens)
        out["mi_lower_bound"] = sum(out["mi_bounds"]) / len(out["mi_bounds"])
    if cfg.mtbench.enabled:
        from evals.mtbench import generate_answers

        mt_sampling = SamplingConfig(temperature=0.0, max_new_tokens=cfg.mtbench.max_new_tokens,
                                     batch_size=sampling.batch_size)
        out["mtbench_answers"] = generate_answers(lambda prompts: generate(engine, prompts, mt_sampling, seed),
                                                  plan.mtbench_questions, model.name, render=chat_renderer(engine.tokenizer))
    if cfg.gsm8k.enabled:
        from evals.gsm8k import evaluate_gsm8k

        g = cfg.gsm8k
        greedy = SamplingConfig(temperature=0.0, max_new_tokens=g.max_new_tokens, batch_size=sampling.batch_size)
        sampled = SamplingConfig(temperature=g.temperature, max_new_tokens=g.max_new_tokens, batch_size=sampling.batch_size)
        out["gsm8k"] = evaluate_gsm8k(lambda prompts, is_greedy: generate(engine, prompts, greedy if is_greedy else sampled, seed),
                                      plan.gsm8k_items, n_samples=g.num_samples, k_values=tuple(g.k))
    out["seconds"] = time.time() - started
    return out


class ModelWorker:
    """The body of the Ray actor that evaluates one model (`evals.run.generate_all`): an actor, not a task, so
    a vLLM engine built here uses the actor's placement group instead of reserving its GPUs again."""

    def outputs(self, model: EvalModel, cfg: EvalConfig, plan: EvalPlan) -> dict:
        return model_outputs(model, cfg, plan)
