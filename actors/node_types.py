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


# The GPU of a cloud machine type, by family (the part before the "."; GCP's by prefix): (model, memory per GPU in GB),
# from the providers' pages (aws.amazon.com/ec2/instance-types/p4, /p5, /g6e, /g6, /g5; cloud.google.com/compute/docs/
# gpus). The plan names it beside each role's node type.
GPU_OF_MACHINE = {"p4d": ("A100", 40), "p4de": ("A100", 80), "p5": ("H100", 80), "p5e": ("H200", 141),
                  "p5en": ("H200", 141), "g6e": ("L40S", 48), "g6": ("L4", 24), "g5": ("A10G", 24),
                  "a2-highgpu": ("A100", 40), "a2-ultragpu": ("A100", 80), "a3-highgpu": ("H100", 80),
                  "g2-standard": ("L4", 24)}


@dataclass(frozen=True)
class NodeType:
    name: str
    resources: dict[str, float]
    labels: dict[str, str]
    max_workers: int
    machine: str = ""  # node_config's InstanceType (AWS) or machineType (GCP)

    @property
    def gpu_model(self) -> Optional[tuple[str, int]]:
        """(model, memory per GPU in GB) of this type's machine, None when unknown."""
        family = self.machine.split(".")[0]
        return GPU_OF_MACHINE.get(family) or next((v for k, v in GPU_OF_MACHINE.items() if family.startswith(k)), None)

    @property
    def gpu(self) -> str:
        """'8 x A100 80 GB', '4 x GPU (model unknown)' or 'no GPU'."""
        count, known = self.resources.get("GPU", 0), self.gpu_model
        if not count:
            return "no GPU"
        return f"{count:g} x {known[0]} {known[1]} GB" if known else f"{count:g} x GPU (model unknown for {self.machine!r})"


def node_types(path: Path = CLUSTER_YAML) -> list[NodeType]:
    """The worker node types a cluster config declares (none when the file is not there)."""
    if not path.is_file():
        return []
    config = yaml.safe_load(path.read_text())
    head = config.get("head_node_type")
    return [NodeType(name, {k: float(v) for k, v in spec.get("resources", {}).items()}, spec.get("labels", {}),
                     spec.get("max_workers", 0),
                     str(spec.get("node_config", {}).get("InstanceType") or spec.get("node_config", {}).get("machineType")
                         or ""))
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
