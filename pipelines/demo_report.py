"""The demo's table, report.json, report.md and plot."""
from __future__ import annotations

import json
from pathlib import Path

from evals.win_rates import summarise

COLUMNS = ("adherence", "adherence_heldout", "well_formed", "mi_lower_bound", "mean_length", "win_rate_vs_base")


def with_intervals(results: dict) -> dict:
    """Drop per-item scores, add a bootstrap 95% interval to each win rate."""
    out = {}
    for name, metrics in results.items():
        m = {k: v for k, v in metrics.items() if k != "win_scores"}
        if metrics.get("win_scores"):
            m["win_rate_vs_base_ci"] = summarise([[s, 0, 0] for s in metrics["win_scores"]])["raw"]["ci"]
        out[name] = m
    return out


def table(results: dict) -> str:
    principles = sorted(next(iter(results.values()))["adherence_per_principle"])
    head = ["model", *COLUMNS, *(f"adh:{p}" for p in principles)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in results.items():
        cells = [name] + [f"{m[c]:.3f}" for c in COLUMNS] + [f"{m['adherence_per_principle'][p]:.2f}" for p in principles]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def print_table(results: dict) -> None:
    print(table(results))


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, key, title in zip(axes, ("adherence", "mi_lower_bound", "win_rate_vs_base"),
                              ("adherence (training principles)", "MI lower bound (nats)", "win rate vs base")):
        values = [results[n][key] for n in names]
        errors = None
        if key == "win_rate_vs_base":
            cis = [results[n].get("win_rate_vs_base_ci", [v, v]) for n, v in zip(names, values)]
            errors = [[v - lo for v, (lo, _) in zip(values, cis)], [hi - v for v, (_, hi) in zip(values, cis)]]
        colours = ["#888" if n == "base" else "#1f77b4" if n.startswith("sami-iter") else "#ff7f0e" for n in names]
        ax.bar(names, values, yerr=errors, color=colours, capsize=3)
        if key == "adherence":
            ax.bar(names, [results[n]["adherence_heldout"] for n in names], color="none", edgecolor="k", hatch="//",
                   label="held-out principle")
            ax.legend(loc="lower right")
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(out: Path, results: dict, meta: dict) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    results = with_intervals(results)
    (out / "report.json").write_text(json.dumps({"meta": meta, "models": results}, indent=2))
    plot(results, out / "report.png")
    (out / "report.md").write_text(
        "# SAMI in the built-in world\n\n"
        f"Seed {meta['seed']}, {meta['iterations']} iterations, {meta['eval_queries']} held-out queries "
        f"(held-out principle: separate queries stating it), {meta['minutes']} minutes.\n\n"
        + table(results) + "\n\n![results](report.png)\n"
    )
    return out / "report.md"
