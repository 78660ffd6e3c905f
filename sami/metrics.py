"""Training and evaluation figures as Ray metrics, so they show on the Ray dashboard (and Grafana).

Every gauge is set at construction ("pre-seeded": 0, phase "idle") so its graph exists from the job's first
scrape instead of appearing only after the first iteration. Outside a Ray driver or worker (plain unit
tests) `RunMetrics` records nothing. Names are exported with Ray's `ray_` prefix, e.g. `ray_sami_loss`.

    metrics = RunMetrics(job="train", run_name=cfg.run.name)
    metrics.set_phase("generate")
    metrics.record(iteration, {"loss": 0.52, "mi_lower_bound": 0.17, "filtered_empty": 3, ...})
"""
from __future__ import annotations

import math

from sami.filters import REASONS as FILTER_REASONS

PHASES = ("write_principles", "generate", "train", "sync", "checkpoint", "evaluate", "idle")
# One gauge per figure; `record` ignores keys it does not know (the metrics.jsonl record has more).
GAUGES = {
    "iteration": "the iteration the figures belong to",
    "loss": "mean training loss of the iteration",
    "mi_lower_bound": "InfoNCE lower bound on I(Y; C | X), nats (log C - SAMI loss)",
    "row_accuracy": "share of SAMI matrix rows whose diagonal entry is the largest",
    "col_accuracy": "share of SAMI matrix columns whose diagonal entry is the largest",
    "kl": "KL(policy || reference) on response tokens",
    "generation_tokens_per_second": "rollout throughput, response tokens generated per second",
    "learner_tokens_per_second": "learner throughput, real tokens (no padding) through the policy per second",
    "learner_padded_tokens_per_second": "learner throughput, tokens the forward passes processed (padding included) per second",
    "mfu": "model-FLOPs utilisation: 6 x parameters x tokens trained (+ 2 x for a reference) per second / measured matmul peak",
    "staleness": "iterations between the weights that generated the groups and the on-policy ones (one_step_off: 1)",
    "sync_seconds": "learner -> rollout weight sync and verification, seconds",
    "sync_bytes": "bytes moved by one weight sync",
    "response_tokens": "mean response length, tokens",
    "groups": "query groups that survived filtering",
    "truncated": "responses cut at max_new_tokens",
    "win_rate": "evaluation: win rate against the baseline",
    "adherence": "evaluation: share of responses that follow the constitution",
    "warning_count": "health warnings of the iteration (loss explosion, filtered groups jumping)",
    "engine_restarts": "rollout engines restarted (and brought back to the current weights) in the iteration",
    "learner_restarts": "times the learner group was restarted after a failure, so far in this job",
}
# The learner's record names the sync time `time_sync`; the dashboard shows it as sync_seconds.
ALIASES = {"time_sync": "sync_seconds"}


LOSS_EXPLOSION = 20.0  # a step's loss this many times the run's first loss
KEPT_SHARE_DROP = 0.2  # the share of groups surviving the filters falling this much from one iteration to the next


def kept_share(record: dict) -> float:
    dropped = sum(v for k, v in record.items() if k.startswith("filtered_"))
    return record["groups"] / max(record["groups"] + dropped, 1)


def health_warnings(record: dict, first_loss: float | None, previous: dict | None) -> list[str]:
    """What a person should look at now: a loss exploding, or responses ceasing to be well formed."""
    out = []
    worst = max(record.get("loss_per_step") or [record["loss"]])
    if first_loss and worst > LOSS_EXPLOSION * abs(first_loss):
        out.append(f"the loss reached {worst:.4g}, {worst / abs(first_loss):.0f}x the run's first loss {first_loss:.4g}")
    if previous is not None and kept_share(previous) - kept_share(record) >= KEPT_SHARE_DROP:
        out.append(f"groups kept by the filters fell from {kept_share(previous):.0%} to {kept_share(record):.0%} "
                   f"(filtered: { {k: v for k, v in record.items() if k.startswith('filtered_') and v} })")
    return out


def gauge_values(values: dict) -> tuple[dict[str, float], dict[str, float]]:
    """Split a record into (gauge name -> value, filter reason -> count); drops non-numbers and NaN."""
    gauges, filtered = {}, {}
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            continue
        name = ALIASES.get(key, key)
        if name in GAUGES:
            gauges[name] = float(value)
        elif name.startswith("filtered_") and name.removeprefix("filtered_") in FILTER_REASONS:
            filtered[name.removeprefix("filtered_")] = float(value)
    return gauges, filtered


class RunMetrics:
    def __init__(self, job: str, run_name: str):
        import ray

        self.enabled = ray.is_initialized()
        if not self.enabled:
            return
        from ray.util.metrics import Gauge

        keys = ("job", "run")
        self.tags = {"job": job, "run": run_name}
        self.gauges = {
            name: Gauge(f"sami_{name}", description=f"SAMI: {text}", tag_keys=keys) for name, text in GAUGES.items()
        }
        self.filtered = Gauge("sami_filtered_groups", description="SAMI: query groups dropped by the filters in the "
                              "last iteration, per reason", tag_keys=keys + ("reason",))
        self.phase = Gauge("sami_phase", description="SAMI: 1 for the phase the job is in, 0 for the others",
                           tag_keys=keys + ("phase",))
        for gauge in [*self.gauges.values(), self.filtered, self.phase]:
            gauge.set_default_tags(self.tags)
        for gauge in self.gauges.values():
            gauge.set(0.0)
        for reason in FILTER_REASONS:
            self.filtered.set(0.0, tags={"reason": reason})
        self.set_phase("idle")

    def set_phase(self, name: str) -> None:
        if name not in PHASES:
            raise ValueError(f"unknown phase {name!r}; known: {', '.join(PHASES)}")
        if self.enabled:
            for phase in PHASES:
                self.phase.set(1.0 if phase == name else 0.0, tags={"phase": phase})

    def record(self, iteration: int, values: dict) -> None:
        if not self.enabled:
            return
        gauges, filtered = gauge_values({**values, "iteration": iteration})
        for name, value in gauges.items():
            self.gauges[name].set(value)
        for reason, count in filtered.items():
            self.filtered.set(count, tags={"reason": reason})
