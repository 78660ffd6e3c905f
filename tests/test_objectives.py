"""SAMI, DPO/IPO, SFT and KL against direct implementations and hand-computed values."""
import math

import pytest
import torch
import torch.nn.functional as F

from sami.config import ConfigError, ObjectiveConfig, load_config
from sami.groups import QueryGroup
from sami.objectives import (OBJECTIVES, ScoredPairs, diagonal_rows, dpo_loss, k3_per_token, objective_for,
                             pair_sequences, run_needs_reference, sami_loss, scoring_for, sft_loss)


def direct_sami(L: torch.Tensor) -> torch.Tensor:
    """The SAMI loss (arXiv 2404.14313): half the cross-entropy over rows plus over columns, the diagonal the labels,
    written out literally."""
    c = L.shape[0]
    row = L - torch.logsumexp(L, dim=1, keepdim=True)
    col = L - torch.logsumexp(L, dim=0, keepdim=True)
    return (F.cross_entropy(row, torch.arange(c)) + F.cross_entropy(col.T, torch.arange(c))) / 2


@pytest.mark.parametrize("c", range(2, 9))
def test_matches_direct_implementation(c):
    gen = torch.Generator().manual_seed(c)
    for _ in range(5):
        L = torch.randn(c, c, generator=gen, dtype=torch.float64) * 3
        out = sami_loss(L)
        assert abs(out.loss.item() - direct_sami(L).item()) < 1e-6
        assert abs(out.mi_lower_bound.item() - (math.log(c) - direct_sami(L).item())) < 1e-6


def test_constant_matrix_gives_log_c_and_zero_bound():
    for c in (2, 5):
        out = sami_loss(torch.full((c, c), -1.7))
        assert out.loss.item() == pytest.approx(math.log(c), abs=1e-6)
        assert out.mi_lower_bound.item() == pytest.approx(0.0, abs=1e-6)


def test_falls_towards_zero_as_diagonal_dominates():
    losses = [sami_loss(torch.eye(4) * s).loss.item() for s in (0.0, 1.0, 5.0, 20.0)]
    assert losses == sorted(losses, reverse=True)
    assert losses[-1] < 1e-7
    assert sami_loss(torch.eye(4) * 20.0).mi_lower_bound.item() == pytest.approx(math.log(4), abs=1e-6)


def test_invariant_to_permuting_constitutions_and_responses_together():
    L = torch.randn(6, 6, generator=torch.Generator().manual_seed(0))
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(1))
    assert sami_loss(L[perm][:, perm]).loss.item() == pytest.approx(sami_loss(L).loss.item(), abs=1e-6)


def test_batched_is_mean_of_singles_and_gradients_flow():
    L = torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(2), requires_grad=True)
    out = sami_loss(L)
    singles = torch.stack([sami_loss(L[b]).loss for b in range(3)])
    assert out.loss.item() == pytest.approx(singles.mean().item(), abs=1e-6)
    out.loss.backward()
    assert L.grad is not None and L.grad.abs().sum() > 0
    # raising the diagonal lowers the loss: its gradient is negative
    assert (torch.diagonal(L.grad, dim1=1, dim2=2) < 0).all()


def test_directions_and_accuracies():
    # hand-computed 2x2: L = [[0, -1], [-3, -2]]
    L = torch.tensor([[0.0, -1.0], [-3.0, -2.0]])
    row = (-(0 - math.log(1 + math.exp(-1))) - (-2 - math.log(math.exp(-3) + math.exp(-2)))) / 2
    col = (-(0 - math.log(1 + math.exp(-3))) - (-2 - math.log(math.exp(-1) + math.exp(-2)))) / 2
    assert sami_loss(L, "row").loss.item() == pytest.approx(row, abs=1e-6)
    assert sami_loss(L, "column").loss.item() == pytest.approx(col, abs=1e-6)
    assert sami_loss(L).loss.item() == pytest.approx((row + col) / 2, abs=1e-6)
    out = sami_loss(L)  # rows: diag wins both; columns: col 1 has -1 > -2, so it loses
    assert (out.row_accuracy.item(), out.col_accuracy.item()) == (1.0, 0.0)
    with pytest.raises(ValueError, match="direction"):
        sami_loss(L, "diagonal")
    with pytest.raises(ValueError, match="C >= 2"):
        sami_loss(torch.zeros(1, 1))


def test_dpo_sigmoid_and_ipo_hand_computed():
    pc, pr = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0])
    rc, rr = torch.tensor([-1.5, -2.0]), torch.tensor([-2.5, -1.5])
    margins = [(-1 + 1.5) - (-3 + 2.5), (-2 + 2) - (-1 + 1.5)]  # [1.0, -0.5]
    expected = sum(-math.log(1 / (1 + math.exp(-0.1 * m))) for m in margins) / 2
    loss, metrics = dpo_loss(pc, pr, rc, rr, beta=0.1)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert metrics["reward_accuracy"].item() == 0.5
    assert metrics["reward_margin"].item() == pytest.approx(0.1 * 0.25, abs=1e-7)
    ipo, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="ipo")
    assert ipo.item() == pytest.approx(((1.0 - 5.0) ** 2 + (-0.5 - 5.0) ** 2) / 2, abs=1e-5)
    # at a zero margin the sigmoid loss is log 2
    zero, _ = dpo_loss(pc, pr, pc, pr)
    assert zero.item() == pytest.approx(math.log(2), abs=1e-6)


def test_sft_and_kl_use_response_tokens_only():
    token_lp = torch.tensor([[-5.0, -1.0, -2.0], [-9.0, -3.0, -7.0]])
    mask = torch.tensor([[0, 1, 1], [0, 1, 0]])
    assert sft_loss(token_lp, mask).item() == pytest.approx((1 + 2 + 3) / 3)
    ref = torch.tensor([[-1.0, -1.5, -2.0], [0.0, -2.0, -1.0]])
    r = [(-1.5) - (-1.0), 0.0, (-2.0) - (-3.0)]  # ref - policy on the three response tokens
    k3 = k3_per_token(token_lp, ref)
    assert [k3[0, 1].item(), k3[0, 2].item(), k3[1, 1].item()] == pytest.approx([math.exp(x) - x - 1 for x in r], abs=1e-6)
    assert (k3_per_token(token_lp, token_lp) == 0).all()


def one_token_pairs(logprobs: list[float], reference: list[float] | None = None, groups: int = 1, c: int = 2) -> ScoredPairs:
    """Scored pairs whose every sequence has a single response token carrying the given log-prob."""
    token_lp = torch.tensor(logprobs).view(-1, 1)
    ref = torch.tensor(reference).view(-1, 1) if reference is not None else None
    return ScoredPairs(token_lp, torch.ones_like(token_lp, dtype=torch.long), ref, groups, c)


def test_objective_layouts():
    group = QueryGroup("q", "x", prompt_ids=[[1], [2]], response_ids=[[10], [20]])
    prompts, responses = pair_sequences([group], OBJECTIVES["sami"].pairs(2))
    assert (prompts, responses) == ([[1], [1], [2], [2]], [[10], [20], [10], [20]])  # L[i, j] row-major
    assert pair_sequences([group], OBJECTIVES["sft"].pairs(2)) == ([[1]], [[10]])
    assert pair_sequences([group, group], OBJECTIVES["dpo"].pairs(2)) == ([[1], [1], [1], [1]], [[10], [20], [10], [20]])
    assert [OBJECTIVES[n].needs_reference(ObjectiveConfig(kl_beta=0.0)) for n in ("sami", "sft", "dpo")] == [False, False, True]
    assert OBJECTIVES["sami"].needs_reference(ObjectiveConfig(kl_beta=0.3))


def test_objective_schedule():
    cfg = load_config(None, ["objective.name=sft_then_sami", "objective.sft_iterations=2", "run.iterations=3"])
    assert [objective_for(cfg, k) for k in (1, 2, 3)] == ["sft", "sft", "sami"]


def test_scoring_layout_per_iteration():
    """sft_then_sami with SAMI's exact KL: the SFT iteration scores pair (0, 0) alone and reads no reference; the SAMI
    iteration packs its C x C pairs with the exact KL in the same pass; k3 packs too, with a reference pass."""
    cfg = load_config(None, ["objective.name=sft_then_sami", "objective.kl_beta=0.3", "objective.kl_estimator=exact",
                             "principles.num_constitutions=3"])
    sft, sami = scoring_for(cfg, 1), scoring_for(cfg, 2)
    assert (sft.objective, sft.pairs, sft.layout, sft.reference, sft.reference_pass) == ("sft", [(0, 0)], "pairs", False, False)
    assert (sami.objective, sami.c, len(sami.pairs), sami.layout, sami.reference, sami.reference_pass) == (
        "sami", 3, 9, "packed_exact_kl", True, False)
    k3 = scoring_for(load_config(None, ["objective.kl_beta=0.3"]), 1)
    assert (k3.layout, k3.reference_pass) == ("packed", True)
    dpo = scoring_for(load_config(None, ["objective.name=dpo"]), 1)
    assert (dpo.pairs, dpo.layout, dpo.reference_pass) == ([(0, 0), (0, 1)], "pairs", True)


def test_the_reference_is_loaded_only_for_a_run_that_reads_it():
    assert run_needs_reference(load_config(None, ["objective.kl_beta=0.3"]))
    assert run_needs_reference(load_config(None, ["objective.name=dpo"]))
    assert not run_needs_reference(load_config(None, ["objective.name=sft"]))
    assert not run_needs_reference(load_config(None, ["objective.kl_beta=0"]))
    # the SAMI iterations of sft_then_sami read it for their KL term
    assert run_needs_reference(load_config(None, ["objective.name=sft_then_sami", "objective.kl_beta=0.3"]))


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_kl_beta_is_refused_where_the_loss_has_no_kl_term(name):
    """SFT with a KL used to load a reference and ignore kl_beta; the config refuses what the table has no term for."""
    overrides = [f"objective.name={name}", "objective.kl_beta=0.3"]
    if OBJECTIVES[name].kl_term:
        assert load_config(None, overrides).objective.kl_beta == 0.3
        return
    with pytest.raises(ConfigError) as refused:
        load_config(None, overrides)
    assert str(refused.value).startswith(f"invalid config (defaults): objective.kl_beta is 0.3 but objective.name "
                                         f"{name!r}") and "\n" not in str(refused.value)  # one problem, one line


def test_sft_then_sami_with_a_kl_but_no_sami_iteration_is_refused():
    with pytest.raises(ConfigError, match="every iteration is SFT"):
        load_config(None, ["objective.name=sft_then_sami", "objective.kl_beta=0.3", "objective.sft_iterations=2",
                           "run.iterations=2"])


def test_sami_step_hand_computed():
    # L = [[0, -1], [-2, 0]]: rows CE = (log(1 + e^-1) + log(1 + e^-2)) / 2, columns the same by symmetry of the
    # off-diagonal entries' positions (column 0 holds 0, -2; column 1 holds -1, 0).
    expected = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(-2))) / 2
    loss, stats = OBJECTIVES["sami"].step(one_token_pairs([0.0, -1.0, -2.0, 0.0]), ObjectiveConfig())
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert stats["mi_lower_bound"] == pytest.approx(math.log(2) - expected, abs=1e-6)
    assert stats["row_accuracy"] == stats["col_accuracy"] == 1.0


def test_sami_step_adds_sft_on_the_positive_pair_and_kl():
    scored = one_token_pairs([-1.0, -3.0, -3.0, -2.0], reference=[-1.5, -3.0, -3.0, -2.0])
    base, _ = OBJECTIVES["sami"].step(scored, ObjectiveConfig())
    with_sft, _ = OBJECTIVES["sami"].step(scored, ObjectiveConfig(sft_weight=0.5))
    assert (with_sft - base).item() == pytest.approx(0.5 * 1.0, abs=1e-6)  # NLL of the (0, 0) pair only
    with_kl, stats = OBJECTIVES["sami"].step(scored, ObjectiveConfig(kl_beta=0.3))
    r = -1.5 - (-1.0)  # the only token where the reference differs
    kl = (math.exp(r) - r - 1) / 4
    assert stats["kl"] == pytest.approx(kl, abs=1e-6)
    assert (with_kl - base).item() == pytest.approx(0.3 * kl, abs=1e-6)


def test_sami_kl_exact_and_on_the_diagonal_pairs_only():
    # two groups of C = 2, one token each; the exact per-token KL arrives precomputed in token_kl
    scored = one_token_pairs([-1.0, -3.0, -3.0, -2.0] * 2, reference=[-1.0] * 8, groups=2)
    scored.token_kl = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]).view(-1, 1)
    assert diagonal_rows(scored.response_mask, 2).flatten().tolist() == [1, 0, 0, 1, 1, 0, 0, 1]
    _, every = OBJECTIVES["sami"].step(scored, ObjectiveConfig(kl_beta=0.3, kl_estimator="exact"))
    _, diagonal = OBJECTIVES["sami"].step(scored, ObjectiveConfig(kl_beta=0.3, kl_estimator="exact", kl_pairs="diagonal"))
    assert every["kl"] == pytest.approx(0.45, abs=1e-6) and diagonal["kl"] == pytest.approx((0.1 + 0.4 + 0.5 + 0.8) / 4, abs=1e-6)
    # k3 on the diagonal: (i, i) rows hold -1, -2, -1, -2 against a reference of -1
    _, k3 = OBJECTIVES["sami"].step(scored.__class__(scored.token_lp, scored.response_mask, scored.reference_lp, 2, 2),
                                    ObjectiveConfig(kl_beta=0.3, kl_pairs="diagonal"))
    assert k3["kl"] == pytest.approx((0 + (math.exp(1) - 2)) / 2, abs=1e-6)


def test_dpo_step_hand_computed():
    # chosen -1 (ref -2), rejected -3 (ref -2): margin = (-1 + 2) - (-3 + 2) = 2; loss = -log sigmoid(0.1 * 2)
    loss, stats = OBJECTIVES["dpo"].step(one_token_pairs([-1.0, -3.0], reference=[-2.0, -2.0]), ObjectiveConfig())
    assert loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.2))), abs=1e-6)
    assert stats["reward_margin"] == pytest.approx(0.2, abs=1e-6)
    assert stats["reward_accuracy"] == 1.0
