"""The built-in world's rule adherence, as the evaluation job reports it (`adherence.enabled`).

The rules themselves (`sami/world/rules.py`) decide every check; this module only lays the checks out per
item and sums them up per model.
"""
from __future__ import annotations

from sami.groups import QueryGroup
from sami.world import rules


def adherence_records(groups: list[QueryGroup], responses: list[str]) -> list[dict]:
    """Per item {"query_id", "adherence" (the share of stated principles followed), "principles" (name ->
    followed), "well_formed"}; each response answered its group's positive constitution."""
    records = []
    for group, response in zip(groups, responses):
        checks = rules.adherence(response, group.subject, group.stated()[0])
        records.append({"query_id": group.query_id, "adherence": rules.share_followed(checks),
                        "principles": checks, "well_formed": rules.well_formed(response)})
    return records


def summarise_adherence(records: list[dict], heldout_records: list[dict], heldout_names: tuple[str, ...]) -> dict:
    """{"mean", "items" (per-item adherence), "per_principle", "well_formed", "heldout_principle" (how often
    the held-out principle(s) are followed on `heldout_records`; None without them)}."""
    per_principle: dict[str, list[bool]] = {}
    for record in records:
        for name, followed in record["principles"].items():
            per_principle.setdefault(name, []).append(followed)
    held = [r["principles"][name] for r in heldout_records for name in heldout_names]
    items = [r["adherence"] for r in records]
    return {"mean": sum(items) / len(items), "items": items,
            "per_principle": {name: sum(v) / len(v) for name, v in sorted(per_principle.items())},
            "well_formed": sum(r["well_formed"] for r in records) / len(records),
            "heldout_principle": sum(held) / len(held) if held else None}
