"""Phase 3, judge (driver; an HTTP judge answers `judge.concurrency` requests at a time): every model against
the baseline with a random A/B order per item, raw / length-balanced / logistic win rates with bootstrap
intervals; MT-Bench single-answer and pairwise grading; in the built-in world, rule adherence per item. What
each judge wrote is kept under `judgments/` (and `mtbench/judgments/`)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from evals.config import EvalConfig
from evals.generate import ModelOutputs, words
from evals.log import log
from evals.plan import EvalPlan, library
from sami.jsonl import write_jsonl


@dataclass
class Judged:
    """Per model name, each judging family's summary (a model a family did not judge is absent)."""

    win_rates: dict[str, dict] = field(default_factory=dict)
    adherence: dict[str, dict] = field(default_factory=dict)
    mtbench: dict[str, dict] = field(default_factory=dict)


def judge_win_rates(cfg: EvalConfig, judge, plan: EvalPlan, outputs: dict[str, ModelOutputs], out: Path) -> dict[str, dict]:
    from evals.win_rates import Judgements, judge_against_baseline, summarise

    baseline = cfg.baseline_name
    base = outputs[baseline].positive_responses
    queries, positive_texts = [g.query for g in plan.groups], [g.constitutions[0] for g in plan.groups]
    metadata = [{"constitution": g.stated()[0], "subject": g.subject} for g in plan.groups]
    summaries = {}
    for name, output in outputs.items():
        if name == baseline:
            continue
        test, started, transcripts = output.positive_responses, time.time(), []
        scores = judge_against_baseline(judge, queries, positive_texts, test, base, seed=cfg.run.seed,
                                        swap=cfg.judge.swap, metadata=metadata, transcripts=transcripts)
        judgements = Judgements(scores, [words(r) for r in base], [words(r) for r in test])
        s = summaries[name] = summarise(judgements, cfg.win_rates.bootstrap, cfg.run.seed)
        s["scores"] = [float(x) for x in scores]  # per item, for intervals over several runs
        s["unparsed"] = sum(not t["parsed"] for one_pass in transcripts for t in one_pass)
        write_jsonl(out / "judgments" / f"{name}-vs-{baseline}.jsonl", [
            {"query_id": g.query_id, "score": float(x), "baseline_len": words(b), "test_len": words(t),
             "passes": [p[i] for p in transcripts]}
            for i, (g, x, b, t) in enumerate(zip(plan.groups, scores, base, test))])
        log(f"judge: {name} vs {baseline}: win rate {s['raw']['win_rate']:.3f}, length-balanced "
            f"{s['balanced']['win_rate']:.3f} [{s['balanced']['ci'][0]:.3f}, {s['balanced']['ci'][1]:.3f}] "
            f"({len(scores)} items, {time.time() - started:.0f}s)")
    return summaries


def judge_adherence(cfg: EvalConfig, plan: EvalPlan, outputs: dict[str, ModelOutputs], out: Path) -> dict[str, dict]:
    """The world's rule adherence of every model; each check per item in judgments/<model>-adherence.jsonl."""
    from evals.world import adherence_records, summarise_adherence

    summaries = {}
    for name, output in outputs.items():
        records = adherence_records(plan.groups, output.positive_responses)
        heldout = adherence_records(plan.heldout_principle, output.heldout_principle_responses) \
            if plan.heldout_principle else []
        s = summaries[name] = summarise_adherence(records, heldout, cfg.principles.heldout_principles)
        write_jsonl(out / "judgments" / f"{name}-adherence.jsonl",
                    [{"items": "main", **r} for r in records] + [{"items": "heldout_principle", **r} for r in heldout])
        log(f"adherence: {name}: {s['mean']:.3f}, well-formed {s['well_formed']:.3f}"
            + (f", held-out principle {s['heldout_principle']:.3f}" if heldout else ""))
    return summaries


def judge_mtbench(cfg: EvalConfig, client, plan: EvalPlan, outputs: dict[str, ModelOutputs], out: Path) -> dict[str, dict]:
    from evals.mtbench import category_table, judge_pairwise, judge_single, load_judge_prompts

    prompts = load_judge_prompts(cfg.mtbench.judge_prompts)
    principles = "\n".join(f"- {p.definition}" for p in library(cfg)) if cfg.mtbench.principle_conditioned else None
    answers = {name: {a.question_id: a for a in o.mtbench_answers} for name, o in outputs.items()}
    baseline = cfg.baseline_name
    tables = {}
    for name, by_id in answers.items():
        single = judge_single(client, prompts, plan.mtbench_questions, by_id)
        write_jsonl(out / "mtbench" / "judgments" / f"{name}-single.jsonl", single)
        tables[name] = {"single": {f"turn_{t}": category_table([r for r in single if r["turn"] == t]) for t in (1, 2)},
                        "pairwise": None}
        if name != baseline:
            pairwise = judge_pairwise(client, prompts, plan.mtbench_questions, by_id, answers[baseline],
                                      principles=principles)
            write_jsonl(out / "mtbench" / "judgments" / f"{name}-vs-{baseline}.jsonl", pairwise)
            tables[name]["pairwise"] = category_table(pairwise)
        log(f"mt-bench: {name}: mean score turn 1 {tables[name]['single']['turn_1']['overall']['mean']:.2f}")
    return tables


def judge_all(cfg: EvalConfig, plan: EvalPlan, outputs: dict[str, ModelOutputs], out: Path) -> Judged:
    """Every judging family the config turns on."""
    from evals.judges import make_judge

    judge = make_judge(cfg.judge) if cfg.win_rates.enabled or cfg.mtbench.enabled else None
    return Judged(win_rates=judge_win_rates(cfg, judge, plan, outputs, out) if cfg.win_rates.enabled else {},
                  mtbench=judge_mtbench(cfg, judge.client, plan, outputs, out) if cfg.mtbench.enabled else {},
                  adherence=judge_adherence(cfg, plan, outputs, out) if cfg.adherence.enabled else {})
