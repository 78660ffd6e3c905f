"""Phase 1, plan (driver): what every model is asked. The held-out queries go through training's own planning
stage (`sami.groups.draw_constitutions` + `plan_groups`) with the evaluation's seeds; MT-Bench questions and
GSM8K items are loaded here too."""
from __future__ import annotations

import random
from dataclasses import dataclass, field

from evals.config import EvalConfig
from sami.config import ConfigError
from sami.constitutions import Constitution
from sami.groups import QueryGroup, draw_constitutions, plan_groups
from sami.principle_writer import configured_library
from sami.principles import Principle


@dataclass
class EvalPlan:
    """What every model is asked, built once on the driver."""

    groups: list[QueryGroup]  # held-out queries, C constitutions each, the positive one first
    heldout_principle: list[QueryGroup] = field(default_factory=list)  # C = 1: states the held-out principle(s)
    mtbench_questions: list = field(default_factory=list)
    gsm8k_items: list[dict] = field(default_factory=list)


@dataclass(frozen=True)
class EvaluationSeeds:
    """The evaluation's shuffles: one stream per (seed, query, constitution), the same for the generation and
    the training rendering, so the MI bound scores each response under the constitution it answered."""

    seed: int

    def renderings(self, query_id: str, c: int) -> tuple[list[random.Random], list[random.Random]]:
        def streams():
            return [random.Random(f"eval/{self.seed}/{query_id}/{i}") for i in range(c)]

        return streams(), streams()


@dataclass(frozen=True)
class ContinuedSeeds:
    """Render with the stream that drew the constitution, where it left off (the held-out principle's items)."""

    streams: dict[str, random.Random]

    def renderings(self, query_id: str, c: int) -> tuple[list[random.Random], list[random.Random]]:
        twin = random.Random()
        twin.setstate(self.streams[query_id].getstate())
        return [self.streams[query_id]] * c, [twin] * c


def library(cfg: EvalConfig) -> list[Principle]:
    return configured_library(cfg.principles)


def draw_evaluation_constitutions(cfg: EvalConfig, principles: list[Principle], query_ids: list[str]) -> list[list[Constitution]]:
    """Training's draw with the evaluation's seed; with a family, every other query states a held-out member instead
    of a trained one, so each figure can be read on trained and on held-out members apart."""
    seed, heldout = f"eval/{cfg.run.seed}", cfg.principles.heldout_members
    if not heldout:
        return draw_constitutions(principles, cfg.principles, query_ids, seed)
    return [draw_constitutions(principles, cfg.principles, [q], seed, heldout if i % 2 else None)[0]
            for i, q in enumerate(query_ids)]


def heldout_principle_groups(cfg: EvalConfig, rows: list[dict], principles: list[Principle]) -> list[QueryGroup]:
    """Each query's positive constitution states the held-out principle(s) and as many training principles,
    drawn per query, as make up `principles_per_constitution` (as training draws them)."""
    p, members, heldout = cfg.principles, cfg.principles.heldout_members, cfg.principles.heldout_principles
    if not heldout:
        raise ConfigError("adherence.heldout_principle_queries: there is no held-out principle (principles.heldout)")
    training = [q.name for q in principles if q.name not in heldout + members + p.trained_members]
    count = (p.principles_per_constitution or len(training)) - len(heldout)
    if not 0 <= count <= len(training):
        raise ConfigError(f"adherence.heldout_principle_queries: principles.principles_per_constitution "
                          f"({p.principles_per_constitution}) leaves no room for the held-out principle(s) {list(heldout)}")
    streams = {row["query_id"]: random.Random(f"eval-heldout-principle/{cfg.run.seed}/{row['query_id']}") for row in rows}
    constitutions = []
    for row in rows:
        drawn = streams[row["query_id"]].sample(training, count)
        drawn += [streams[row["query_id"]].choice(p.trained_members)] if p.trained_members else []
        constitutions.append([Constitution(tuple((name, True) for name in sorted(drawn + list(heldout))))])
    return plan_groups(rows, principles, constitutions, cfg.data.task, ContinuedSeeds(streams))


def heldout_rows(cfg: EvalConfig) -> tuple[list[dict], list[dict]]:
    """(the queries every benchmark on queries uses, the further ones for the held-out principle)."""
    from sami.data import load_queries, split_queries

    if not cfg.needs_queries:
        return [], []
    rows, wanted = load_queries(cfg.data, cfg.run.seed), cfg.adherence.heldout_principle_queries
    if cfg.data.heldout_queries:
        rows = split_queries(rows, cfg.data.heldout_queries)[1]
    rows, extra_rows = rows[: cfg.num_queries], rows[cfg.num_queries :][:wanted] if wanted else []
    if len(extra_rows) < wanted:
        raise ConfigError(f"adherence.heldout_principle_queries ({wanted}) needs {cfg.num_queries} + {wanted} "
                          f"held-out queries, there are {len(rows) + len(extra_rows)} (data.heldout_queries)")
    return rows, extra_rows


def build_plan(cfg: EvalConfig) -> EvalPlan:
    rows, extra_rows = heldout_rows(cfg)
    principles = library(cfg) if rows else []
    try:
        constitutions = draw_evaluation_constitutions(cfg, principles, [r["query_id"] for r in rows])
    except ValueError as e:
        raise ConfigError(f"principles: {e}") from None
    plan = EvalPlan(plan_groups(rows, principles, constitutions, cfg.data.task, EvaluationSeeds(cfg.run.seed)))
    if extra_rows:
        plan.heldout_principle = heldout_principle_groups(cfg, extra_rows, principles)
    if cfg.mtbench.enabled:
        from evals.mtbench import load_questions

        plan.mtbench_questions = load_questions(cfg.mtbench.questions)[: cfg.mtbench.max_questions]
    if cfg.gsm8k.enabled:
        from evals.gsm8k import load_gsm8k

        plan.gsm8k_items = load_gsm8k(cfg.gsm8k.source, cfg.gsm8k.split, cfg.gsm8k.max_items)
    return plan
