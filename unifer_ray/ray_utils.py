"""Joining or starting a Ray cluster the same way from the CLI, jobs and the demo."""

from __future__ import annotations

import os

# Workers on small machines share few cores: torch must not start one thread per core in every actor.
THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def init_ray(num_cpus: float | None = None) -> None:
    """Connect to RAY_ADDRESS (or the cluster a `ray job submit` runs in); else start a local one."""
    import ray

    if ray.is_initialized():
        return
    for key, value in THREAD_ENV.items():
        os.environ.setdefault(key, value)
    local = not os.environ.get("RAY_ADDRESS")
    ray.init(
        num_cpus=num_cpus if local else None,
        include_dashboard=False if local else None,
        log_to_driver=False,
        runtime_env={"env_vars": THREAD_ENV},
    )
