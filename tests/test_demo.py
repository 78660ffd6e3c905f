"""The algorithm's regression test: the demo's SAMI run, 2 iterations, raises adherence and the MI bound; the
demo's report.json schema and the seeds' summary from the evaluation job's results."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCHEMA = {"adherence", "adherence_per_principle", "adherence_heldout", "well_formed", "mi_lower_bound", "mean_length",
          "win_rate_vs_base", "member_trained", "member_heldout", "family"}


def family(items: list[float], wins: list[float] | None) -> dict:
    """The family figures of a model whose member adherence is `items` on trained members, half that on held-out."""
    splits = {}
    for split, values in (("trained", items), ("heldout", [v / 2 for v in items])):
        per_item = {"adherence": values, "win_rate": wins, "mi_lower_bound": [v - 0.5 for v in values]}
        splits[split] = {"queries": len(values), "items": per_item,
                         **{k: v and sum(v) / len(v) for k, v in per_item.items()}}
    return splits


def evaluation_results(adherence: dict[str, list[float]], shift: float = 0.0) -> dict:
    """The evaluation job's results.json for models given their per-item adherence (wins: vs the first model)."""
    base = next(iter(adherence.values()))
    models = {}
    for name, items in adherence.items():
        wins = [1.0 if a > b else 0.0 if b > a else 0.5 for a, b in zip(items, base)]
        models[name] = {
            "mean_length": 9.5, "mi_lower_bound": sum(items) / len(items) - 0.5 + shift,
            "mi_bounds": [a - 0.5 + shift for a in items],
            "adherence": {"mean": sum(items) / len(items), "items": items, "per_principle": {"concise": 0.5},
                          "well_formed": 1.0, "heldout_principle": 0.4},
            "win_rate_vs_baseline": None if items is base else
            {"raw": {"win_rate": sum(wins) / len(wins), "ci": [0.1, 0.9]}, "scores": wins},
            "family": family(items, None if items is base else wins),
        }
    return {"meta": {}, "models": models}


def test_the_demo_report_keeps_its_schema(tmp_path):
    from pipelines.demo_report import demo_figures, write_report

    figures = demo_figures(evaluation_results({"base": [0.5, 0.5], "sami-iter1": [1.0, 0.5]}))
    write_report(tmp_path, figures, {"seed": 0, "iterations": 1, "eval_queries": 2, "base_model": "b",
                                     "evaluation": str(tmp_path / "eval"), "minutes": 1.0})
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report) == {"meta", "models"}
    assert set(report["models"]["base"]) == SCHEMA and report["models"]["base"]["win_rate_vs_base"] == 0.5
    assert set(report["models"]["sami-iter1"]) == SCHEMA | {"win_rate_vs_base_ci"}
    assert report["models"]["sami-iter1"]["win_rate_vs_base"] == 0.75
    assert report["models"]["sami-iter1"]["adherence_heldout"] == 0.4
    assert (report["models"]["sami-iter1"]["member_trained"], report["models"]["sami-iter1"]["member_heldout"]) == (0.75, 0.375)


def test_time_breakdown_counts_the_iterations_wall_time_as_work(tmp_path):
    from pipelines.demo import time_breakdown

    # the second SAMI iteration generated inside its training (one_step_off): its wall time counts, not the phases
    for name, rows in {"sami": [{"time_generate": 2.0, "time_train": 5.0, "time_iteration": 8.0},
                                {"time_generate": 4.0, "time_train": 5.0, "time_iteration": 7.0}],
                       "sft": [{"time_generate": 0.1, "time_train": 2.0, "time_iteration": 2.1}]}.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    t = time_breakdown(100.0, 101.0, 131.0, 171.0, [tmp_path / "sami", tmp_path / "sft"])
    # 71 s in all: 1 s for the base model, 17.1 s of training work (in 30 s of training), 40 s of evaluation, and
    # 12.9 s of overhead: 18.4% of the 70 s after the base model
    assert t == {"total_s": 71.0, "base_model_s": 1.0, "training_s": 30.0, "training_work_s": 17.1, "evaluation_s": 40.0,
                 "overhead_s": 12.9, "overhead_share": 0.184}


def test_seeds_summary_pairs_items_within_a_seed(tmp_path):
    from pipelines.demo_report import write_seeds_report

    results = {seed: evaluation_results({"base": [0.5] * 4, "sami-iter2": [1.0, 1.0, 0.5, 0.5 + seed / 4],
                                         "dpo": [0.5, 1.0, 0.5, 0.5], "sft": [1.0] * 4}, shift=seed / 10)
               for seed in (0, 1, 2)}
    write_seeds_report(tmp_path, results, iterations=2)
    summary = json.loads((tmp_path / "seeds.json").read_text())
    sami = summary["models"]["sami-iter2"]["adherence"]
    assert sami["per_seed"] == [0.75, 0.8125, 0.875] and sami["mean"] == pytest.approx(0.8125)
    half = 4.3027 * 0.0625 / math.sqrt(3)  # sd of the three per-seed values is 0.0625
    assert sami["ci_seeds"] == pytest.approx([0.8125 - half, 0.8125 + half])
    assert "win_rate_vs_base" not in summary["models"]["base"]
    assert summary["models"]["sft"]["win_rate_vs_base"]["per_seed"] == [1.0, 1.0, 1.0]
    minus_dpo = summary["differences"]["sami-iter2 - dpo"]
    assert minus_dpo["adherence"]["per_seed"] == pytest.approx([0.125, 0.1875, 0.25])
    assert minus_dpo["mi_lower_bound"]["per_seed"] == pytest.approx([0.125, 0.1875, 0.25])
    assert summary["differences"]["sami-iter2 - sft"]["adherence"]["mean"] == pytest.approx(-0.1875)
    assert "| sami-iter2 - dpo |" in (tmp_path / "seeds.md").read_text()
    # following a family member, per split, and each model's gain over the base model paired by item
    assert summary["family"]["sami-iter2"]["heldout"]["adherence"]["per_seed"] == pytest.approx([0.375, 0.40625, 0.4375])
    assert summary["family_gains"]["sami-iter2"]["heldout"]["per_seed"] == pytest.approx([0.125, 0.15625, 0.1875])
    assert summary["family_gains"]["sft"]["trained"]["mean"] == pytest.approx(0.5)
    assert "base" not in summary["family_gains"]
    assert "| sft | 0.500 [" in (tmp_path / "seeds.md").read_text().split("Gain over the base")[1]


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_two_sami_iterations_raise_adherence_and_mi_bound(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        # The demo's world and settings, smaller: 2 iterations of 128 queries seen 3 times (24 steps, half
        # the demo's, at twice its learning rate).
        [sys.executable, "-m", "pipelines.demo", "--skip-baselines", "--iterations", "2", "--out", str(out),
         "--eval-queries", "150", "data.queries_per_iteration=128", "schedule.steps_per_iteration=24",
         "optim.lr=3e-4"],
        cwd=REPO, capture_output=True, text=True, timeout=450, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # The console: the project's lines only, no cursor-control codes on a pipe; the framework's output in demo.log.
    shown = proc.stdout + proc.stderr
    assert "\r" not in shown and "\x1b[" not in shown, shown[-3000:]
    assert f"log: {out / 'demo.log'} (" in shown and "iteration 2 done: loss" in shown and "RayTrainWorker" not in shown
    assert len([line for line in shown.splitlines() if line.strip()]) <= 60, shown  # measured 35; the whole demo 78
    log = (out / "demo.log").read_text()
    assert "Started a local Ray instance" in log and "(RayTrainWorker pid=" in log and "iteration 2 done: loss" in log
    report = json.loads((out / "report.json").read_text())["models"]
    base, last = report["base"], report["sami-iter2"]
    print({name: {k: round(m[k], 3) for k in ("adherence", "mi_lower_bound", "win_rate_vs_base")} for name, m in report.items()})
    assert last["adherence"] > base["adherence"] + 0.04
    assert last["mi_lower_bound"] > base["mi_lower_bound"] + 0.02
    assert last["win_rate_vs_base"] > 0.5
    assert last["well_formed"] > 0.85
    assert set(last) == SCHEMA | {"win_rate_vs_base_ci"}
    assert last["family"]["heldout"]["queries"] == 75 and last["member_heldout"] is not None
    assert (out / "eval" / "results.json").is_file() and (out / "eval" / "judgments" / "sami-iter2-adherence.jsonl").is_file()
    assert (out / "report.png").stat().st_size > 0 and "sami-iter2" in (out / "report.md").read_text()
