"""The demo's figures from the evaluation job's results: table, report.json, report.md and plot per seed;
seeds.json and seeds.md over several seeds."""
from __future__ import annotations

import json
from pathlib import Path

from evals.statistics import paired_differences, summarise_over_seeds

COLUMNS = ("adherence", "adherence_heldout", "member_trained", "member_heldout", "well_formed", "mi_lower_bound",
           "mean_length", "win_rate_vs_base")
SPLITS = ("trained", "heldout")  # the colour family's members: stated in training or never
# Per-item values of each seed-level figure in the evaluation's results.json (None for the baseline's win rate).
PER_ITEM = {
    "adherence": lambda m: m["adherence"]["items"],
    "win_rate_vs_base": lambda m: m["win_rate_vs_baseline"] and m["win_rate_vs_baseline"]["scores"],
    "mi_lower_bound": lambda m: m["mi_bounds"],
}
COMPARED_WITH_SAMI = ("dpo", "sft")
# Per-item values of each family figure, on one split's items (None for the baseline's win rate).
FAMILY_ITEMS = {"adherence": "adherence", "win_rate_vs_base": "win_rate", "mi_lower_bound": "mi_lower_bound"}


def demo_figures(results: dict) -> dict:
    """The demo's report.json models from the evaluation job's results.json (the base model wins half)."""
    figures = {}
    for name, m in results["models"].items():
        adherence, win = m["adherence"], m["win_rate_vs_baseline"]
        figures[name] = {"adherence": adherence["mean"], "adherence_per_principle": adherence["per_principle"],
                         "adherence_heldout": adherence["heldout_principle"], "well_formed": adherence["well_formed"],
                         "mi_lower_bound": m["mi_lower_bound"], "mean_length": m["mean_length"],
                         "win_rate_vs_base": win["raw"]["win_rate"] if win else 0.5}
        if win:
            figures[name]["win_rate_vs_base_ci"] = win["raw"]["ci"]
        family = m.get("family") or {}
        for split in SPLITS:
            figures[name][f"member_{split}"] = family[split]["adherence"] if family else None
        figures[name]["family"] = {split: {k: family[split][k] for k in ("queries", *FAMILY_ITEMS.values())}
                                   for split in family}
    return figures


def table(results: dict) -> str:
    principles = sorted(next(iter(results.values()))["adherence_per_principle"])
    head = ["model", *COLUMNS, *(f"adh:{p}" for p in principles)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in results.items():
        cells = [name] + ["-" if m.get(c) is None else f"{m[c]:.3f}" for c in COLUMNS] \
            + [f"{m['adherence_per_principle'][p]:.2f}" for p in principles]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


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
    (out / "report.json").write_text(json.dumps({"meta": meta, "models": results}, indent=2))
    plot(results, out / "report.png")
    (out / "report.md").write_text(
        "# SAMI in the built-in world\n\n"
        f"Seed {meta['seed']}, {meta['iterations']} iterations, {meta['eval_queries']} held-out queries "
        f"(held-out principle: separate queries stating it), {meta['minutes']} minutes. The evaluation job's "
        f"report, responses and per-item judgments: `{meta['evaluation']}`.\n\n"
        + table(results) + "\n\n![results](report.png)\n"
    )
    return out / "report.md"


def seeds_summary(results: dict[int, dict], iterations: int) -> dict:
    """Per model and per SAMI - baseline difference: each figure's mean over seeds, the per-seed values, a
    95% t-interval over seeds and a 95% seed-stratified bootstrap interval over items (evals.statistics)."""
    seeds = list(results)
    names = [n for n in results[seeds[0]]["models"] if all(n in r["models"] for r in results.values())]

    def items(name: str, figure: str) -> list | None:
        per_seed = [PER_ITEM[figure](results[s]["models"][name]) for s in seeds]
        return None if any(v is None for v in per_seed) else per_seed

    def member_items(name: str, split: str, figure: str) -> list | None:
        per_seed = [(results[s]["models"][name].get("family") or {}).get(split, {}).get("items", {}).get(figure)
                    for s in seeds]
        return None if any(not v for v in per_seed) else per_seed

    family = {name: {split: {figure: summarise_over_seeds(v) for figure, key in FAMILY_ITEMS.items()
                             if (v := member_items(name, split, key))}
                     for split in SPLITS if member_items(name, split, "adherence")}
              for name in names}
    # each model's gain over the base model in following a member, paired by item within a seed
    gains = {name: {split: summarise_over_seeds([paired_differences(a, b) for a, b in zip(
                 member_items(name, split, "adherence"), member_items("base", split, "adherence"))])
                 for split in family[name]}
             for name in names if name != "base" and family.get(name) and family.get("base")}

    models = {name: {figure: summarise_over_seeds(v) for figure in PER_ITEM if (v := items(name, figure))}
              for name in names}
    sami = f"sami-iter{iterations}"
    differences = {}
    for other in (o for o in COMPARED_WITH_SAMI if o in names):
        differences[f"{sami} - {other}"] = {
            figure: summarise_over_seeds([paired_differences(a, b) for a, b in zip(items(sami, figure), items(other, figure))])
            for figure in PER_ITEM}
    return {"seeds": seeds, "iterations": iterations,
            "intervals": {"ci_seeds": "95% t-interval over the per-seed figures (df = seeds - 1)",
                          "ci_items": "95% percentile bootstrap over items, resampled within each seed (2000 resamples, "
                                      "seed 0); differences paired by item within a seed"},
            "models": models, "differences": differences,
            "family": {name: f for name, f in family.items() if f}, "family_gains": gains}


def _cell(summary: dict | None) -> str:
    if summary is None:
        return "-"
    seeds = summary["ci_seeds"]
    over_seeds = f"[{seeds[0]:.3f}, {seeds[1]:.3f}]" if seeds else "n/a"
    low, high = summary["ci_items"]
    return f"{summary['mean']:.3f} {over_seeds} [{low:.3f}, {high:.3f}]"


def write_seeds_report(out: Path, results: dict[int, dict], iterations: int) -> Path:
    """seeds.json and seeds.md in `out`; returns the path of seeds.md."""
    summary = seeds_summary(results, iterations)
    (out / "seeds.json").write_text(json.dumps(summary, indent=2))
    head = "| {} | adherence | win rate vs base | MI bound (nats) |\n|---|---|---|---|"

    def rows(table: dict) -> str:
        return "\n".join(f"| {name} | " + " | ".join(_cell(figures.get(f)) for f in PER_ITEM) + " |"
                         for name, figures in table.items())

    seeds = " ".join(map(str, summary["seeds"]))
    family = ""
    if summary["family"]:
        family_head = "| {} | trained members | held-out members |\n|---|---|---|"
        family = (
            "\n## The colour family: following a member, on trained and on held-out members\n\n"
            "How often the response follows the family member its constitution states (half the evaluation's "
            "queries state a member training never stated).\n\n" + family_head.format("model") + "\n"
            + "\n".join(f"| {name} | " + " | ".join(_cell(f.get(split, {}).get("adherence")) for split in SPLITS) + " |"
                         for name, f in summary["family"].items())
            + "\n\nGain over the base model, paired by item within a seed:\n\n" + family_head.format("model - base")
            + "\n" + "\n".join(f"| {name} | " + " | ".join(_cell(g.get(split)) for split in SPLITS) + " |"
                                for name, g in summary["family_gains"].items()) + "\n")
    path = out / "seeds.md"
    path.write_text(
        f"# SAMI in the built-in world: seeds {seeds}\n\n"
        f"Each cell: the mean over seeds, its 95% interval over seeds ({summary['intervals']['ci_seeds']}), then "
        f"its 95% interval over evaluation items ({summary['intervals']['ci_items']}). Per seed: "
        + ", ".join(f"`seed-{s}/report.md`" for s in summary["seeds"]) + ".\n\n"
        + head.format("model") + "\n" + rows(summary["models"]) + "\n"
        + (f"\n## Differences, iteration {iterations} of SAMI minus a baseline\n\n" + head.format("difference") + "\n"
           + rows(summary["differences"]) + "\n" if summary["differences"] else "") + family)
    return path
