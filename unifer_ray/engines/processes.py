"""vLLM engine processes end with their owner.

vLLM runs a model in processes of its own: the engine core (`VLLM::EngineCore`) and its workers (`VLLM::Worker`),
children of the process that created the engine. An owner killed with SIGKILL (`ray.kill`, a replaced or preempted
actor, a driver gone) cannot stop them, and they would keep their memory, or a GPU, for good. Two guards:

- Ray's per-worker process groups (`RAY_CLUSTER_ENV`): the raylet kills a worker's whole process group when the
  worker exits, however it exits. Every Ray cluster this project starts sets it, the cluster files included.
- The owner of an actor it replaces ends the processes the actor recorded at start, on the actor's node, and waits
  for them (`end_on_node`): on a cluster started without that setting too, and before a replacement takes the GPU.
"""

from __future__ import annotations

import psutil

# For the environment of every raylet this project starts (`ray start`, a local `ray.init`, the cluster files).
RAY_CLUSTER_ENV = {"RAY_process_group_cleanup_enabled": "1"}

ENGINE_PREFIX = "VLLM::"  # vLLM names its processes VLLM::EngineCore, VLLM::Worker...


def is_engine(process: psutil.Process) -> bool:
    try:
        return process.name().startswith(ENGINE_PREFIX) or any(
            part.startswith(ENGINE_PREFIX) for part in process.cmdline()[:1])
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def engine_pids(owner: int | None = None) -> list[int]:
    """The vLLM processes below `owner` (default: this process), children and grandchildren."""
    try:
        descendants = psutil.Process(owner).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    return [p.pid for p in descendants if is_engine(p)]


def end_processes(pids: list[int], timeout_s: float = 10.0) -> list[int]:
    """SIGKILL those of `pids` still alive and wait for them; returns the ones that were still alive.

    Their owner is gone, so nothing is left to shut them down gracefully (a stopped process also takes SIGKILL).
    Only vLLM processes are touched: a pid the system has reused for something else is left alone."""
    alive = []
    for pid in pids:
        try:
            process = psutil.Process(pid)
        except psutil.NoSuchProcess:
            continue
        if is_engine(process):
            alive.append(process)
    for process in alive:
        process.kill()
    psutil.wait_procs(alive, timeout=timeout_s)
    return [p.pid for p in alive]


def end_on_node(node_id: str, pids: list[int], timeout_s: float = 30.0) -> list[int]:
    """`end_processes` on the node `node_id` (where an actor recorded them); [] when that node is gone, since its
    processes went with it."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if not pids:
        return []
    if node_id not in {n["NodeID"] for n in ray.nodes() if n["Alive"]}:
        return []
    task = ray.remote(end_processes).options(
        num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False))
    try:
        return ray.get(task.remote(pids), timeout=timeout_s)
    except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
        return []  # the node went meanwhile
