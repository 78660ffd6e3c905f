"""Log-probabilities of response tokens given prompt tokens, in memory linear in sequence length.

A naive `log_softmax(logits.float())` holds `[N, T, V]` float32 values: for a 32k vocabulary and 2k tokens
that is 256 MiB per sequence. `token_logprobs` runs the model body once for hidden states, then applies
the LM head and a float32 logsumexp to `chunk_size` positions at a time, keeping only the label's logit.
"""
from __future__ import annotations

import torch


def collate_sequences(
    prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int, include_eos: bool = True
) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids`, `attention_mask` `[N, T]` and `response_mask` `[N, T-1]`.

    `response_mask[n, t]` is 1 iff token t+1 of sequence n is a response token, so it lines up with
    `token_logprobs`. `response_ids` arrive with EOS appended; `include_eos=False` masks that last token.
    """
    if len(prompt_ids) != len(response_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(response_ids)} responses")
    lengths = [len(p) + len(r) for p, r in zip(prompt_ids, response_ids)]
    width = max(lengths)
    input_ids = torch.full((len(lengths), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(lengths), width), dtype=torch.long)
    response_mask = torch.zeros((len(lengths), width - 1), dtype=torch.long)
    for n, (prompt, response) in enumerate(zip(prompt_ids, response_ids)):
        if not prompt:
            raise ValueError(f"sequence {n} has an empty prompt: the first response token needs a context")
        input_ids[n, : lengths[n]] = torch.tensor(prompt + response, dtype=torch.long)
        attention_mask[n, : lengths[n]] = 1
        scored = len(response) - (0 if include_eos else 1)
        response_mask[n, len(prompt) - 1 : len(prompt) - 1 + max(scored, 0)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask}


def token_logprobs(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, chunk_size: int = 256
) -> torch.Tensor:
    """`log p(x_{t+1} | x_{<=t})` for every position, `[N, T-1]` float32, computed chunk by chunk."""
    body = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    head = model.get_output_embeddings()
    hidden = body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, :-1]
    labels = input_ids[:, 1:]
    scale = getattr(model.config, "logit_scale", None)  # a few architectures (e.g. Cohere) scale logits
    out = []
    for start in range(0, hidden.shape[1], chunk_size):
        logits = head(hidden[:, start : start + chunk_size]).float()
        if scale is not None:
            logits = logits * scale
        label_logits = logits.gather(-1, labels[:, start : start + chunk_size, None]).squeeze(-1)
        out.append(label_logits - torch.logsumexp(logits, dim=-1))
    return torch.cat(out, dim=1)


def sequence_logprobs(token_lp: torch.Tensor, response_mask: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Per-sequence response log-prob `[N]`: mean per response token (the paper's length normalisation) or sum."""
    mask = response_mask.to(token_lp.dtype)
    total = (token_lp * mask).sum(dim=-1)
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / mask.sum(dim=-1).clamp(min=1.0)
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
