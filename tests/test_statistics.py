"""The seeds' intervals (evals/statistics.py) against values computed by hand."""
import math

import pytest

from evals.statistics import (paired_differences, stratified_bootstrap_interval, summarise_over_seeds, t_interval,
                              t_quantile_975)


def test_t_interval_of_three_values():
    # mean 2, sd 1, t(0.975, df=2) = 4.3027: 2 -+ 4.3027 / sqrt(3)
    low, high = t_interval([1.0, 2.0, 3.0])
    assert low == pytest.approx(2 - 4.3027 / math.sqrt(3)) and high == pytest.approx(2 + 4.3027 / math.sqrt(3))
    assert t_interval([0.7]) is None  # one seed says nothing about another
    assert t_interval([0.5, 0.5, 0.5]) == [0.5, 0.5]


def test_t_quantiles_beyond_the_table():
    assert t_quantile_975(30) == 2.0423
    assert t_quantile_975(31) == pytest.approx(2.0395, abs=1e-4) and t_quantile_975(120) == pytest.approx(1.9799, abs=1e-4)
    with pytest.raises(ValueError):
        t_quantile_975(0)


def test_paired_difference():
    assert paired_differences([1.0, 0.0, 0.5], [0.5, 0.5, 0.5]) == [0.5, -0.5, 0.0]
    with pytest.raises(ValueError, match="3 and 2"):
        paired_differences([1, 0, 1], [1, 0])
    # per seed: mean differences 0.5, 0 and -0.25; their mean 1/12
    summary = summarise_over_seeds([paired_differences([1, 1], [0, 1]), [0.0], paired_differences([0, 0], [0.5, 0])])
    assert summary["per_seed"] == [0.5, 0.0, -0.25] and summary["mean"] == pytest.approx(1 / 12)


def test_stratified_bootstrap():
    # Items resampled within a seed: constant seeds give a point, whatever the draw.
    assert stratified_bootstrap_interval([[1, 1], [0, 0, 0]]) == [0.5, 0.5]
    spread = [[0, 1, 1, 0, 1], [1, 1, 0, 1]]
    assert stratified_bootstrap_interval(spread, seed=3) == stratified_bootstrap_interval(spread, seed=3)
    assert stratified_bootstrap_interval(spread, seed=3) != stratified_bootstrap_interval(spread, seed=4)
    low, high = stratified_bootstrap_interval(spread, resamples=4000)
    assert low < (0.6 + 0.75) / 2 < high and 0 <= low and high <= 1
    with pytest.raises(ValueError):
        stratified_bootstrap_interval([[1, 0], []])


def test_summary_over_seeds():
    s = summarise_over_seeds([[1, 0], [1, 1], [0, 0]])
    assert s["per_seed"] == [0.5, 1.0, 0.0] and s["mean"] == 0.5
    half = 4.3027 * 0.5 / math.sqrt(3)
    assert s["ci_seeds"] == pytest.approx([0.5 - half, 0.5 + half])
    assert s["ci_items"][0] <= 0.5 <= s["ci_items"][1]
