"""Win-rate estimators, bootstrap intervals, the A/B protocol, the CLI, and the SAMI paper's published figures."""
import json
import math
import subprocess
import sys
import time

import numpy as np
import pytest

from evals.win_rates import (Judgements, assign_order, bootstrap_interval, combine_swapped, judge_against_baseline,
                             main, summarise, to_test_scores, win_rate)

PAPER_LENGTH_CONTROLLED = {  # SAMI paper (arXiv 2404.14313), HH-RLHF, mistral-7b iteration 3
    "3-vs-base-epoch-0.38-helpful.json": 66,
    "3-vs-base-epoch-0.38-harmless.json": 77,
    "3-vs-instruct-epoch-0.38-helpful.json": 55,
    "3-vs-instruct-epoch-0.38-harmless.json": 57,
}


def test_raw_and_balanced_by_hand():
    # Longer stratum (test > baseline): scores 1, 1, 0 -> 2/3; not longer (incl. equal length): 0, 0.5 -> 1/4.
    j = Judgements(scores=[1, 1, 0, 0, 0.5], baseline_len=[10, 10, 10, 10, 10], test_len=[20, 30, 11, 5, 10])
    assert win_rate(j, "raw") == pytest.approx(2.5 / 5)
    assert win_rate(j, "balanced") == pytest.approx((2 / 3 + 1 / 4) / 2)


def test_balanced_with_one_empty_stratum_is_that_stratum():
    j = Judgements(scores=[1, 0, 1, 1], baseline_len=[1, 1, 1, 1], test_len=[5, 5, 5, 5])
    assert win_rate(j, "balanced") == pytest.approx(0.75)


def test_logistic_reads_win_rate_at_zero_length_difference():
    # Two symmetric length groups (d = -1 and +1) with win rates 0.5 and 0.9: the fitted curve passes through
    # the midpoint of the two log-odds, sigmoid(logit(0.9) / 2) = 0.75, whereas the raw rate is 0.7.
    scores = [1] * 5 + [0] * 5 + [1] * 9 + [0] * 1
    j = Judgements(scores=scores, baseline_len=[100] * 20, test_len=[99] * 10 + [101] * 10)
    assert win_rate(j, "raw") == pytest.approx(0.7)
    assert win_rate(j, "logistic") == pytest.approx(0.75, abs=3e-3)


def test_logistic_ties_and_degenerate_samples():
    same_length = Judgements(scores=[1, 0.5, 0.5, 0], baseline_len=[3] * 4, test_len=[3] * 4)
    assert win_rate(same_length, "logistic") == pytest.approx(0.5)
    all_wins = Judgements(scores=[1, 1, 1], baseline_len=[1, 2, 3], test_len=[3, 2, 1])
    assert win_rate(all_wins, "logistic") == 1.0
    # Length perfectly separates wins from losses: the slope stays finite and zero difference reads ~0.5.
    separated = Judgements(scores=[0, 0, 1, 1], baseline_len=[10] * 4, test_len=[5, 8, 12, 15])
    assert 0.3 < win_rate(separated, "logistic") < 0.7


def test_length_bias_is_removed_by_balanced_and_logistic():
    # A judge that only prefers the longer response: raw rewards the longer model, controlled estimators do not.
    rng = np.random.default_rng(0)
    baseline = rng.integers(50, 150, size=400)
    test = baseline + rng.integers(-45, 140, size=400)  # lengths stay positive
    scores = (test > baseline).astype(float)
    j = Judgements(scores, baseline, test)
    assert win_rate(j, "raw") > 0.65
    assert win_rate(j, "balanced") == pytest.approx(0.5)
    assert abs(win_rate(j, "logistic") - 0.5) < 0.1


def test_bootstrap_interval_is_seeded_and_covers_the_estimate_quickly():
    rng = np.random.default_rng(1)
    j = Judgements(rng.choice([0, 0.5, 1], size=250), rng.integers(10, 300, 250), rng.integers(10, 300, 250))
    start = time.perf_counter()
    for name in ("raw", "balanced", "logistic"):
        low, high = bootstrap_interval(j, name, num_resamples=2000, seed=3)
        assert low < win_rate(j, name) < high
        assert 0.05 < high - low < 0.25  # n = 250: about +-6 points
        assert (low, high) == bootstrap_interval(j, name, num_resamples=2000, seed=3)
    assert time.perf_counter() - start < 5.0


def test_summary_has_per_category_rates():
    j = Judgements([1, 0, 1, 0.5], [1, 1, 1, 1], [2, 2, 2, 2], categories=["math", "math", "coding", "coding"])
    s = summarise(j, num_resamples=50)
    assert s["by_category"] == {"coding": {"n": 2, "win_rate": 0.75}, "math": {"n": 2, "win_rate": 0.5}}
    rows = summarise([[1, 10, 20], [0, 10, 5]], num_resamples=50)  # plain rows work too
    assert rows["n"] == 2 and rows["raw"]["win_rate"] == 0.5
    with pytest.raises(ValueError, match="scores must be 0, 0.5 or 1"):
        Judgements([2], [1], [1])


def test_ab_order_mapping_and_swap_rule():
    test_is_a = assign_order(1000, seed=7)
    assert 0.45 < test_is_a.mean() < 0.55
    assert (test_is_a == assign_order(1000, seed=7)).all()
    # Judge says A, B, tie; test was A, B, A.
    assert to_test_scores([1, 1, 0.5], [True, False, True]).tolist() == [1.0, 0.0, 0.5]
    assert combine_swapped([1, 0, 1, 0.5], [1, 0, 0, 1]).tolist() == [1.0, 0.0, 0.5, 0.5]


class LengthJudge:
    """Prefers the longer response; ties on equal length. Records what it saw."""

    def __init__(self):
        self.seen = []

    def compare(self, items):
        self.seen.extend(items)
        return [1.0 if len(i.response_a) > len(i.response_b) else 0.0 if len(i.response_a) < len(i.response_b)
                else 0.5 for i in items]


class PositionJudge:
    def compare(self, items):
        return [1.0] * len(items)  # always picks A: pure position bias


def test_judge_against_baseline_maps_back_and_swap_cancels_position_bias():
    queries = [f"q{i}" for i in range(40)]
    test = ["a long answer"] * 30 + ["short"] * 10
    base = ["medium one"] * 40
    judge = LengthJudge()
    scores = judge_against_baseline(judge, queries, ["1. Be kind."] * 40, test, base, seed=0)
    assert scores.tolist() == [1.0] * 30 + [0.0] * 10
    assert {i.response_a for i in judge.seen} == {"a long answer", "short", "medium one"}
    biased = judge_against_baseline(PositionJudge(), queries, ["c"] * 40, test, base, seed=0)
    assert 0.2 < biased.mean() < 0.8
    assert judge_against_baseline(PositionJudge(), queries, ["c"] * 40, test, base, seed=0, swap=True).tolist() == [0.5] * 40
    with pytest.raises(ValueError, match="test_responses has 1 entries"):
        judge_against_baseline(judge, queries, ["c"] * 40, ["x"], base, seed=0)


def test_cli_json_and_errors(tmp_path, capsys):
    good = tmp_path / "good.json"
    good.write_text(json.dumps([[1, 10, 20], [0, 10, 5], [0.5, 10, 10], [1, 10, 11]]))
    assert main([str(good), "--json", "--bootstrap", "100", "--seed", "1"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert result["file"] == str(good) and result["n"] == 4
    assert result["raw"]["win_rate"] == pytest.approx(0.625)
    assert set(result) == {"file", "n", "raw", "balanced", "logistic"}
    assert all(len(result[k]["ci"]) == 2 for k in ("raw", "balanced", "logistic"))

    assert main([str(good)]) == 0
    assert "good.json" in capsys.readouterr().out

    cases = {"missing.json": None, "text.json": "not json", "shape.json": "[[1, 2]]", "score.json": "[[3, 1, 1]]",
             "dict.json": '{"a": 1}'}
    for name, content in cases.items():
        path = tmp_path / name
        if content is not None:
            path.write_text(content)
        assert main([str(good), str(path)]) == 2
        err = capsys.readouterr().err
        assert name in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_negative_lengths_are_refused(tmp_path, capsys):
    path = tmp_path / "negative.json"
    path.write_text(json.dumps([[1, 10, 20], [0, 10, -5]]))
    assert main([str(path)]) == 2
    assert capsys.readouterr().err.strip() == f"error: {path}: test_len must be finite and >= 0; item 1 is -5.0"
    with pytest.raises(ValueError, match="baseline_len must be finite and >= 0; item 0 is -1.0"):
        Judgements([1.0], [-1], [3])


def test_cli_module_entry_point_exit_code(tmp_path):
    out = subprocess.run([sys.executable, "-m", "evals.win_rates", str(tmp_path / "none.json")],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "none.json" in out.stderr and "Traceback" not in out.stderr


def test_paper_length_controlled_win_rates(fixtures_dir):
    folder = fixtures_dir / "sami-paper-hh-winrates"
    for name, percent in PAPER_LENGTH_CONTROLLED.items():
        j = Judgements.from_rows(json.loads((folder / name).read_text()))
        assert len(j) == 250
        balanced = 100 * win_rate(j, "balanced")
        # The paper truncates (66.92 -> 66, 77.78 -> 77, 57.93 -> 57) except 54.98, printed as 55.
        assert percent in (math.floor(balanced), round(balanced)), (name, balanced)
        assert abs(balanced - percent) < 1.0
        # Raw win rates are higher: iteration 3 writes longer answers than either baseline.
        assert win_rate(j, "raw") > win_rate(j, "balanced")
