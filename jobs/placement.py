"""Rehearse placement by node type on a cluster: one small actor per role, each asking for its node type the way the
stages do (`unifer_ray.placement`), with the GPUs that role's actors ask for. Prints where each landed and fails
when a role lands on another node type.

    ray job submit --runtime-env cluster/runtime_env.yaml -- python jobs/placement.py [--roles learner rollout]

On an autoscaling cluster this starts one node of each role's type (and they scale back to zero when idle).
"""

from __future__ import annotations

import argparse
import json
import sys

import ray

from unifer_ray import placement
from unifer_ray.ray_runtime import init_ray

GPUS = {"learner": 1, "rollout": 1, "serve": 1, "cpu": 0}  # what one actor of each role asks for


class Probe:
    def where(self, role: str) -> dict:
        labels = ray.get_runtime_context().get_node_labels()
        # Printed by the actor: it reaches `ray job logs` only when the driver forwards worker logs.
        print(f"probe {role}: on node {ray.get_runtime_context().get_node_id()[:12]} labelled "
              f"{placement.ROLE_LABEL}={labels.get(placement.ROLE_LABEL)}", flush=True)
        return dict(labels)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--roles", nargs="+", choices=placement.ROLES, default=list(placement.ROLES))
    args = parser.parse_args()
    init_ray()
    if not placement.enabled():
        print("no node of this cluster carries the label "
              f"{placement.ROLE_LABEL}: placement by node type is off (a laptop)")
    probes = {role: ray.remote(Probe).options(num_cpus=1, num_gpus=GPUS[role], **placement.actor_options(role))
              .remote() for role in args.roles}
    landed = {role: ray.get(probe.where.remote(role)).get(placement.ROLE_LABEL) for role, probe in probes.items()}
    print(json.dumps({"placement": landed}))
    wrong = {role: node for role, node in landed.items() if placement.enabled() and node != role}
    if wrong:
        print(f"landed on the wrong node type: {wrong}")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
