"""Log-probabilities of response tokens given prompt tokens, without full-vocabulary float32 logits.

A naive `log_softmax(logits.float())` holds `[N, T, V]` float32 values: for a 32k vocabulary and 2k tokens
that is 256 MiB per sequence. `token_logprobs` runs the model body once for hidden states, then applies
the LM head and a float32 log-softmax to `chunk_size` positions at a time, keeping only the label's logit
(under autograd each chunk's logits stay saved for the backward pass).

`shared_prefix_logprobs` scores SAMI's C x C pairs of a query group with each prompt run once: one packed
sequence per prompt holds all C responses behind a block attention mask, and the head runs on response
tokens only, in chunks recomputed in the backward pass. `benchmarks/sami_scoring.py` measures both.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


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


def _label_logprobs(head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor, scale) -> torch.Tensor:
    """`log softmax(head(hidden))[label]` in float32 for a chunk of positions `[..., H]`."""
    logits = head(hidden).float()
    if scale is not None:  # a few architectures (e.g. Cohere) scale logits
        logits = logits * scale
    # cross_entropy's fused log-softmax and its backward take fewer passes over [*, V] than logsumexp + gather
    return -F.cross_entropy(logits.flatten(0, -2), labels.flatten(), reduction="none").view(labels.shape)


ChunkCount = Optional[Callable[[int], int]]


def chunk_starts(length: int, chunk_size: int, chunk_count: ChunkCount = None) -> range:
    """Where each chunk of `length` positions starts: one chunk per `chunk_size`, or as many as `chunk_count` turns
    that number into. Under ZeRO-3 every call of the LM head gathers its weight in a collective, so every rank must
    call it equally often whatever its data: the learner passes the largest count of every rank, and the chunks past
    a rank's end are empty (they score nothing and cost one call)."""
    count = -(-length // chunk_size)
    return range(0, (count if chunk_count is None else chunk_count(count)) * chunk_size, chunk_size)


def _body_and_head(model: torch.nn.Module):
    body = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    return body, model.get_output_embeddings(), getattr(model.config, "logit_scale", None)


def token_logprobs(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, chunk_size: int = 256,
    chunk_count: ChunkCount = None,
) -> torch.Tensor:
    """`log p(x_{t+1} | x_{<=t})` for every position, `[N, T-1]` float32, computed chunk by chunk (`chunk_starts`)."""
    body, head, scale = _body_and_head(model)
    hidden = body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, :-1]
    labels = input_ids[:, 1:]
    out = [_label_logprobs(head, hidden[:, start : start + chunk_size], labels[:, start : start + chunk_size], scale)
           for start in chunk_starts(hidden.shape[1], chunk_size, chunk_count)]
    return torch.cat(out, dim=1)


def pack_groups(
    groups: list[tuple[list[list[int]], list[list[int]]]], pad_id: int, include_eos: bool = True
) -> dict[str, torch.Tensor]:
    """One packed sequence per prompt: `[prompt_i, response_1, ..., response_C]` of its group, right-padded.

    `groups` holds (C prompts, C responses) per group. `segment` is 0 on the prompt, j + 1 on response j and
    -1 on padding; positions restart after the prompt for every response, so each response sits where it
    would in `[prompt_i, response_j]` alone. The scored tokens, flattened, are (`seq`, `pos`) -> `label`,
    the hidden state at `pos` predicting `label`, stored at (`row`, `col`) of the `[G*C*C, R]` output
    (rows group-major, (i, j) row-major as in `OBJECTIVES["sami"].pairs`); `response_mask` marks its tokens.
    """
    sequences, positions, segments, scored = [], [], [], []
    row = 0
    for prompts, responses in groups:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses in a group")
        for prompt in prompts:
            if not prompt:
                raise ValueError("a prompt is empty: the first response token needs a context")
            seq, pos, seg = list(prompt), list(range(len(prompt))), [0] * len(prompt)
            for j, response in enumerate(responses):
                start = len(seq)
                # token t of the response is predicted at the prompt's last token (t = 0) or at response token t-1
                sources = [len(prompt) - 1] + list(range(start, start + len(response) - 1))
                scored.append((len(sequences), sources, response, row, len(response) - (0 if include_eos else 1)))
                seq += response
                pos += range(len(prompt), len(prompt) + len(response))
                seg += [j + 1] * len(response)
                row += 1
            sequences.append(seq)
            positions.append(pos)
            segments.append(seg)
    width = max(map(len, sequences))
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(sequences), width), dtype=torch.long)
    segment = torch.full((len(sequences), width), -1, dtype=torch.long)
    for n, (seq, pos, seg) in enumerate(zip(sequences, positions, segments)):
        input_ids[n, : len(seq)], position_ids[n, : len(seq)], segment[n, : len(seq)] = (
            torch.tensor(seq), torch.tensor(pos), torch.tensor(seg))
    response_width = max(len(r) for _, _, r, _, _ in scored)
    response_mask = torch.zeros((row, response_width), dtype=torch.long)
    flat = {"seq": [], "pos": [], "label": [], "row": [], "col": []}
    for n, sources, response, r, kept in scored:
        response_mask[r, : max(kept, 0)] = 1
        flat["seq"] += [n] * len(response)
        flat["pos"] += sources
        flat["label"] += response
        flat["row"] += [r] * len(response)
        flat["col"] += range(len(response))
    return {"input_ids": input_ids, "position_ids": position_ids, "segment": segment, "response_mask": response_mask,
            **{k: torch.tensor(v, dtype=torch.long) for k, v in flat.items()}}


def block_attention_mask(segment: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive `[N, 1, T, T]` mask: causal, and a response token sees the prompt and its own response only."""
    width = segment.shape[1]
    causal = torch.ones((width, width), dtype=torch.bool, device=segment.device).tril()
    keys, queries = segment[:, None, :], segment[:, :, None]
    allowed = causal & ((keys == 0) | (keys == queries))  # padding (-1, at the end) sees prompt and padding only
    return torch.zeros(allowed.shape, dtype=dtype, device=segment.device).masked_fill_(
        ~allowed, torch.finfo(dtype).min)[:, None]


def _label_logprobs_and_kl(head, hidden, labels, scale, reference_head, reference_hidden, reference_scale):
    """(`log p(label)`, exact KL(p || p_ref) over the vocabulary) in float32 for a chunk of positions."""
    logp = torch.log_softmax(head(hidden).float() * (scale or 1.0), dim=-1)
    with torch.no_grad():
        reference_logp = torch.log_softmax(reference_head(reference_hidden).float() * (reference_scale or 1.0), dim=-1)
    kl = (logp.exp() * (logp - reference_logp)).sum(dim=-1)
    return logp.gather(-1, labels[..., None]).squeeze(-1), kl


def _packed_hidden(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """The body's hidden state at every scored position of a `pack_groups` batch, `[tokens, H]`."""
    body = _body_and_head(model)[0]
    mask = block_attention_mask(batch["segment"], next(body.parameters()).dtype)
    hidden = body(input_ids=batch["input_ids"], attention_mask=mask, position_ids=batch["position_ids"]).last_hidden_state
    return hidden[batch["seq"], batch["pos"]]


def shared_prefix_logprobs(
    model: torch.nn.Module, groups: list[tuple[list[list[int]], list[list[int]]]], pad_id: int,
    include_eos: bool = True, chunk_size: int = 512, chunk_count: ChunkCount = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token log-probs of every (prompt i, response j) pair of each group, running each prompt once.

    Returns `token_lp` `[G*C*C, R]` float32 (token t of response j given prompt i) and its `response_mask`,
    rows as in `pack_groups`. Equal, up to float rounding, to scoring `[prompt_i, response_j]` alone; the LM
    head runs on response tokens only, in chunks recomputed in the backward pass, so no `[*, V]` float32
    logits outlive one chunk. The model's attention must take a 4D additive mask (transformers' `sdpa` and
    `eager` do; `flash_attention_2` does not).
    """
    token_lp, response_mask, _ = _shared_prefix(model, groups, pad_id, include_eos, chunk_size, None, chunk_count)
    return token_lp, response_mask


def shared_prefix_logprobs_and_kl(
    model: torch.nn.Module, reference: torch.nn.Module, groups: list[tuple[list[list[int]], list[list[int]]]],
    pad_id: int, include_eos: bool = True, chunk_size: int = 512, chunk_count: ChunkCount = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`shared_prefix_logprobs`, plus `token_kl` `[G*C*C, R]`: the exact KL(model || reference) over the whole
    vocabulary at each scored position (the frozen `reference` gets no gradient), chunked the same way."""
    return _shared_prefix(model, groups, pad_id, include_eos, chunk_size, reference, chunk_count)


def _shared_prefix(model, groups, pad_id, include_eos, chunk_size, reference, chunk_count):
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in pack_groups(groups, pad_id, include_eos).items()}
    _, head, scale = _body_and_head(model)
    hidden, labels = _packed_hidden(model, batch), batch["label"]
    chunks = chunk_starts(len(labels), chunk_size, chunk_count)
    if reference is None:
        label_lp = [checkpoint(_label_logprobs, head, hidden[i : i + chunk_size], labels[i : i + chunk_size], scale,
                               use_reentrant=False) for i in chunks]
        kl = None
    else:
        with torch.no_grad():
            reference_hidden = _packed_hidden(reference, batch)
        _, reference_head, reference_scale = _body_and_head(reference)
        pieces = [checkpoint(_label_logprobs_and_kl, head, hidden[i : i + chunk_size], labels[i : i + chunk_size], scale,
                             reference_head, reference_hidden[i : i + chunk_size], reference_scale, use_reentrant=False)
                  for i in chunks]
        label_lp, kl = [p[0] for p in pieces], [p[1] for p in pieces]
    place = lambda values: torch.zeros(batch["response_mask"].shape, dtype=torch.float32, device=device).index_put(
        (batch["row"], batch["col"]), torch.cat(values))
    return place(label_lp), batch["response_mask"], None if kl is None else place(kl)


def sequence_logprobs(token_lp: torch.Tensor, response_mask: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Per-sequence response log-prob `[N]`: mean per response token (the paper's length normalisation) or sum."""
    mask = response_mask.to(token_lp.dtype)
    total = (token_lp * mask).sum(dim=-1)
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / mask.sum(dim=-1).clamp(min=1.0)
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
