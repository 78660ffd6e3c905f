"""Where each request goes on a cluster of node types, and the one wait for resources.

`ray_cluster.yaml` labels its node types `role: head | learner | rollout`. The learners ask for `role: learner`
nodes and every engine (training's rollout engines, the evaluation's model actors, Serve's replicas) for `role:
rollout` nodes, through Ray's label selectors (Ray 2.60: `label_selector` of an actor, `bundle_label_selector`
of a placement group, `ScalingConfig(label_selector=...)` of Ray Train, `placement_group_bundle_label_selector`
of Serve). Autoscaler v2 reads them when it picks a node type to start; without them it picks by shape only, and
eight one-GPU learners landed on L40S rollout nodes. The selectors apply only where the cluster labels its nodes
by role (its head has a `role` label): a local Ray has no labels, and a selector would never be satisfied there.

A job asks for all of its groups at once (`wait_for_groups`), so the autoscaler starts their nodes together, and
waits for them once, for `scaling.placement_timeout_s`; what could not be placed is named in one line with the node
types of `ray_cluster.yaml` that would fit it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import ray

from actors.node_types import CLUSTER_YAML, LEARNER, ROLE, ROLLOUT, NodeType, fits, node_types  # noqa: F401  (its API)


def roles_in_use() -> bool:
    """Whether the connected cluster labels its nodes by role (a `ray_cluster.yaml` cluster: its head has one)."""
    return any(ROLE in node.get("Labels", {}) for node in ray.nodes() if node["Alive"])


def role_selector(role: str) -> Optional[dict[str, str]]:
    """The label selector that sends a request to `role` nodes, or None on a cluster without role labels."""
    return {ROLE: role} if roles_in_use() else None


@dataclass
class GroupRequest:
    """One placement group a job asks for: its name for the console, its bundles, their selector, the group."""

    what: str  # "learners", "rollout engine 1", ...
    bundles: list[dict]
    selector: Optional[dict]
    strategy: str
    group: object  # ray.util.placement_group.PlacementGroup

    def describe(self, types: list[NodeType]) -> str:
        shape = " + ".join(f"{n} x {bundle_text(b)}" for b, n in count_bundles(self.bundles))
        where = f" on {ROLE}={self.selector[ROLE]} nodes" if self.selector else ""
        fitting = [t.name for t in types if fits(self.bundles, self.selector, t, self.strategy)]
        verdict = (f"node type {' or '.join(fitting)} would fit it" if fitting else
                   "no node type of ray_cluster.yaml fits it") if types else "no ray_cluster.yaml to compare with"
        return f"{self.what} ({shape}{where}: {verdict})"


def bundle_text(bundle: dict) -> str:
    return "{" + ", ".join(f"{k} {v:g}" for k, v in bundle.items()) + "}"


def count_bundles(bundles: list[dict]) -> list[tuple[dict, int]]:
    out: list[tuple[dict, int]] = []
    for b in bundles:
        if out and out[-1][0] == b:
            out[-1] = (b, out[-1][1] + 1)
        else:
            out.append((b, 1))
    return out


def request_group(what: str, bundles: list[dict], selector: Optional[dict], strategy: str = "PACK") -> GroupRequest:
    """A placement group asked for now and not waited for (`wait_for_groups` waits for all of a job's at once)."""
    from ray.util.placement_group import placement_group

    labels = [dict(selector) for _ in bundles] if selector else None
    return GroupRequest(what, bundles, selector, strategy,
                        placement_group(bundles, strategy=strategy, bundle_label_selector=labels))


class PlacementTimeout(RuntimeError):
    """Groups a job asked for were not placed in time; the message is one line."""


def wait_for_groups(requests: list[GroupRequest], timeout_s: float, setting: str) -> float:
    """Wait until every group is placed, `timeout_s` for all of them together; returns the seconds waited. Raises
    PlacementTimeout naming each group still waiting, its shape and the node types that would fit it (`setting`:
    the config field that sets the wait)."""
    started = time.monotonic()
    pending = {r.group.ready(): r for r in requests}
    ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=timeout_s)
    waiting = [r for ref, r in pending.items() if ref not in ready]
    if waiting:
        types = node_types()
        raise PlacementTimeout(f"could not place {'; '.join(r.describe(types) for r in waiting)} within {timeout_s:g} s "
                               f"({setting}); the cluster has {resources_text(ray.cluster_resources())}")
    return time.monotonic() - started


def resources_text(resources: dict) -> str:
    shown = {k: v for k, v in resources.items() if k in ("CPU", "GPU")}
    return ", ".join(f"{v:g} {k}" for k, v in shown.items()) or "no CPU or GPU"


def remove_groups(requests: list[GroupRequest]) -> None:
    from ray.util.placement_group import remove_placement_group

    for r in requests:
        remove_placement_group(r.group)


def group_machines(request: GroupRequest) -> set[str]:
    """The addresses of the machines holding a placed group's bundles."""
    from ray.util.placement_group import placement_group_table

    address = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
    return {address[node] for node in placement_group_table(request.group)["bundles_to_node_id"].values()}
