"""Ray at run time: joining or starting a cluster the same way from the CLI, jobs and the demo (its runtime env and
thread settings), free ports, waiting on calls, and the progress of Ray tasks."""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from unifer_ray.engines.processes import RAY_CLUSTER_ENV
from unifer_ray.progress import Progress, polling

# Workers on small machines share few cores: torch must not start one thread per core in every actor.
THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}

log = logging.getLogger(__name__)

# Set by `ray job submit` in the driver's environment: the job's runtime env (JSON), which ray.init merges with ours.
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def job_env_vars() -> dict[str, str]:
    """The env_vars of the runtime env this driver was submitted with (empty outside `ray job submit`)."""
    raw = os.environ.get(JOB_CONFIG_ENV)
    if not raw:
        return {}
    runtime_env = json.loads(raw).get("runtime_env") or {}
    return dict(runtime_env.get("env_vars") or {})


# Where Hugging Face caches live and whether the hub may be asked: a driver's settings reach the workers of a
# cluster it joins (a cluster's own runtime env, cluster/runtime_env.yaml, wins).
HF_ENV = ("HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE")


def driver_runtime_env() -> dict | None:
    """Our thread settings and the driver's Hugging Face settings, minus every variable the submitted job sets.

    Ray refuses to start a driver whose ray.init runtime env repeats a key of the job's runtime env (even with the
    same value), so the job's values win and we only fill in what it leaves out."""
    ours = THREAD_ENV | {k: os.environ[k] for k in HF_ENV if k in os.environ}
    missing = {k: v for k, v in ours.items() if k not in job_env_vars()}
    return {"env_vars": missing} if missing else None


def init_ray(num_cpus: float | None = None) -> None:
    """Connect to RAY_ADDRESS (or the cluster a `ray job submit` runs in); else start a local one."""
    import ray

    if ray.is_initialized():
        return
    for key, value in THREAD_ENV.items():
        os.environ.setdefault(key, value)
    local = not os.environ.get("RAY_ADDRESS")
    if local:  # the raylet about to start reads these from its environment
        for key, value in RAY_CLUSTER_ENV.items():
            os.environ.setdefault(key, value)
        forget_a_dead_clusters_address()
    ray.init(
        # "local": a new cluster of our own, never one that another program started with `ray start` on this machine
        # (ray.init's default joins the last of those).
        address="local" if local else None,
        num_cpus=num_cpus if local else None,
        include_dashboard=False if local else None,
        # On a cluster the driver's stdout is what `ray job logs` shows: actors' and tasks' logs must reach it.
        # The embedded default keeps its console to the progress bars and stage table.
        log_to_driver=not local,
        runtime_env=driver_runtime_env(),
    )
    scope_ray_data_to_cpu_nodes()
    quiet_ray_data_progress()


def forget_a_dead_clusters_address(temp_dir: str | None = None) -> bool:
    """Remove Ray's record of "the current cluster" (`/tmp/ray/ray_current_cluster`, written by every `ray start`)
    when nothing listens at its address any more, as `ray stop` would have; True if removed.

    Ray's State API finds its cluster through that record, and a dead address costs every caller its timeout: Ray
    Train's placement-group cleaner waits 12 s at the end of every run, and Ray Data's hanging-task detector blocks
    its executor for as long. With no record (or a live one) a cluster without a dashboard answers at once."""
    from ray._common.utils import reset_ray_address
    from ray._private.utils import read_ray_address

    address = read_ray_address(temp_dir)
    if not address:
        return False
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
        return False
    except (OSError, ValueError):
        log.info("Ray's current-cluster record points at %r, where nothing answers: removed", address)
        reset_ray_address(temp_dir)
        return True


def quiet_ray_data_progress() -> None:
    """The stages show their own progress (unifer_ray/progress.py): Ray Data's per-operator bars would draw over
    that bar on a terminal and, in a log, add a table of every operator every 10 s. RAY_DATA_DISABLE_PROGRESS_BARS=0
    brings them back."""
    from ray.data import DataContext

    if "RAY_DATA_DISABLE_PROGRESS_BARS" not in os.environ:
        DataContext.get_current().enable_progress_bars = False


def scope_ray_data_to_cpu_nodes() -> None:
    """On a role-labelled cluster, Ray Data's tasks and actors default to the `cpu` node type (decoding, filters,
    scoring); a stage that needs GPUs names its own node type, which wins over this default for the same key."""
    from ray.data import DataContext

    from unifer_ray import placement

    if placement.enabled():
        DataContext.get_current().execution_options.label_selector = placement.selector("cpu")


def free_port() -> int:
    """A TCP port free on every interface of this node: for a Ray head, Serve's HTTP proxy or the learners' group,
    whose rendezvous other nodes reach at this node's address."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def get_all(refs: list, timeout_s: float) -> list:
    """`ray.get(refs, timeout=timeout_s)`, except that a failed call raises as soon as it fails: ray.get waits for the
    refs in order, so a call that died behind one still running would be seen only once that one returns."""
    import ray

    deadline = time.monotonic() + timeout_s
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
        if not done:
            raise ray.exceptions.GetTimeoutError(f"{len(pending)} of {len(refs)} calls not done within {timeout_s}s")
        ray.get(done[0])  # raises the call's failure
    return ray.get(list(refs))


@contextmanager
def progress_of_tasks(desc: str, total: int, unit: str, show: Callable[[Counter], tuple[int, dict]]) -> Iterator:
    """A `Progress` fed by the Ray tasks of the body: they `put` dicts of counts into the yielded queue (an actor
    that takes no CPU), and `show` turns the sums so far into the position and the fields shown.

    A retried task puts its counts again: the sums are for watching a run; its report counts from what it wrote."""
    from ray.util.queue import Queue

    queue = Queue(actor_options={"num_cpus": 0})
    totals: Counter = Counter()

    def poll() -> None:
        size = queue.qsize()
        if size:
            for counts in queue.get_nowait_batch(size):
                totals.update(counts)
            n, fields = show(totals)
            progress.update(n, **fields)

    try:
        with Progress(desc, total, unit) as progress, polling(poll):
            yield queue
    finally:
        queue.shutdown()
