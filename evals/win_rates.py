"""Pairwise win rates of a test model against a baseline, raw and length-controlled, with bootstrap intervals.

Every judged item is kept as (score, baseline length, test length, category). The score is from the *test*
model's side: 1 the test response wins, 0 the baseline wins, 0.5 a tie or an unparseable verdict.

Three estimators:
- raw: the mean score.
- balanced (the SAMI paper's length-controlled win rate): split the items into two strata, "test longer than
  baseline" (test_len > baseline_len) and "not longer" (test_len <= baseline_len), and average the two
  strata's mean scores, so a model cannot win by being longer on most items.
- logistic: regress the score on the length difference (test - baseline, divided by its standard deviation)
  with a logistic model fitted by Newton/IRLS (ties are 0.5 targets), and read the win rate off at a length
  difference of zero: sigmoid(intercept).

The paper's judge outputs (tests/fixtures/sami-paper-hh-winrates, from janphilippfranken/typo) use this same
convention: each file is a list of [score, baseline_len, test_len] with score 1 when GPT-4 preferred the test
model (the judge saw the two in a random order; the script mapped the verdict back to the test model).
"balanced" is the estimator behind the paper's length-controlled figures (iteration 3): vs base 66.92% (paper
66, helpful) and 77.78% (paper 77, harmless); vs mistral-7b-instruct 54.98% (paper 55, helpful) and 57.93%
(paper 57, harmless). The paper mostly truncates to a whole percent (54.98 is the exception, printed as 55);
every published figure is within one point of "balanced", while raw (80.6 / 90.4 / 59.2 / 62.0) and logistic
(67.7 / 83.3 / 54.0 / 57.9) are not. The strata "test >= baseline" vs "shorter" give 66.0 / 78.1 / 53.4 / 57.4.

The A/B protocol helpers put the test response in position A or B at random per item (seeded), map the
judge's "A wins" outputs back to test-model scores, and optionally judge a second time with the order
swapped; FastChat's rule then counts a disagreement between the two passes as a tie.

CLI: python -m evals.win_rates FILE... [--json] [--seed N] [--bootstrap N]
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ESTIMATORS = ("raw", "balanced", "logistic")
SLOPE_RIDGE = 1e-3  # keeps the slope finite when length perfectly separates wins from losses


@dataclass
class Judgements:
    """Per-item judge outcomes, from the test model's side."""

    scores: np.ndarray
    baseline_len: np.ndarray
    test_len: np.ndarray
    categories: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.scores = np.asarray(self.scores, dtype=float)
        self.baseline_len = np.asarray(self.baseline_len, dtype=float)
        self.test_len = np.asarray(self.test_len, dtype=float)
        n = len(self.scores)
        if len(self.baseline_len) != n or len(self.test_len) != n:
            raise ValueError(f"scores ({n}), baseline_len ({len(self.baseline_len)}) and test_len "
                             f"({len(self.test_len)}) must have the same length")
        if self.categories and len(self.categories) != n:
            raise ValueError(f"categories has {len(self.categories)} entries, expected {n}")
        for name, lengths in (("baseline_len", self.baseline_len), ("test_len", self.test_len)):
            bad = ~(np.isfinite(lengths) & (lengths >= 0))  # a length is a count: a negative one is a broken file
            if bad.any():
                raise ValueError(f"{name} must be finite and >= 0; item {int(np.argmax(bad))} is {lengths[bad][0]}")
        bad = ~np.isin(self.scores, (0.0, 0.5, 1.0))
        if bad.any():
            raise ValueError(f"scores must be 0, 0.5 or 1; item {int(np.argmax(bad))} is {self.scores[bad][0]}")

    def __len__(self) -> int:
        return len(self.scores)

    @classmethod
    def from_rows(cls, rows) -> "Judgements":
        """From [score, baseline_len, test_len] rows (the paper's file format)."""
        array = np.asarray(rows, dtype=float).reshape(-1, 3)
        return cls(array[:, 0], array[:, 1], array[:, 2])


# ---- estimators: each takes [B, n] arrays (one row per bootstrap resample) and returns [B] ----

def _raw(scores, baseline_len, test_len):
    return scores.mean(axis=1)


def _balanced(scores, baseline_len, test_len):
    longer = test_len > baseline_len
    n_longer = longer.sum(axis=1)
    n_other = longer.shape[1] - n_longer
    with np.errstate(invalid="ignore", divide="ignore"):
        rate_longer = (scores * longer).sum(axis=1) / n_longer
        rate_other = (scores * ~longer).sum(axis=1) / n_other
    # An empty stratum leaves only the other one to speak for the data.
    return np.where(n_longer == 0, rate_other, np.where(n_other == 0, rate_longer, (rate_longer + rate_other) / 2))


def _logistic(scores, baseline_len, test_len, iterations: int = 50):
    diff = test_len - baseline_len
    scale = diff.std(axis=1, keepdims=True)
    z = diff / np.where(scale > 0, scale, 1.0)
    beta = np.zeros((len(scores), 2))
    mean = scores.mean(axis=1)
    # Start the intercept at the raw log-odds; an all-win or all-loss sample has no finite fit, its answer is its mean.
    clipped = np.clip(mean, 1e-6, 1 - 1e-6)
    beta[:, 0] = np.log(clipped / (1 - clipped))
    ridge = np.array([0.0, SLOPE_RIDGE * scores.shape[1]])
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(beta[:, :1] + beta[:, 1:] * z)))
        w = p * (1 - p)
        residual = scores - p
        grad = np.stack([residual.sum(1), (residual * z).sum(1)], axis=1) - ridge * beta
        hessian = np.empty((len(scores), 2, 2))
        hessian[:, 0, 0] = w.sum(1) + 1e-12
        hessian[:, 0, 1] = hessian[:, 1, 0] = (w * z).sum(1)
        hessian[:, 1, 1] = (w * z * z).sum(1) + ridge[1]
        step = np.linalg.solve(hessian, grad[..., None])[..., 0]
        beta += step
        if np.abs(step).max() < 1e-10:
            break
    fitted = 1.0 / (1.0 + np.exp(-beta[:, 0]))
    degenerate = (mean <= 0.0) | (mean >= 1.0)
    return np.where(degenerate, mean, fitted)


_ESTIMATOR_FNS = {"raw": _raw, "balanced": _balanced, "logistic": _logistic}


def win_rate(judgements: Judgements, estimator: str = "raw") -> float:
    """Point estimate of one estimator ("raw", "balanced", "logistic")."""
    if estimator not in _ESTIMATOR_FNS:
        raise ValueError(f"unknown estimator {estimator!r}; expected one of {ESTIMATORS}")
    if len(judgements) == 0:
        raise ValueError("no judgements to summarise")
    j = judgements
    return float(_ESTIMATOR_FNS[estimator](j.scores[None], j.baseline_len[None], j.test_len[None])[0])


def bootstrap_interval(judgements: Judgements, estimator: str = "raw", num_resamples: int = 2000,
                       seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval over items, all resamples computed at once."""
    j = judgements
    rng = np.random.default_rng(seed)
    index = rng.integers(0, len(j), size=(num_resamples, len(j)))
    values = _ESTIMATOR_FNS[estimator](j.scores[index], j.baseline_len[index], j.test_len[index])
    values = values[~np.isnan(values)]
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def summarise(judgements: Judgements | list, num_resamples: int = 2000, seed: int = 0) -> dict:
    """{"n", "raw", "balanced", "logistic"}, each estimator as {"win_rate", "ci": [low, high]};
    plus "by_category" (raw win rate and n per category) when the items carry categories.
    Takes Judgements or [score, baseline_len, test_len] rows."""
    if not isinstance(judgements, Judgements):
        judgements = Judgements.from_rows(judgements)
    summary: dict = {"n": len(judgements)}
    for name in ESTIMATORS:
        low, high = bootstrap_interval(judgements, name, num_resamples, seed)
        summary[name] = {"win_rate": win_rate(judgements, name), "ci": [low, high]}
    if judgements.categories:
        groups: dict[str, list[float]] = defaultdict(list)
        for category, score in zip(judgements.categories, judgements.scores):
            groups[category].append(float(score))
        summary["by_category"] = {c: {"n": len(s), "win_rate": float(np.mean(s))} for c, s in sorted(groups.items())}
    return summary


# ---- the A/B protocol ----

def assign_order(num_items: int, seed: int) -> np.ndarray:
    """test_is_a[i]: whether item i shows the test response in position A (a fair coin per item, seeded)."""
    return np.random.default_rng(seed).integers(0, 2, size=num_items).astype(bool)


def to_test_scores(judge_outputs, test_is_a) -> np.ndarray:
    """Judge outputs (1 A wins, 0 B wins, 0.5 tie) -> scores from the test model's side."""
    outputs = np.asarray(judge_outputs, dtype=float)
    return np.where(np.asarray(test_is_a, dtype=bool), outputs, 1.0 - outputs)


def combine_swapped(first, second) -> np.ndarray:
    """Test-model scores from two passes with the order swapped: agreement stands, disagreement is a tie."""
    first, second = np.asarray(first, dtype=float), np.asarray(second, dtype=float)
    return np.where(first == second, first, 0.5)


def judge_against_baseline(judge, queries: list[str], constitutions: list[str], test_responses: list[str],
                           baseline_responses: list[str], seed: int, swap: bool = False,
                           references: list[str | None] | None = None,
                           metadata: list[dict] | None = None, transcripts: list | None = None) -> np.ndarray:
    """Judge test vs baseline per item with random A/B order; returns test-model scores.

    With swap=True every item is judged again in the other order and FastChat's consistency rule applies.
    Given a `transcripts` list, one entry per pass is appended: per item {"test_is_a", "score" (the test
    model's), "parsed" (a verdict was found), "text" (what the judge wrote; judges without `judgments` write
    nothing)}.
    """
    from evals.judges import JudgeItem

    n = len(queries)
    for name, values in (("constitutions", constitutions), ("test_responses", test_responses),
                         ("baseline_responses", baseline_responses)):
        if len(values) != n:
            raise ValueError(f"{name} has {len(values)} entries, expected {n} (one per query)")
    references = references if references is not None else [None] * n
    metadata = metadata if metadata is not None else [{} for _ in range(n)]

    def run(test_is_a):
        items = [JudgeItem(query=q, constitution=c, response_a=t if a else b, response_b=b if a else t,
                           reference=r, metadata=m)
                 for q, c, t, b, a, r, m in zip(queries, constitutions, test_responses, baseline_responses,
                                                test_is_a, references, metadata)]
        if hasattr(judge, "judgments"):
            outputs = judge.judgments(items)
        else:
            outputs = [{"score": score, "parsed": True, "text": ""} for score in judge.compare(items)]
        scores = to_test_scores([o["score"] for o in outputs], test_is_a)
        if transcripts is not None:
            transcripts.append([{"test_is_a": bool(a), "score": float(s), "parsed": o["parsed"], "text": o["text"]}
                                for a, s, o in zip(test_is_a, scores, outputs)])
        return scores

    test_is_a = assign_order(n, seed)
    scores = run(test_is_a)
    return combine_swapped(scores, run(~test_is_a)) if swap else scores


# ---- CLI ----

class InputError(Exception):
    pass


def load_judgements(path: str) -> Judgements:
    """A JSON list of [score, baseline_len, test_len] rows; InputError names the file and the problem."""
    try:
        rows = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: cannot read ({error})") from None
    except json.JSONDecodeError as error:
        raise InputError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(rows, list) or not rows:
        raise InputError(f"{path}: expected a non-empty JSON list of [score, baseline_len, test_len] rows")
    for i, row in enumerate(rows):
        if (not isinstance(row, list) or len(row) != 3
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in row)):
            raise InputError(f"{path}: row {i} is {json.dumps(row)[:80]}, expected [score, baseline_len, test_len]")
    try:
        return Judgements.from_rows(rows)
    except ValueError as error:
        raise InputError(f"{path}: {error}") from None


def _table(results: list[dict]) -> str:
    lines = [f"{'file':<44} {'n':>5}  " + "  ".join(f"{name:>20}" for name in ESTIMATORS)]
    for r in results:
        cells = [f"{100 * r[k]['win_rate']:5.1f} [{100 * r[k]['ci'][0]:4.1f}, {100 * r[k]['ci'][1]:4.1f}]"
                 for k in ESTIMATORS]
        lines.append(f"{Path(r['file']).name:<44} {r['n']:>5}  " + "  ".join(f"{c:>20}" for c in cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evals.win_rates", description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="+", metavar="FILE", help="JSON list of [score, baseline_len, test_len]")
    parser.add_argument("--json", action="store_true", help="print a JSON list, one object per file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples")
    args = parser.parse_args(argv)
    if args.bootstrap < 1:
        print(f"error: --bootstrap must be at least 1, got {args.bootstrap}", file=sys.stderr)
        return 2
    results = []
    for path in args.files:
        try:
            judgements = load_judgements(path)
        except InputError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        results.append({"file": path, **summarise(judgements, args.bootstrap, args.seed)})
    print(json.dumps(results, indent=2) if args.json else _table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
