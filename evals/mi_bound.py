"""The InfoNCE lower bound on I(Y; C | X) for a model: log C - SAMI loss on held-out query groups.

Each group is C training prompts (one per constitution) and the C responses the model sampled under
them; L[i, j] = mean per-token log p(y_j | c_i, x), scored with the training code's own functions.
"""
from __future__ import annotations

import torch

from pipelines.logprobs import collate_sequences, sequence_logprobs, token_logprobs
from pipelines.objectives import sami_loss


@torch.no_grad()
def mi_lower_bound(model, tokenizer, groups: list[tuple[list[str], list[str]]], batch_groups: int = 16) -> float:
    """Mean over groups of log C - loss; `groups` holds (training prompts, responses) pairs of equal length C."""
    c = len(groups[0][0])
    bounds = []
    for start in range(0, len(groups), batch_groups):
        chunk = groups[start : start + batch_groups]
        prompts, responses = [], []
        for group_prompts, group_responses in chunk:
            p_ids = tokenizer(list(group_prompts), add_special_tokens=False).input_ids
            r_ids = [ids + [tokenizer.eos_token_id] for ids in tokenizer([" " + r for r in group_responses], add_special_tokens=False).input_ids]
            prompts += [p_ids[i] for i in range(c) for _ in range(c)]
            responses += [r_ids[j] for _ in range(c) for j in range(c)]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        batch = collate_sequences(prompts, responses, pad)
        device = next(model.parameters()).device
        token_lp = token_logprobs(model, batch["input_ids"].to(device), batch["attention_mask"].to(device))
        seq = sequence_logprobs(token_lp, batch["response_mask"].to(device)).view(len(chunk), c, c)
        bounds.append(sami_loss(seq).mi_lower_bound.item() * len(chunk))
    return sum(bounds) / len(groups)
