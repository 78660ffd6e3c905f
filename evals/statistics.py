"""Intervals for figures measured on several seeds, each on its own evaluation items.

Two 95% intervals answer two questions:
- over seeds: would another seed (another base model, other training queries, another run) give the same
  figure? A t-interval on the per-seed figures, df = seeds - 1.
- over items: would other evaluation items give the same figure for these trained models? A bootstrap
  stratified by seed: each resample draws every seed's items with replacement from that seed's own items
  (each seed keeps its item count), and the figure is the mean over seeds of the per-seed means.
A difference between two models is paired by item within a seed (both answered the same prompts).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

# The t-distribution's 97.5% quantile for df = 1..30 (two-sided 95%); beyond 30 the Cornish-Fisher
# expansion below is within 1e-4 of it.
T_975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010, 2.1788,
         2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739, 2.0687, 2.0639,
         2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423)
Z_975 = 1.959964


def t_quantile_975(df: int) -> float:
    if df < 1:
        raise ValueError(f"a t-interval needs df >= 1, got {df}")
    if df <= len(T_975):
        return T_975[df - 1]
    z = Z_975
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def t_interval(values: Sequence[float]) -> list[float] | None:
    """The 95% t-interval of the mean of `values` (df = n - 1); None for fewer than 2 values."""
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile_975(n - 1) * sd / math.sqrt(n)
    return [mean - half, mean + half]


def stratified_bootstrap_interval(items_per_seed: Sequence[Sequence[float]], resamples: int = 2000,
                                  seed: int = 0) -> list[float]:
    """Percentile 95% interval of the mean over seeds of each seed's item mean, items resampled within seeds."""
    if not items_per_seed or any(len(items) == 0 for items in items_per_seed):
        raise ValueError("every seed needs at least one item")
    rng = np.random.default_rng(seed)
    total = np.zeros(resamples)
    for items in items_per_seed:
        values = np.asarray(items, dtype=float)
        total += values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
    low, high = np.percentile(total / len(items_per_seed), [2.5, 97.5])
    return [float(low), float(high)]


def paired_differences(a: Sequence[float], b: Sequence[float]) -> list[float]:
    """a[i] - b[i] for items both models answered."""
    if len(a) != len(b):
        raise ValueError(f"paired items differ in number: {len(a)} and {len(b)}")
    return [x - y for x, y in zip(a, b)]


def summarise_over_seeds(items_per_seed: Sequence[Sequence[float]], resamples: int = 2000, seed: int = 0) -> dict:
    """{"mean", "per_seed", "ci_seeds", "ci_items"} of a per-item figure measured on each seed's items."""
    per_seed = [float(np.mean(items)) for items in items_per_seed]
    return {"mean": sum(per_seed) / len(per_seed), "per_seed": per_seed, "ci_seeds": t_interval(per_seed),
            "ci_items": stratified_bootstrap_interval(items_per_seed, resamples, seed)}
