"""The InfoNCE lower bound on I(Y; C | X) for a model: log C - SAMI loss on held-out query groups.

Each group is C training prompts (one per constitution) and the C responses the model sampled under
them; L[i, j] = mean per-token log p(y_j | c_i, x), scored with the training code's own functions.
`mi_lower_bound` batches an HF model; `mi_lower_bound_with` takes any scorer of one (prompt, response)
pair, such as a rollout engine's `sequence_logprob` (vLLM).
"""
from __future__ import annotations

from typing import Callable

import torch

from pipelines.logprobs import collate_sequences, sequence_logprobs, token_logprobs
from pipelines.objectives import sami_loss


def _group_ids(tokenizer, prompts: list[str], responses: list[str]) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids as training builds them: the prompt bare, the response after a space and ending in EOS."""
    p_ids = tokenizer(list(prompts), add_special_tokens=False).input_ids
    r_ids = [ids + [tokenizer.eos_token_id] for ids in tokenizer([" " + r for r in responses], add_special_tokens=False).input_ids]
    return p_ids, r_ids


def _check(groups) -> int:
    if not groups:
        raise ValueError("no query groups to compute the MI bound on")
    c = len(groups[0][0])
    if any(len(p) != c or len(r) != c for p, r in groups):
        raise ValueError(f"every group needs {c} prompts and {c} responses")
    return c


@torch.no_grad()
def mi_lower_bound(model, tokenizer, groups: list[tuple[list[str], list[str]]], batch_groups: int = 16) -> float:
    """Mean over groups of log C - loss; `groups` holds (training prompts, responses) pairs of equal length C."""
    c = _check(groups)
    bounds = []
    for start in range(0, len(groups), batch_groups):
        chunk = groups[start : start + batch_groups]
        prompts, responses = [], []
        for group_prompts, group_responses in chunk:
            p_ids, r_ids = _group_ids(tokenizer, group_prompts, group_responses)
            prompts += [p_ids[i] for i in range(c) for _ in range(c)]
            responses += [r_ids[j] for _ in range(c) for j in range(c)]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        batch = collate_sequences(prompts, responses, pad)
        device = next(model.parameters()).device
        token_lp = token_logprobs(model, batch["input_ids"].to(device), batch["attention_mask"].to(device))
        seq = sequence_logprobs(token_lp, batch["response_mask"].to(device)).view(len(chunk), c, c)
        bounds.append(sami_loss(seq).mi_lower_bound.item() * len(chunk))
    return sum(bounds) / len(groups)


def mi_lower_bound_with(score: Callable[[list[int], list[int]], float], tokenizer,
                        groups: list[tuple[list[str], list[str]]]) -> float:
    """The same bound from a pair scorer `score(prompt_ids, response_ids)` -> mean log-prob per token."""
    c = _check(groups)
    matrices = []
    for group_prompts, group_responses in groups:
        p_ids, r_ids = _group_ids(tokenizer, group_prompts, group_responses)
        matrices.append([[score(p_ids[i], r_ids[j]) for j in range(c)] for i in range(c)])
    return sami_loss(torch.tensor(matrices, dtype=torch.float64)).mi_lower_bound.item()
