"""Scoring a model in the built-in world: adherence per principle, the held-out principle, the MI bound,
response length and the pairwise win rate against the base model, all on queries training never saw."""
from __future__ import annotations

import random
from dataclasses import dataclass

from sami.config import ModelConfig, SamplingConfig
from sami.constitutions import Constitution, render_constitution, sample_constitutions
from sami.prompts import training_prompt
from sami.world import grammar, rules


@dataclass(frozen=True)
class EvalItem:
    query: grammar.Query
    constitution: Constitution  # the positive constitution the response is judged against
    contrast: Constitution  # a contrastive constitution for the MI bound
    prompt: str
    contrast_prompt: str


def eval_set(n: int, seed: int, heldout: bool = False) -> list[EvalItem]:
    """`n` items on fresh queries; with `heldout`, each positive constitution states the held-out principle."""
    rng = random.Random(f"world-eval-{seed}-{heldout}")
    items = []
    for _ in range(n):
        query = grammar.sample_query(rng)
        if heldout:
            names = sorted(rng.sample([p.name for p in rules.TRAINING_PRINCIPLES], 2) + list(rules.HELDOUT_PRINCIPLES))
            positive = Constitution(tuple((name, True) for name in names))
            contrast = Constitution(tuple((name, False) for name in names))
        else:
            positive, contrast = sample_constitutions(rules.TRAINING_PRINCIPLES, 2, "sample_k", rng, k=3)
        render = lambda c: training_prompt("world", render_constitution(c, grammar.LIBRARY, rng), query.text)
        items.append(EvalItem(query, positive, contrast, render(positive), render(contrast)))
    return items


# As training samples: the world's responses are short and the judge reads the model's own distribution.
SAMPLING = SamplingConfig(temperature=1.0, max_new_tokens=40, batch_size=64)


def evaluate_model(model_path: str, items: list[EvalItem], heldout_items: list[EvalItem], seed: int,
                   base_responses: list[str] | None = None) -> tuple[dict, list[str]]:
    """(metrics, the responses to `items`); win rate is against `base_responses` (0.5 when None)."""
    from evals.generate import generate
    from evals.mi_bound import mi_lower_bound
    from sami.rollout_engines import HFEngine

    engine = HFEngine(model_path, ModelConfig(name_or_path=model_path), device="cpu")
    responses = generate(engine, [i.prompt for i in items], SAMPLING, seed)
    contrast_responses = generate(engine, [i.contrast_prompt for i in items], SAMPLING, seed + 1)
    heldout_responses = generate(engine, [i.prompt for i in heldout_items], SAMPLING, seed + 2)

    per_principle: dict[str, list[bool]] = {}
    for item, response in zip(items, responses):
        for name, ok in rules.adherence(response, item.query.subject, item.constitution).items():
            per_principle.setdefault(name, []).append(ok)
    held = [rules.adherence(r, i.query.subject, i.constitution)[name]
            for i, r in zip(heldout_items, heldout_responses) for name in rules.HELDOUT_PRINCIPLES]
    groups = [([i.prompt, i.contrast_prompt], [a, b]) for i, a, b in zip(items, responses, contrast_responses)]
    wins = None
    if base_responses is not None:
        scores = [rules.adherence_score(r, i.query.subject, i.constitution) for i, r in zip(items, responses)]
        base = [rules.adherence_score(r, i.query.subject, i.constitution) for i, r in zip(items, base_responses)]
        wins = [1.0 if s > b else 0.0 if b > s else 0.5 for s, b in zip(scores, base)]
    metrics = {
        "adherence": sum(rules.adherence_score(r, i.query.subject, i.constitution) for i, r in zip(items, responses)) / len(items),
        "adherence_per_principle": {k: sum(v) / len(v) for k, v in sorted(per_principle.items())},
        "adherence_heldout": sum(held) / len(held),
        "well_formed": sum(map(rules.well_formed, responses)) / len(responses),
        "mi_lower_bound": mi_lower_bound(engine.model, engine.tokenizer, groups),
        "mean_length": sum(len(rules.words(r)) for r in responses) / len(responses),
        "win_rate_vs_base": sum(wins) / len(wins) if wins is not None else 0.5,
        "win_scores": wins,
    }
    return metrics, responses
