"""Scoring query groups: token log-probs of their (prompt, response) pairs as an objective lays them out, and the
loss step of a micro-batch. The learner trains through it and the rollout engines score with it (the evaluation's
MI bound, the probe), so both read the same numbers.

`PolicyLoss` is the module the learner hands DeepSpeed: its forward is the loss step, so every micro-batch goes
through `DeepSpeedEngine.forward`, the only place ZeRO-3 counts its micro-steps (without it each micro-batch's
gradient overwrites the last one's), prefetches parameters and checks that every rank calls modules in one order.
"""
from __future__ import annotations

import torch

from sami.config import TrainConfig
from sami.groups import QueryGroup
from sami.logprobs import (ChunkCount, collate_sequences, shared_prefix_logprobs, shared_prefix_logprobs_and_kl,
                           token_logprobs)
from sami.objectives import OBJECTIVES, ScoredPairs, Scoring, pair_sequences


def score(module, prompts: list[list[int]], responses: list[list[int]], pad_id: int, include_eos: bool, device,
          chunk_count: ChunkCount = None):
    """(token log-probs, response mask) of the (prompt, response) sequences, right-padded into one batch."""
    batch = {k: v.to(device) for k, v in collate_sequences(prompts, responses, pad_id, include_eos).items()}
    return token_logprobs(module, batch["input_ids"], batch["attention_mask"], chunk_count=chunk_count), \
        batch["response_mask"]


def forward_tokens(groups: list[QueryGroup], scoring: Scoring) -> tuple[int, int]:
    """(real tokens, tokens with padding) of the one batch `score_groups` runs for `groups` under `scoring`."""
    if scoring.layout == "pairs":
        lengths = [len(g.prompt_ids[i]) + len(g.response_ids[j]) for g in groups for i, j in scoring.pairs]
    else:
        lengths = [len(prompt) + sum(map(len, g.response_ids)) for g in groups for prompt in g.prompt_ids]
    return sum(lengths), len(lengths) * max(lengths)


def score_groups(module, groups: list[QueryGroup], scoring: Scoring, pad_id: int, include_eos: bool, device,
                 reference=None, chunk_count: ChunkCount = None):
    """(token log-probs, response mask, exact token KL or None) of `scoring.pairs` of every group, rows
    group-major in pairs order, laid out as `scoring.layout` says (`reference`: for packed_exact_kl)."""
    if scoring.layout == "pairs":
        return *score(module, *pair_sequences(groups, scoring.pairs), pad_id, include_eos, device, chunk_count), None
    packed = [(g.prompt_ids, g.response_ids) for g in groups]
    if scoring.layout == "packed_exact_kl":
        return shared_prefix_logprobs_and_kl(module, reference, packed, pad_id, include_eos, chunk_count=chunk_count)
    return *shared_prefix_logprobs(module, packed, pad_id, include_eos, chunk_count=chunk_count), None


def micro_batch_loss(module, reference, groups: list[QueryGroup], cfg: TrainConfig, scoring: Scoring, pad_id: int,
                     device, chunk_count: ChunkCount = None) -> tuple[torch.Tensor, dict]:
    """(loss, figures) of `groups`, scored as `scoring` says, under its objective's loss step."""
    include_eos = cfg.objective.sami.include_eos
    token_lp, mask, token_kl = score_groups(module, groups, scoring, pad_id, include_eos, device, reference,
                                            chunk_count)
    reference_lp = None
    if scoring.reference_pass:
        with torch.no_grad():
            reference_lp = score_groups(reference, groups, scoring, pad_id, include_eos, device,
                                        chunk_count=chunk_count)[0]
    scored = ScoredPairs(token_lp, mask, reference_lp, len(groups), scoring.c, token_kl)
    loss, stats = OBJECTIVES[scoring.objective].step(scored, cfg.objective)
    return loss, {**stats, "loss": loss.item()}


class PolicyLoss(torch.nn.Module):
    """The policy, with a micro-batch's loss step as its forward: `engine(groups, scoring)` -> (loss, figures).

    The frozen reference is held outside the module tree (ZeRO must neither partition nor train it); under LoRA it
    is the policy itself with its adapter off. `chunk_count` agrees the LM head's call count with the other ranks
    (`sami.logprobs.chunk_starts`)."""

    def __init__(self, policy: torch.nn.Module, reference, cfg: TrainConfig, pad_id: int, device,
                 chunk_count: ChunkCount = None):
        super().__init__()
        self.policy = policy
        self._reference = (reference,)  # a tuple: an nn.Module attribute would register it as a submodule
        self.cfg, self.pad_id, self.device, self.chunk_count = cfg, pad_id, device, chunk_count

    def forward(self, groups: list[QueryGroup], scoring: Scoring) -> tuple[torch.Tensor, dict]:
        return micro_batch_loss(self.policy, self._reference[0], groups, self.cfg, scoring, self.pad_id, self.device,
                                self.chunk_count)
