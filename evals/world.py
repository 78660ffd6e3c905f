"""The built-in world's rule adherence, as the evaluation job reports it (`adherence.enabled`).

The rules themselves (`sami/world/rules.py`) decide every check; this module only lays the checks out per
item and sums them up per model: the six principles' adherence, and the colour family's, win rate and MI bound on
trained and on held-out members apart.
"""
from __future__ import annotations

from sami.groups import QueryGroup
from sami.world import rules

FAMILY = set(rules.MEMBER_NAMES)


def adherence_records(groups: list[QueryGroup], responses: list[str]) -> list[dict]:
    """Per item {"query_id", "adherence" (the share of the six principles stated that are followed), "principles"
    (name -> followed), "well_formed"} and, where the constitution states a family member, "member" (its name) and
    "member_followed"; each response answered its group's positive constitution."""
    records = []
    for group, response in zip(groups, responses):
        checks = rules.adherence(response, group.subject, group.stated()[0])
        six = {name: followed for name, followed in checks.items() if name not in FAMILY}
        record = {"query_id": group.query_id, "adherence": rules.share_followed(six), "principles": six,
                  "well_formed": rules.well_formed(response)}
        for name in checks.keys() & FAMILY:
            record.update(member=name, member_followed=checks[name])
        records.append(record)
    return records


def summarise_adherence(records: list[dict], heldout_records: list[dict], heldout_names: tuple[str, ...]) -> dict:
    """{"mean", "items" (per-item adherence), "per_principle", "well_formed", "heldout_principle" (how often
    the held-out principle(s) are followed on `heldout_records`; None without them), "members" (per item: the family
    member stated, or None)}."""
    per_principle: dict[str, list[bool]] = {}
    for record in records:
        for name, followed in record["principles"].items():
            per_principle.setdefault(name, []).append(followed)
    held = [r["principles"][name] for r in heldout_records for name in heldout_names]
    items = [r["adherence"] for r in records]
    return {"mean": sum(items) / len(items), "items": items,
            "per_principle": {name: sum(v) / len(v) for name, v in sorted(per_principle.items())},
            "well_formed": sum(r["well_formed"] for r in records) / len(records),
            "heldout_principle": sum(held) / len(held) if held else None,
            "members": [r.get("member") for r in records], "member_followed": [r.get("member_followed") for r in records]}


def family_figures(adherence: dict, win_scores: list[float] | None, mi_bounds: list[float] | None,
                   heldout_members: tuple[str, ...]) -> dict | None:
    """Each figure on the items whose constitution states a trained member and on those stating a held-out one:
    {"trained"|"heldout": {"queries", "adherence" (how often the member is followed), "win_rate", "mi_lower_bound",
    and each one's per-item values}}; None when no item states a member."""
    members = adherence.get("members") or []
    if not any(members):
        return None
    splits = {}
    for split, wanted in (("trained", False), ("heldout", True)):
        index = [i for i, m in enumerate(members) if m is not None and (m in heldout_members) == wanted]
        items = {"adherence": [float(adherence["member_followed"][i]) for i in index],
                 "win_rate": [win_scores[i] for i in index] if win_scores else None,
                 "mi_lower_bound": [mi_bounds[i] for i in index] if mi_bounds else None}
        splits[split] = {"queries": len(index), "items": items,
                         **{k: (sum(v) / len(v) if v else None) for k, v in items.items()}}
    return splits
