"""Training objectives, pure torch: SAMI, DPO/IPO, SFT and a KL-to-reference term, and every decision about them.

The losses take log-probabilities computed elsewhere (`sami/logprobs.py`), so each is a few lines that a
unit test checks against hand-computed numbers. `OBJECTIVES` maps a config name to its pairs (which
(constitution i, response j) pairs of a query group are scored), its loss step, whether its pairs are packed
and whether `kl_beta` adds a KL term to it. From that table alone this module decides what the learner does:
the objective of each iteration (`objective_for`: `sft_then_sami`'s schedule), how an iteration's pairs are
scored (`scoring_for`: packed, packed with the exact KL, or pair by pair) and whether the run needs the frozen
reference at all (`run_needs_reference`, once for the whole run). The config refuses `kl_beta > 0` for an
objective without a KL term (`TrainConfig`'s cross-checks); the evaluation's MI bound scores groups with the
same SAMI layout.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal, Optional

import torch
import torch.nn.functional as F

from sami.config import ObjectiveConfig, TrainConfig
from sami.logprobs import sequence_logprobs


@dataclass
class SamiOutput:
    loss: torch.Tensor  # scalar, differentiable
    mi_lower_bound: torch.Tensor  # log C - loss: the InfoNCE lower bound on I(Y; C | X)
    row_accuracy: torch.Tensor  # share of groups whose diagonal wins its row (constitution picks its response)
    col_accuracy: torch.Tensor  # share of groups whose diagonal wins its column (response picks its constitution)


def sami_loss(logprobs: torch.Tensor, direction: str = "both") -> SamiOutput:
    """SAMI's contrastive loss on `logprobs[..., i, j] = log p(y_j | c_i, x)`.

    `logprobs` is `[C, C]` for one query group or `[B, C, C]` for B groups (values are means over groups).
    Rows are constitutions, columns responses; the diagonal pairs each response with the constitution it
    was sampled under. `both` averages the cross-entropy over rows (which response fits c_i) and over
    columns (which constitution produced y_j), as in the paper.
    """
    if direction not in ("both", "row", "column"):
        raise ValueError(f"direction must be 'both', 'row' or 'column', got {direction!r}")
    matrix = logprobs if logprobs.dim() == 3 else logprobs.unsqueeze(0)
    if matrix.dim() != 3 or matrix.shape[-1] != matrix.shape[-2] or matrix.shape[-1] < 2:
        raise ValueError(f"logprobs must be [C, C] or [B, C, C] with C >= 2, got {tuple(logprobs.shape)}")
    groups, c = matrix.shape[0], matrix.shape[-1]
    labels = torch.arange(c, device=matrix.device).repeat(groups)
    # Row i: a distribution over responses given c_i. Column j: over constitutions given y_j.
    row_loss = F.cross_entropy(matrix.reshape(-1, c).float(), labels)
    col_loss = F.cross_entropy(matrix.transpose(1, 2).reshape(-1, c).float(), labels)
    loss = {"both": (row_loss + col_loss) / 2, "row": row_loss, "column": col_loss}[direction]
    with torch.no_grad():
        diag = torch.arange(c, device=matrix.device)
        row_acc = (matrix.argmax(dim=2) == diag).all(dim=1).float().mean()
        col_acc = (matrix.argmax(dim=1) == diag).all(dim=1).float().mean()
    return SamiOutput(loss, math.log(c) - loss.detach(), row_acc, col_acc)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO (Rafailov et al. 2023) on sequence log-probs `[B]`; `ipo` is Azar et al.'s squared variant."""
    margin = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)
    if loss_type == "sigmoid":
        loss = -F.logsigmoid(beta * margin).mean()
    elif loss_type == "ipo":
        loss = ((margin - 1.0 / (2.0 * beta)) ** 2).mean()
    else:
        raise ValueError(f"loss_type must be 'sigmoid' or 'ipo', got {loss_type!r}")
    with torch.no_grad():
        metrics = {"reward_margin": (beta * margin).mean(), "reward_accuracy": (margin > 0).float().mean()}
    return loss, metrics


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def sft_loss(token_logprobs: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood per response token (prompt and padding masked)."""
    return -_masked_mean(token_logprobs, response_mask)


def k3_per_token(policy_token_logprobs: torch.Tensor, reference_token_logprobs: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimate of KL(pi || pi_ref) at each scored token: exp(r) - r - 1, r = ref - policy.

    Non-negative, and unbiased for tokens sampled from pi. `sami_step` averages it over response tokens only:
    the paper's reference code also averaged over masked prompt/padding positions, which shrinks the term.
    """
    log_ratio = (reference_token_logprobs - policy_token_logprobs).float()
    return torch.expm1(log_ratio) - log_ratio


# ---------------------------------------------------------------------------------------------------------
# The objective table


@dataclass
class ScoredPairs:
    """Token log-probs of a micro-batch of `groups` query groups, laid out by an objective's pairs (group-major)."""

    # [groups * len(pairs), T]: T runs over a padded sequence's positions or, packed, a response's tokens alone;
    # the losses only read token_lp where response_mask is 1
    token_lp: torch.Tensor
    response_mask: torch.Tensor
    reference_lp: Optional[torch.Tensor]  # the frozen reference's token log-probs, when the objective needs them
    groups: int
    c: int  # constitutions per group
    token_kl: Optional[torch.Tensor] = None  # exact KL(pi || pi_ref) per scored position (`kl_estimator: exact`)


def sami_pairs(c: int) -> list[tuple[int, int]]:
    """Every (constitution i, response j): the C x C matrix, row-major."""
    return [(i, j) for i in range(c) for j in range(c)]


def diagonal_rows(response_mask: torch.Tensor, c: int) -> torch.Tensor:
    """`response_mask` kept on each group's (i, i) pairs only: the responses sampled under their own constitution."""
    groups = response_mask.shape[0] // (c * c)
    diagonal = torch.eye(c, dtype=torch.bool, device=response_mask.device).flatten().repeat(groups)
    return response_mask * diagonal[:, None]


def sami_step(s: ScoredPairs, cfg: ObjectiveConfig) -> tuple[torch.Tensor, dict]:
    seq = sequence_logprobs(s.token_lp, s.response_mask, cfg.sami.reduction).view(s.groups, s.c, s.c)
    out = sami_loss(seq, cfg.sami.direction)
    loss, stats = out.loss, {"mi_lower_bound": out.mi_lower_bound.item(), "row_accuracy": out.row_accuracy.item(),
                             "col_accuracy": out.col_accuracy.item()}
    if cfg.sft_weight > 0:  # SFT on each group's positive pair (constitution 0, response 0), the first of C*C
        positive = torch.zeros_like(s.response_mask)
        positive[:: s.c * s.c] = s.response_mask[:: s.c * s.c]
        loss = loss + cfg.sft_weight * sft_loss(s.token_lp, positive)
    if cfg.kl_beta > 0:
        per_token = s.token_kl if s.token_kl is not None else k3_per_token(s.token_lp, s.reference_lp)
        mask = s.response_mask if cfg.kl_pairs == "all" else diagonal_rows(s.response_mask, s.c)
        kl = _masked_mean(per_token, mask)
        loss, stats["kl"] = loss + cfg.kl_beta * kl, kl.item()
    return loss, stats


def sft_step(s: ScoredPairs, cfg: ObjectiveConfig) -> tuple[torch.Tensor, dict]:
    return sft_loss(s.token_lp, s.response_mask), {}


def dpo_step(s: ScoredPairs, cfg: ObjectiveConfig) -> tuple[torch.Tensor, dict]:
    """The response under the positive constitution is chosen over each contrast's response."""
    seq = sequence_logprobs(s.token_lp, s.response_mask, "sum").view(s.groups, s.c)
    ref = sequence_logprobs(s.reference_lp, s.response_mask, "sum").view(s.groups, s.c)
    chosen, rejected = seq[:, :1].expand(-1, s.c - 1), seq[:, 1:]
    ref_chosen, ref_rejected = ref[:, :1].expand(-1, s.c - 1), ref[:, 1:]
    loss, stats = dpo_loss(chosen.reshape(-1), rejected.reshape(-1), ref_chosen.reshape(-1), ref_rejected.reshape(-1),
                           cfg.dpo.beta, cfg.dpo.loss_type)
    return loss, {k: v.item() for k, v in stats.items()}


@dataclass(frozen=True)
class Objective:
    pairs: Callable[[int], list[tuple[int, int]]]  # C -> the (prompt i, response j) pairs scored per group
    step: Callable[[ScoredPairs, ObjectiveConfig], tuple[torch.Tensor, dict]]  # -> (loss, figures)
    packed: bool  # the pairs are the full C x C matrix: each prompt runs once, its C responses packed behind it
    kl_term: bool  # `kl_beta` adds beta * KL(pi || pi_ref) to the loss (the config refuses kl_beta > 0 elsewhere)
    reference: bool = False  # the loss itself reads the frozen reference's log-probs, whatever kl_beta is

    def needs_reference(self, cfg: ObjectiveConfig) -> bool:
        return self.reference or (self.kl_term and cfg.kl_beta > 0)


OBJECTIVES = {
    "sami": Objective(sami_pairs, sami_step, packed=True, kl_term=True),
    # SFT on the positive constitution's own sample
    "sft": Objective(lambda c: [(0, 0)], sft_step, packed=False, kl_term=False),
    # the positive prompt with each response: the chosen one first, then the C - 1 rejected ones; DPO's own
    # beta is its KL strength
    "dpo": Objective(lambda c: [(0, j) for j in range(c)], dpo_step, packed=False, kl_term=False, reference=True),
}


def objective_for(cfg: TrainConfig, iteration: int) -> str:
    """The objective 1-based `iteration` trains: `sft_then_sami` is SFT for `sft_iterations`, then SAMI (whose KL
    term is the only one `kl_beta` adds: the SFT iterations train without it)."""
    if cfg.objective.name == "sft_then_sami":
        return "sft" if iteration <= cfg.objective.sft_iterations else "sami"
    return cfg.objective.name


@dataclass(frozen=True)
class Scoring:
    """How a micro-batch of query groups is scored for one objective."""

    objective: str
    c: int  # constitutions per group
    pairs: list[tuple[int, int]]  # scored per group, rows group-major in this order
    # packed: each prompt once with its C responses behind it; packed_exact_kl: that, with the exact KL to the
    # reference over the vocabulary in the same pass; pairs: each (prompt, response) pair its own padded sequence
    layout: Literal["packed", "packed_exact_kl", "pairs"]
    reference: bool  # the frozen reference runs on these pairs too

    @property
    def reference_pass(self) -> bool:
        """The reference scores the pairs in a pass of its own (packed_exact_kl runs it inside the policy's)."""
        return self.reference and self.layout != "packed_exact_kl"


def scoring(objective: str, c: int, cfg: Optional[ObjectiveConfig] = None) -> Scoring:
    """`objective`'s scoring of groups of `c` constitutions under `cfg` (default: no KL term)."""
    spec, cfg = OBJECTIVES[objective], cfg or ObjectiveConfig()
    reference = spec.needs_reference(cfg)
    exact = spec.kl_term and reference and cfg.kl_estimator == "exact"
    layout = "packed_exact_kl" if exact else "packed" if spec.packed else "pairs"
    return Scoring(objective, c, spec.pairs(c), layout, reference)


def scoring_for(cfg: TrainConfig, iteration: int) -> Scoring:
    return scoring(objective_for(cfg, iteration), cfg.principles.num_constitutions, cfg.objective)


def run_needs_reference(cfg: TrainConfig) -> bool:
    """Whether any iteration of the run reads the frozen reference: decided once, before it is loaded."""
    return any(scoring_for(cfg, k).reference for k in range(1, cfg.run.iterations + 1))


def pair_sequences(groups: list, pairs: list[tuple[int, int]]) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt ids, response ids) of every pair of every group, group-major: what `ScoredPairs` lays out."""
    return ([g.prompt_ids[i] for g in groups for i, _ in pairs], [g.response_ids[j] for g in groups for _, j in pairs])
