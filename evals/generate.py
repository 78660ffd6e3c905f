"""Phase 2, generate: everything the evaluation job needs from one model, produced by one Ray actor that loads it once.

The engine is the training job's own rollout engine: `hf` (transformers generate, CPU or GPU) or `vllm`
(GPU; pip install -e .[vllm]). Per model the actor returns a `ModelOutputs`:
- responses to every held-out query under each of its C constitutions (the positive one first),
- the MI bound on those groups (the model's log-probs under the training prompts), per group and its mean,
- responses to the held-out-principle queries under their positive constitution (world adherence),
- MT-Bench answers (both turns) and GSM8K greedy / sampled completions when those benchmarks are on.
They are saved under `responses/` before judging (`save_outputs`), so `--judge-only` can judge them again
(`load_outputs`).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from evals.config import EvalConfig, EvalModel
from evals.log import log
from evals.plan import EvalPlan
from sami.config import ConfigError, ModelConfig, SamplingConfig
from sami.jsonl import read_jsonl, write_jsonl
from sami.rollout_engines import RolloutEngine, make_engine


@dataclass
class ModelOutputs:
    """What one model answered; None where that benchmark is off."""

    responses: list[list[str]]  # per held-out query, C responses (the positive constitution's first)
    heldout_principle_responses: list[str] | None = None
    mi_bounds: list[float] | None = None  # per group
    mtbench_answers: list | None = None  # `evals.mtbench.Answer`s
    gsm8k: dict | None = None
    seconds: float = 0.0

    @property
    def mi_lower_bound(self) -> float | None:
        return sum(self.mi_bounds) / len(self.mi_bounds) if self.mi_bounds else None

    @property
    def positive_responses(self) -> list[str]:
        return [r[0] for r in self.responses]


def engine_model_config(model: EvalModel, cfg: EvalConfig) -> ModelConfig:
    """The model section of the evaluation's engine: its response budget is the longest any enabled benchmark
    asks for (vLLM cuts every request at its context length, silently)."""
    budgets = [cfg.generation.sampling.max_new_tokens]
    budgets += [cfg.mtbench.max_new_tokens] if cfg.mtbench.enabled else []
    budgets += [cfg.gsm8k.max_new_tokens] if cfg.gsm8k.enabled else []
    gen = cfg.generation
    return ModelConfig(name_or_path=model.path, dtype=gen.dtype, max_prompt_tokens=gen.max_prompt_tokens,
                       max_response_tokens=max(budgets), trust_remote_code=gen.trust_remote_code)


def load_engine(model: EvalModel, cfg: EvalConfig) -> RolloutEngine:
    return make_engine(model.path, cfg.generation, engine_model_config(model, cfg))


def generate(engine: RolloutEngine, prompts: list[str], sampling: SamplingConfig, seed: int) -> list[str]:
    """One stripped completion per prompt."""
    return [c.text.strip() for c in engine.generate(prompts, sampling, seed)]


def chat_renderer(tokenizer):
    """MT-Bench conversations as prompts: the tokenizer's chat template, or a plain transcript for base models."""
    from evals.mtbench import plain_transcript

    if getattr(tokenizer, "chat_template", None):
        return lambda messages: tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return plain_transcript


def greedy(cfg: EvalConfig, max_new_tokens: int) -> SamplingConfig:
    return SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens, batch_size=cfg.generation.sampling.batch_size)


def query_responses(engine: RolloutEngine, cfg: EvalConfig, plan: EvalPlan) -> list[list[str]]:
    """One call per constitution position, each with its own seed, so every model sees the same sampling noise."""
    c = len(plan.groups[0].generation_prompts) if plan.groups else 0
    seed, sampling = cfg.run.seed, cfg.generation.sampling
    by_position = [generate(engine, [g.generation_prompts[i] for g in plan.groups], sampling, seed + i) for i in range(c)]
    return [[by_position[i][q] for i in range(c)] for q in range(len(plan.groups))]


def benchmark_outputs(engine: RolloutEngine, model: EvalModel, cfg: EvalConfig, plan: EvalPlan, out: ModelOutputs) -> None:
    """MT-Bench answers and GSM8K completions, where those benchmarks are on."""
    seed = cfg.run.seed
    if cfg.mtbench.enabled:
        from evals.mtbench import generate_answers

        sampling = greedy(cfg, cfg.mtbench.max_new_tokens)
        out.mtbench_answers = generate_answers(lambda prompts: generate(engine, prompts, sampling, seed),
                                               plan.mtbench_questions, model.name, render=chat_renderer(engine.tokenizer))
    if cfg.gsm8k.enabled:
        from evals.gsm8k import evaluate_gsm8k

        g = cfg.gsm8k
        sampled = SamplingConfig(temperature=g.temperature, max_new_tokens=g.max_new_tokens,
                                 batch_size=cfg.generation.sampling.batch_size)
        choice = {True: greedy(cfg, g.max_new_tokens), False: sampled}
        out.gsm8k = evaluate_gsm8k(lambda prompts, is_greedy: generate(engine, prompts, choice[is_greedy], seed),
                                   plan.gsm8k_items, n_samples=g.num_samples, k_values=tuple(g.k))


def model_outputs(model: EvalModel, cfg: EvalConfig, plan: EvalPlan) -> ModelOutputs:
    """Everything one model answers (see module doc)."""
    from evals.mi_bound import mi_bounds

    started = time.time()
    engine = load_engine(model, cfg)
    out = ModelOutputs(query_responses(engine, cfg, plan))
    if plan.heldout_principle:
        c = len(plan.groups[0].generation_prompts) if plan.groups else 0
        out.heldout_principle_responses = generate(engine, [g.generation_prompts[0] for g in plan.heldout_principle],
                                                   cfg.generation.sampling, cfg.run.seed + c)
    if cfg.mi_bound.enabled and out.responses:
        groups = [(g.training_prompts(cfg.data.task), r) for g, r in zip(plan.groups, out.responses)]
        out.mi_bounds = mi_bounds(engine, groups, cfg.generation.max_prompt_tokens, cfg.generation.sampling.max_new_tokens)
    benchmark_outputs(engine, model, cfg, plan, out)
    out.seconds = time.time() - started
    return out


class ModelWorker:
    """The body of the Ray actor that evaluates one model (`generate_all`): an actor, not a task, so a vLLM
    engine built here uses the actor's placement group instead of reserving its GPUs again."""

    def outputs(self, model: EvalModel, cfg: EvalConfig, plan: EvalPlan) -> ModelOutputs:
        return model_outputs(model, cfg, plan)


def model_placement(name: str, cfg: EvalConfig):
    """(placement group request, actor options) of one model's actor, on `role: rollout` nodes where the cluster has
    roles: a vLLM engine's group (one GPU per tensor-parallel rank), or one bundle of `generation.cpus_per_model` CPUs
    and `gpus_per_model` GPUs for hf."""
    from actors.placement import ROLLOUT, role_selector
    from actors.rollout import engine_placement

    g = cfg.generation
    return engine_placement(f"model {name}", g.engine, g.tensor_parallel_size, 1.0 if g.engine == "vllm" else g.gpus_per_model,
                            g.cpus_per_model, role_selector(ROLLOUT))


def start_workers(cfg: EvalConfig, plan: EvalPlan) -> tuple[dict, dict, dict]:
    """(pending call -> model name, model name -> actor, model name -> placement group), every model at once."""
    import ray

    worker, plan_ref = ray.remote(ModelWorker), ray.put(plan)
    pending, actors, groups = {}, {}, {}
    for m in cfg.models:
        request, options = model_placement(m.name, cfg)
        groups[m.name] = request.group
        actors[m.name] = worker.options(max_restarts=0, max_task_retries=0, **options).remote()
        pending[actors[m.name].outputs.remote(m, cfg, plan_ref)] = m.name
    return pending, actors, groups


def generate_all(cfg: EvalConfig, plan: EvalPlan) -> dict[str, ModelOutputs]:
    """One Ray actor per model, all at once. Each holds a placement group of its own, as a rollout actor does (a
    vLLM engine's GPUs reserved once: vLLM captures an actor's group, never a task's, and would reserve as many
    again), released when the model is done."""
    import ray
    from ray.util.placement_group import remove_placement_group

    pending, actors, groups = start_workers(cfg, plan)
    outputs = {}
    try:
        while pending:
            (done,), _ = ray.wait(list(pending), num_returns=1)
            name = pending.pop(done)
            try:
                outputs[name] = ray.get(done)
            except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError) as e:
                path = next(m.path for m in cfg.models if m.name == name)
                raise ConfigError(f"model {name!r} ({path}) could not be evaluated: {getattr(e, 'cause', None) or e!r}") from None
            finally:
                ray.kill(actors.pop(name))
                if name in groups:
                    remove_placement_group(groups.pop(name))
            log(f"generate: {name} done in {outputs[name].seconds:.0f}s ({len(outputs)}/{len(cfg.models)} models)")
    finally:
        for actor in actors.values():
            ray.kill(actor)
        for pg in groups.values():
            remove_placement_group(pg)
    return {m.name: outputs[m.name] for m in cfg.models}


def words(text: str) -> int:
    return len(text.split())


def response_records(groups, responses: list[str], with_length: bool) -> list[dict]:
    """One row per query: its positive constitution and prompt, the model's response (and its length in words)."""
    return [{"query_id": g.query_id, "query": g.query, "constitution": g.constitutions[0],
             "prompt": g.generation_prompts[0], "response": r, **({"length_words": words(r)} if with_length else {})}
            for g, r in zip(groups, responses)]


def save_outputs(cfg: EvalConfig, plan: EvalPlan, outputs: dict[str, ModelOutputs], out: Path) -> None:
    """What judging needs from each model, written before judging so `--judge-only` can judge it again:
    responses/<model>.jsonl (one row per query), responses/<model>.json (its figures), MT-Bench answers."""
    from evals.mtbench import write_answers

    for m in cfg.models:
        o = outputs[m.name]
        write_jsonl(out / "responses" / f"{m.name}.jsonl", response_records(plan.groups, o.positive_responses, True))
        if plan.heldout_principle:
            write_jsonl(out / "responses" / f"{m.name}.heldout-principle.jsonl",
                        response_records(plan.heldout_principle, o.heldout_principle_responses, False))
        (out / "responses" / f"{m.name}.json").write_text(json.dumps(
            {"path": m.path, "mi_lower_bound": o.mi_lower_bound, "mi_bounds": o.mi_bounds, "gsm8k": o.gsm8k,
             "seconds": o.seconds}))
        if o.mtbench_answers is not None:
            write_answers(str(out / "mtbench" / "model_answer" / f"{m.name}.jsonl"), o.mtbench_answers)


def saved_responses(path: Path, groups) -> list[str]:
    """The responses `save_outputs` wrote to `path`, checked to answer `groups`' queries and constitutions."""
    if not path.is_file():
        raise ConfigError(f"--judge-only: no saved responses {path}; run once without --judge-only")
    saved = read_jsonl(path)
    if [(r["query_id"], r["constitution"]) for r in saved] != [(g.query_id, g.constitutions[0]) for g in groups]:
        raise ConfigError(f"--judge-only: {path} answers other queries or constitutions than this config asks "
                          f"for; run without --judge-only to generate again")
    return [r["response"] for r in saved]


def load_outputs(cfg: EvalConfig, plan: EvalPlan, out: Path) -> dict[str, ModelOutputs]:
    """`--judge-only`: each model's outputs as `save_outputs` wrote them, checked against this config's plan."""
    from evals.mtbench import read_answers

    outputs = {}
    for m in cfg.models:
        figures_path = out / "responses" / f"{m.name}.json"
        if not figures_path.is_file():
            raise ConfigError(f"--judge-only: no saved responses for model {m.name!r} ({figures_path}); run once "
                              f"without --judge-only")
        figures = json.loads(figures_path.read_text())
        if figures["path"] != m.path:
            raise ConfigError(f"--judge-only: {figures_path} answers another model ({figures['path']}) than this "
                              f"config asks for; run without --judge-only to generate again")
        responses = saved_responses(out / "responses" / f"{m.name}.jsonl", plan.groups)
        heldout = plan.heldout_principle and saved_responses(out / "responses" / f"{m.name}.heldout-principle.jsonl",
                                                             plan.heldout_principle)
        answers = out / "mtbench" / "model_answer" / f"{m.name}.jsonl"
        outputs[m.name] = ModelOutputs(
            [[r] for r in responses], heldout or None, figures["mi_bounds"],
            list(read_answers(str(answers)).values()) if cfg.mtbench.enabled else None, figures["gsm8k"], figures["seconds"])
    return outputs
