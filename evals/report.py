"""Phase 4, report: `results.json`, and `report.md` with its PNG plots (win rate per model with 95%
intervals, MI bound per model, response-length distributions), all in the evaluation's output folder."""
from __future__ import annotations

import json
import os
from pathlib import Path

from evals.config import EvalConfig
from evals.generate import ModelOutputs, words
from evals.judge import Judged
from evals.plan import EvalPlan
from evals.world import family_figures

ESTIMATORS = ("raw", "balanced", "logistic")


def model_results(path: str, o: ModelOutputs, judged: Judged, name: str, heldout_members: tuple[str, ...]) -> dict:
    """One model's entry in results.json."""
    lengths = [words(r) for r in o.positive_responses]
    adherence, win = judged.adherence.get(name), judged.win_rates.get(name)
    return {
        "path": path,
        "mean_length": sum(lengths) / len(lengths) if lengths else None,
        "lengths": lengths,
        "mi_lower_bound": o.mi_lower_bound,
        "mi_bounds": o.mi_bounds,
        "win_rate_vs_baseline": win,
        "adherence": adherence,
        "family": adherence and family_figures(adherence, win and win["scores"], o.mi_bounds, heldout_members),
        "mtbench": judged.mtbench.get(name),
        "gsm8k": {k: v for k, v in o.gsm8k.items() if k != "items"} if o.gsm8k else None,
    }


def build_results(cfg: EvalConfig, plan: EvalPlan, outputs: dict[str, ModelOutputs], judged: Judged) -> dict:
    """results.json: what was evaluated (`meta`) and every model's figures (`models`, in the config's order)."""
    meta = {"name": cfg.run.name, "seed": cfg.run.seed, "baseline": cfg.baseline_name, "queries": len(plan.groups),
            "heldout_principle_queries": len(plan.heldout_principle),
            "heldout_principles": list(cfg.principles.heldout_principles),
            "heldout_members": list(cfg.principles.heldout_members),
            "constitutions_per_query": cfg.principles.num_constitutions, "judge": {"backend": cfg.judge.backend,
            "model": cfg.judge.model, "swap": cfg.judge.swap}}
    members = cfg.principles.heldout_members
    return {"meta": meta, "models": {m.name: model_results(m.path, outputs[m.name], judged, m.name, members)
                                     for m in cfg.models}}


def _cell(summary: dict | None, estimator: str) -> str:
    if not summary:
        return "baseline"
    s = summary[estimator]
    return f"{100 * s['win_rate']:.1f} [{100 * s['ci'][0]:.1f}, {100 * s['ci'][1]:.1f}]"


def _number(value, fmt: str = "{:.3f}") -> str:
    return "n/a" if value is None else fmt.format(value)


def markdown(results: dict, plots: list[str]) -> str:
    meta, models = results["meta"], results["models"]
    judge = meta["judge"]
    lines = [f"# Evaluation: {meta['name']}", "",
             f"{meta['queries']} held-out queries, {meta['constitutions_per_query']} constitutions each, seed "
             f"{meta['seed']}. Baseline: **{meta['baseline']}**. Judge: {judge['backend']}"
             + (f" ({judge['model']})" if judge.get("model") else "")
             + (", both A/B orders" if judge.get("swap") else ", random A/B order per item") + "."]
    if any(m["lengths"] for m in models.values()):
        lines += ["", "## Win rate against the baseline, MI bound, length", "",
                  "Win rates in %, with bootstrap 95% intervals. *Length-balanced* is the SAMI paper's length-controlled "
                  "figure (mean of the strata \"test longer\" / \"not longer\"); *logistic* reads the win rate off a "
                  "logistic fit on the length difference at zero difference.", "",
                  "| model | raw | length-balanced | logistic | MI bound (nats) | mean length (words) |",
                  "|---|---|---|---|---|---|"]
        for name, m in models.items():
            w = m.get("win_rate_vs_baseline")
            lines.append(f"| {name} | {_cell(w, 'raw')} | {_cell(w, 'balanced')} | {_cell(w, 'logistic')} | "
                         f"{_number(m.get('mi_lower_bound'))} | {m['mean_length']:.1f} |")
    adherence = {n: m["adherence"] for n, m in models.items() if m.get("adherence")}
    if adherence:
        principles = sorted(next(iter(adherence.values()))["per_principle"])
        held = ", ".join(meta.get("heldout_principles", []))
        lines += ["", "## Adherence (the world's rules)", "",
                  "The share of its positive constitution's principles a response follows (a malformed response "
                  f"follows none), per principle, and how often the held-out principle ({held or 'none'}) is followed "
                  f"on {meta.get('heldout_principle_queries', 0)} further queries whose constitution states it.", "",
                  "| model | adherence | well-formed | held-out principle | " + " | ".join(principles) + " |",
                  "|---|---|---|---|" + "---|" * len(principles)]
        for name, a in adherence.items():
            lines.append(f"| {name} | {a['mean']:.3f} | {a['well_formed']:.3f} | {_number(a['heldout_principle'])} | "
                         + " | ".join(f"{a['per_principle'][p]:.2f}" for p in principles) + " |")
    family = {n: m["family"] for n, m in models.items() if m.get("family")}
    if family:
        lines += ["", "## The colour family: trained and held-out members", "",
                  "Every other query's constitution states a member training never stated ("
                  + ", ".join(meta.get("heldout_members", [])) + "); the others a trained one. Adherence: how often "
                  "the member is followed; win rate and MI bound on the same items.", "",
                  "| model | trained: adherence | win rate | MI bound | held-out: adherence | win rate | MI bound |",
                  "|---|---|---|---|---|---|---|"]
        for name, f in family.items():
            lines.append(f"| {name} | " + " | ".join(_number(f[split][k]) for split in ("trained", "heldout")
                                                     for k in ("adherence", "win_rate", "mi_lower_bound")) + " |")
    mtbench = {n: m["mtbench"] for n, m in models.items() if m.get("mtbench")}
    if mtbench:
        categories = sorted({c for t in mtbench.values() for c in t["single"]["turn_1"]}, key=lambda c: (c == "overall", c))
        lines += ["", "## MT-Bench", "", "Single-answer grades (1-10), turn 1 / turn 2; pairwise first-turn win rate "
                  "against the baseline (both orders, disagreement is a tie).", "",
                  "| model | " + " | ".join(categories) + " | pairwise vs baseline |",
                  "|---|" + "---|" * (len(categories) + 1)]
        for name, t in mtbench.items():
            cells = [f"{_number(t['single']['turn_1'].get(c, {}).get('mean'), '{:.2f}')} / "
                     f"{_number(t['single']['turn_2'].get(c, {}).get('mean'), '{:.2f}')}" for c in categories]
            pair = t["pairwise"]["overall"]["mean"] if t.get("pairwise") else None
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {_number(pair, '{:.3f}')} |")
    gsm8k = {n: m["gsm8k"] for n, m in models.items() if m.get("gsm8k")}
    if gsm8k:
        ks = sorted({int(k) for g in gsm8k.values() for k in g["pass_at_k"]})
        lines += ["", "## GSM8K", "", "| model | problems | greedy accuracy | " + " | ".join(f"pass@{k}" for k in ks) + " |",
                  "|---|---|---|" + "---|" * len(ks)]
        for name, g in gsm8k.items():
            passes = [_number(g["pass_at_k"].get(k, g["pass_at_k"].get(str(k)))) for k in ks]
            lines.append(f"| {name} | {g['n']} | {g['greedy_accuracy']:.3f} | " + " | ".join(passes) + " |")
    lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in plots]
    lines += ["", "Files: `results.json` (every figure above), `responses/<model>.jsonl`, "
              "`judgments/<model>-vs-<baseline>.jsonl`" + (", `judgments/<model>-adherence.jsonl`" if adherence else "")
              + (", `mtbench/`" if mtbench else "") + ", `config.yaml`."]
    return "\n".join(lines) + "\n"


def plot(results: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = results["models"]
    names = list(models)
    written = []
    tested = [n for n in names if models[n].get("win_rate_vs_baseline")]
    if tested:
        fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(tested) + 2), 3.5))
        for offset, estimator in zip((-0.25, 0, 0.25), ESTIMATORS):
            values = [models[n]["win_rate_vs_baseline"][estimator]["win_rate"] for n in tested]
            cis = [models[n]["win_rate_vs_baseline"][estimator]["ci"] for n in tested]
            errors = [[v - lo for v, (lo, _) in zip(values, cis)], [hi - v for v, (_, hi) in zip(values, cis)]]
            ax.errorbar([i + offset for i in range(len(tested))], values, yerr=errors, fmt="o", capsize=3, label=estimator)
        ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.set_xticks(range(len(tested)), tested, rotation=30)
        ax.set_ylabel(f"win rate vs {results['meta']['baseline']}")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "win_rates.png", dpi=120)
        plt.close(fig)
        written.append("win_rates.png")
    mi = [n for n in names if models[n].get("mi_lower_bound") is not None]
    if mi:
        fig, ax = plt.subplots(figsize=(max(4, 1.0 * len(mi) + 2), 3.5))
        ax.plot(range(len(mi)), [models[n]["mi_lower_bound"] for n in mi], "o-")
        ax.set_xticks(range(len(mi)), mi, rotation=30)
        ax.set_ylabel("MI lower bound (nats)")
        fig.tight_layout()
        fig.savefig(out / "mi_bound.png", dpi=120)
        plt.close(fig)
        written.append("mi_bound.png")
    if not any(models[n]["lengths"] for n in names):
        return written
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for n in names:
        ax.hist(models[n]["lengths"], bins=20, histtype="step", label=n)
    ax.set_xlabel("response length (words)")
    ax.set_ylabel("responses")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "lengths.png", dpi=120)
    plt.close(fig)
    written.append("lengths.png")
    return written


def write_report(out: Path, results: dict) -> Path:
    """Write results.json, the plots and report.md into `out`; returns the report's path."""
    out = Path(out)
    plots = plot(results, out)
    path = out / "report.md"
    path.write_text(markdown(results, plots))
    # last, under a temporary name: results.json is whole and new, or the previous one
    (out / "results.json.tmp").write_text(json.dumps(results, indent=2))
    os.replace(out / "results.json.tmp", out / "results.json")
    return path
