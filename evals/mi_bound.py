"""The InfoNCE lower bound on I(Y; C | X) for a model: log C - SAMI loss on held-out query groups.

Each group is C training prompts (one per constitution) and the C responses the model sampled under
them; L[i, j] = mean per-token log p(y_j | c_i, x), tokenised and cut as training tokenises its groups
(`sami.groups.tokenise_pairs` with the prompt and response limits), laid out as the `sami` objective scores them (`scoring("sami", C)`)
and scored by the engine (`RolloutEngine.pair_logprobs`: the learner's own batched scoring for HF, one pair
at a time for vLLM, which refuses a sequence of `max_model_len` tokens or more). One bound per group (the
evaluation's intervals resample groups); their mean is the `mi_lower_bound` the evaluation reports, the
figure training reports for a batch.
"""
from __future__ import annotations

from sami.groups import QueryGroup, tokenise_pairs
from sami.objectives import sami_loss, scoring
from sami.rollout_engines import RolloutEngine


def mi_bounds(engine: RolloutEngine, groups: list[tuple[list[str], list[str]]], max_prompt_tokens: int | None = None,
              max_response_tokens: int | None = None) -> list[float]:
    """log C - loss per group; `groups` holds (training prompts, responses) pairs of equal length C. Prompts
    keep their last `max_prompt_tokens` tokens, responses their first `max_response_tokens` (as in training)."""
    if not groups:
        raise ValueError("no query groups to compute the MI bound on")
    c = len(groups[0][0])
    if any(len(p) != c or len(r) != c for p, r in groups):
        raise ValueError(f"every group needs {c} prompts and {c} responses")
    tokenised = []
    for prompts, responses in groups:
        prompt_ids, response_ids = tokenise_pairs(engine.tokenizer, prompts, responses, max_prompt_tokens,
                                                  max_response_tokens)
        tokenised.append(QueryGroup(query_id="", query="", prompt_ids=prompt_ids, response_ids=response_ids))
    matrices = engine.pair_logprobs(tokenised, scoring("sami", c)).view(len(groups), c, c)
    return [sami_loss(matrix).mi_lower_bound.item() for matrix in matrices]
