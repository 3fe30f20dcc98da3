"""Placement by node type: every actor group asks for its node type through a Ray label selector.

The node types of `cluster/aws.yaml` and the KubeRay manifests carry the label `unifer-role` (learner, rollout,
serve, cpu; the head carries `head`). Learners, SFT workers and Serve replicas hold state on expensive on-demand
GPUs; rollouts are replaceable and run on spot; Ray Data's CPU stages belong on cheap CPU nodes. Without selectors
the autoscaler may start (or reuse) any node that has the resources, e.g. put a learner on a spot rollout node.

On a laptop no node carries the label, and a selector would leave every actor pending forever: selectors are used
only on a role-labelled cluster. `UNIFER_PLACEMENT` decides: `auto` (default: labels when some node of the cluster
carries `unifer-role`; every cluster in `cluster/` labels its head), `labels` (always), `off` (never).
"""

from __future__ import annotations

import functools
import os
from typing import Literal

ROLE_LABEL = "unifer-role"
ROLES = ("learner", "rollout", "serve", "cpu")
Role = Literal["learner", "rollout", "serve", "cpu"]
MODE_ENV = "UNIFER_PLACEMENT"


@functools.cache
def _cluster_is_labelled() -> bool:
    """Whether some live node carries ROLE_LABEL (asked once per process: labels are fixed at node start)."""
    import ray

    return any(ROLE_LABEL in (node.get("Labels") or {}) for node in ray.nodes() if node.get("Alive"))


def enabled() -> bool:
    mode = os.environ.get(MODE_ENV, "auto")
    if mode not in ("auto", "labels", "off"):
        raise ValueError(f"{MODE_ENV}={mode!r}: expected auto, labels or off")
    return mode == "labels" or (mode == "auto" and _cluster_is_labelled())


def selector(role: Role) -> dict[str, str] | None:
    """The label selector of `role`'s node type, or None where placement by label is off."""
    if role not in ROLES:
        raise ValueError(f"unknown node role {role!r}; expected one of {ROLES}")
    return {ROLE_LABEL: role} if enabled() else None


def actor_options(role: Role) -> dict:
    """Extra `.options(...)` for an actor or task of `role` (also Ray Data's ray_remote_args, Ray Train's
    ScalingConfig and Serve's ray_actor_options, which take the same `label_selector`)."""
    found = selector(role)
    return {"label_selector": found} if found else {}


def group_options(role: Role, num_bundles: int, strategy: str = "STRICT_PACK") -> dict:
    """`placement_group(bundles, **...)` options: every bundle on nodes of `role`'s type, placed by `strategy`.

    STRICT_PACK by default: a tensor-parallel vLLM engine's GPUs, or a learner group's ranks, talk over NVLink/PCIe
    inside one node."""
    found = selector(role)
    return {"strategy": strategy} | ({"bundle_label_selector": [found] * num_bundles} if found else {})
