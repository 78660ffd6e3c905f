"""The node types a cluster config declares, and whether a request fits them: what placement compares a request with
when it cannot be placed, and what `--dry-run` checks every placement against, without Ray."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "ray_cluster.yaml"
ROLE = "role"  # the label ray_cluster.yaml gives its node types
LEARNER, ROLLOUT = "learner", "rollout"


@dataclass(frozen=True)
class NodeType:
    name: str
    resources: dict[str, float]
    labels: dict[str, str]
    max_workers: int


def node_types(path: Path = CLUSTER_YAML) -> list[NodeType]:
    """The worker node types a cluster config declares (none when the file is not there)."""
    if not path.is_file():
        return []
    config = yaml.safe_load(path.read_text())
    head = config.get("head_node_type")
    return [NodeType(name, {k: float(v) for k, v in spec.get("resources", {}).items()}, spec.get("labels", {}),
                     spec.get("max_workers", 0))
            for name, spec in config.get("available_node_types", {}).items() if name != head]


def fits(bundles: list[dict], selector: Optional[dict], node: NodeType, strategy: str = "PACK") -> bool:
    """Whether nodes of this type (as many as it may start; one under STRICT_PACK) can hold these bundles: the labels
    match, each bundle fits one node, and all of them fit the type's nodes together."""
    if any(node.labels.get(k) != v for k, v in (selector or {}).items()):
        return False
    if any(amount > node.resources.get(name, 0.0) for bundle in bundles for name, amount in bundle.items()):
        return False
    total = {name: sum(b.get(name, 0.0) for b in bundles) for bundle in bundles for name in bundle}
    nodes = 1 if strategy == "STRICT_PACK" else node.max_workers
    return all(amount <= node.resources.get(name, 0.0) * nodes for name, amount in total.items())


def role_types(types: list[NodeType], role: str) -> tuple[list[NodeType], Optional[dict]]:
    """(the node types a request for `role` may land on, its selector): those labelled `role` where the cluster labels
    its node types by role, else all of them."""
    if any(ROLE in t.labels for t in types):
        return [t for t in types if t.labels.get(ROLE) == role], {ROLE: role}
    return types, None
