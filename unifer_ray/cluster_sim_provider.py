"""The simulated cluster's node provider: Ray's fake multi-node provider, each fake node with a runtime-env directory
of its own.

Ray's nodes on one machine share its session directory, and Ray's working_dir plugin unpacks a job's package afresh,
removing the directory first, on every node that first sets up the job's environment. On a real cluster each node
does that on its own disk; in the simulation a node started later removed the package under the workers of a node
already running the job (a FileNotFoundError importing `unifer_ray` from it, in one of four suite runs, 2026-12-04).
Loaded by the head's autoscaler through the `external` provider hook (cluster_sim.simulated_config).
"""

from __future__ import annotations

import threading
import uuid
from functools import partial

import ray._private.parameter
from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider

_patching = threading.Lock()


class FakeNodesWithOwnRuntimeEnvDirs(FakeMultiNodeProvider):
    def _create_node_with_resources_and_labels(self, node_config, tags, count, resources, labels):
        # Ray's provider builds each node's RayParams itself and leaves `runtime_env_dir_name` at the session's
        # shared default; the one argument is added for the node it creates now (a random name: a restarted
        # autoscaler must not hand a live node's directory to a new one).
        with _patching:
            ray_params = ray._private.parameter.RayParams
            ray._private.parameter.RayParams = partial(
                ray_params, runtime_env_dir_name=f"runtime_resources_{uuid.uuid4().hex[:12]}")
            try:
                super()._create_node_with_resources_and_labels(node_config, tags, count, resources, labels)
            finally:
                ray._private.parameter.RayParams = ray_params
