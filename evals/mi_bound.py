"""The InfoNCE lower bound on I(Y; C | X) for a model: log C - SAMI loss on held-out query groups.

Each group is C training prompts (one per constitution) and the C responses the model sampled under
them; L[i, j] = mean per-token log p(y_j | c_i, x), tokenised, laid out and scored by the training code's own
functions (`sami.groups.tokenise_pairs`, the `sami` objective's pairs, `sami.learner.score_groups`).
`mi_bounds` batches an HF model; `mi_bounds_with` takes any scorer of one (prompt, response) pair, such as
a rollout engine's `sequence_logprob` (vLLM). Both give one bound per group (the evaluation's intervals
resample groups); their mean is the `mi_lower_bound` the evaluation reports, the figure training reports for a batch.
"""
from __future__ import annotations

from typing import Callable

import torch

from sami.groups import QueryGroup, padding_id, tokenise_pairs
from sami.learner import score_groups
from sami.logprobs import sequence_logprobs
from sami.objectives import OBJECTIVES, pair_sequences, sami_loss, scoring


def _tokenised(tokenizer, prompts: list[str], responses: list[str]) -> QueryGroup:
    """One held-out group tokenised exactly as training tokenises its groups."""
    prompt_ids, response_ids = tokenise_pairs(tokenizer, prompts, responses)
    return QueryGroup(query_id="", query="", prompt_ids=prompt_ids, response_ids=response_ids)


def _check(groups) -> int:
    if not groups:
        raise ValueError("no query groups to compute the MI bound on")
    c = len(groups[0][0])
    if any(len(p) != c or len(r) != c for p, r in groups):
        raise ValueError(f"every group needs {c} prompts and {c} responses")
    return c


def _per_group(matrices: torch.Tensor) -> list[float]:
    """log C - loss of each [C, C] matrix; their mean is the bound of the whole batch."""
    return [sami_loss(matrix).mi_lower_bound.item() for matrix in matrices]


@torch.no_grad()
def mi_bounds(model, tokenizer, groups: list[tuple[list[str], list[str]]], batch_groups: int = 16) -> list[float]:
    """log C - loss per group; `groups` holds (training prompts, responses) pairs of equal length C."""
    c, pad, device = _check(groups), padding_id(tokenizer), next(model.parameters()).device
    bounds = []
    for start in range(0, len(groups), batch_groups):
        chunk = groups[start : start + batch_groups]
        token_lp, mask, _ = score_groups(model, [_tokenised(tokenizer, p, r) for p, r in chunk], scoring("sami", c),
                                         pad, True, device)
        bounds += _per_group(sequence_logprobs(token_lp, mask).view(len(chunk), c, c))
    return bounds


def mi_bounds_with(score: Callable[[list[int], list[int]], float], tokenizer,
                   groups: list[tuple[list[str], list[str]]]) -> list[float]:
    """The same bounds from a pair scorer `score(prompt_ids, response_ids)` -> mean log-prob per token."""
    c = _check(groups)
    matrices = []
    for group_prompts, group_responses in groups:
        group = _tokenised(tokenizer, group_prompts, group_responses)
        prompts, responses = pair_sequences([group], OBJECTIVES["sami"].pairs(c))
        matrices.append([score(p, r) for p, r in zip(prompts, responses)])
    return _per_group(torch.tensor(matrices, dtype=torch.float64).view(-1, c, c))
