"""RL failures that a GPU cluster meets, reproduced on the real local Ray: an engine that fails during an NCCL weight
update (the sender aborts at once), the learners' collective timeout, and a spot rollout node lost and replaced by a
node that takes longer to come than an engine takes to start."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import ray
from ray._common.utils import reset_ray_address
from ray._private.utils import read_ray_address

from tests.helpers import needs_vllm, rl_config
from tests.stand_ins import EngineStandIn
from unifer_ray.config import parse_config
from unifer_ray.engines import SamplingParams
from unifer_ray.ray_runtime import free_port
from unifer_ray.rl.config import RLVRConfig
from unifer_ray.rl.learner import group_timeout_s
from unifer_ray.rl.prompts import PromptSource
from unifer_ray.rl.rollout import RolloutGroup

# ---------------------------------------------------------------- NCCL: the first failed engine aborts the update


@needs_vllm
def test_an_engine_that_dies_mid_update_aborts_the_transfer_at_once(ray_cluster):
    """vLLM's sender runs the engines' `update_weights` on a thread beside its NCCL broadcast. The rollout client
    waits on every engine's call and aborts the group on the first failure (which ends the broadcast), whatever the
    engines before it still do: not after the timeout, not after the slowest engine."""
    from unifer_ray.rl.vllm_transfer import RolloutClient

    stand_in = ray.remote(num_cpus=0, max_restarts=0)(EngineStandIn)
    engines = [stand_in.remote("wait"), stand_in.remote("die")]  # ray.get in order would wait on the first
    aborted = threading.Event()
    client = RolloutClient(engines, ranks_per_engine=1, timeout_s=300, abort=aborted.set)
    started = time.monotonic()
    with pytest.raises(ray.exceptions.RayActorError):
        client.update_weights({"names": []})
    assert aborted.is_set() and time.monotonic() - started < 30

    # Hung engines: the group is aborted at the timeout.
    aborted.clear()
    client = RolloutClient(engines[:1], ranks_per_engine=1, timeout_s=2, abort=aborted.set)
    with pytest.raises(ray.exceptions.GetTimeoutError):
        client.update_weights({"names": []})
    assert aborted.is_set()
    ray.kill(engines[0])


def test_the_learners_collectives_outwait_the_controllers_wait_for_an_update(tmp_path, tiny_model_dir,
                                                                             synthetic_root):
    """Under ZeRO-3 learners sit in the gathers of a weight update while rank 0 waits for the engines (behind a
    batch's generation in one_step_off): torch's default 10-minute NCCL timeout would kill them (they are not
    replaceable) before the controller gives up on the update and rebuilds the transfer."""
    for rollout in ({}, {"generate_timeout_s": 3600, "sync_timeout_s": 900}):
        config = parse_config(rl_config(tmp_path, tiny_model_dir, synthetic_root, rollout=rollout), RLVRConfig)
        assert group_timeout_s(config) > config.rollout.update_timeout_s
        assert group_timeout_s(config) > 600  # torch's NCCL default


# ---------------------------------------------------------------- a spot rollout node lost, its replacement slow


NODE_PORTS = ("node-manager-port", "object-manager-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
              "runtime-env-agent-port", "metrics-export-port")


@pytest.fixture
def rollout_nodes(ray_cluster, tmp_path):
    """Starts worker nodes labelled `unifer-role: rollout` that join the session's cluster (`ray start --block`, each
    in its own process group, its own ports); `stop` ends one as a spot reclaim would (its raylet and workers go)."""
    nodes: list[subprocess.Popen] = []
    address = ray.get_runtime_context().gcs_address
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)

    def launch() -> tuple[subprocess.Popen, Path]:
        ports = [arg for name in NODE_PORTS for arg in (f"--{name}", str(free_port()))]
        path = tmp_path / f"node-{len(nodes)}.log"
        with path.open("w") as log:  # the node writes it; this process needs no handle of its own
            node = subprocess.Popen(["ray", "start", "--address", address, "--block", "--num-cpus", "1",
                                     "--num-gpus", "0", "--labels", "unifer-role=rollout", "--object-store-memory",
                                     str(100 * 2**20), "--disable-usage-stats", *ports], stdout=log,
                                    stderr=subprocess.STDOUT, env=env, start_new_session=True)
        nodes.append(node)
        return node, path

    def stop(node: subprocess.Popen) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(node.pid, signal.SIGTERM)
        node.wait(timeout=60)

    def start() -> subprocess.Popen:
        # `ray start` gives its raylet 30 s to register with the GCS and then exits ("The current node timed out
        # during startup"): on a busy AVX2-only 2-core EPYC a node missed it (2026-12-05). An autoscaler launches
        # such a node again; so does this.
        for _ in range(3):
            node, log = launch()
            wait_for(lambda node=node, log=log: node.poll() is not None or "Ray runtime started." in log.read_text(),
                     120)
            if node.poll() is None:
                return node
            stop(node)  # what the failed start left in its process group
        raise RuntimeError(f"three rollout nodes failed to start; the last one's log: {log.read_text()}")

    yield start, stop
    for node in nodes:
        if node.poll() is None:
            stop(node)
    # `ray start` recorded the session's cluster as the machine's current one: it must not outlive the session.
    if read_ray_address() == address:
        reset_ray_address()


def rollout_nodes_alive() -> int:
    return sum(1 for n in ray.nodes() if n["Alive"] and n.get("Labels", {}).get("unifer-role") == "rollout")


def wait_for(condition, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.5)


def test_a_lost_rollout_node_is_replaced_however_long_the_next_node_takes(rollout_nodes, monkeypatch, tmp_path,
                                                                         tiny_model_dir, synthetic_root):
    """A spot rollout node goes with its actor. The worker's placement group waits for the next rollout node on
    placement_timeout_s (a node launch, an image pull), and only then does the new engine get start_timeout_s:
    here the next node comes later than an engine's start_timeout_s, with one replacement allowed."""
    start_node, stop_node = rollout_nodes
    monkeypatch.setenv("UNIFER_PLACEMENT", "labels")  # the session's own node carries no label: rollouts go here
    first = start_node()
    wait_for(lambda: rollout_nodes_alive() == 1, 180)  # a raylet registering on a busy 2-core machine
    # start_timeout_s: on a fresh node the raylet's agents start, then the worker imports torch and transformers;
    # beside a second test worker that took more than 20 s, and once more than 45 s beside test_rl_system's vLLM
    # engines (2026-12-03).
    rollout = {"engine": {"engine": "hf", "max_batch_size": 8}, "num_cpus": 1, "start_timeout_s": 75,
               "placement_timeout_s": 180, "max_replacements": 1}
    config = parse_config(rl_config(tmp_path, tiny_model_dir, synthetic_root, rollout=rollout), RLVRConfig)
    items = PromptSource(config.data, prompts_per_step=2, seed=0).batch(0)
    params = SamplingParams(n=2, max_new_tokens=8, temperature=1.0, logprobs=True)
    rollouts = RolloutGroup(config.rollout, model=str(tiny_model_dir), image_size=56, max_prompt_tokens=4096)
    try:
        before = rollouts.generate(items, params, seed=5)
        stop_node(first)  # the spot reclaim: the actor is gone, its placement group waits for a rollout node
        wait_for(lambda: rollout_nodes_alive() == 0, 180)
        late = threading.Timer(config.rollout.start_timeout_s + 5, start_node)
        late.start()
        started = time.monotonic()
        after = rollouts.generate(items, params, seed=5)
        assert time.monotonic() - started > config.rollout.start_timeout_s
        assert rollouts.replacements == 1
        # The replacement generated the lost share again: same starting weights, same seeds.
        assert [[c.token_ids for c in g] for g in after.completions] == \
            [[c.token_ids for c in g] for g in before.completions]
        late.join()
    finally:
        rollouts.shutdown()


# ---------------------------------------------------------------- a run whose rollouts do not start holds nothing


HF_ROLLOUT = {"engine": {"engine": "hf", "max_batch_size": 8}, "num_cpus": 1}


@pytest.mark.parametrize(("override", "error"), [
    # placed, but its engine misses start_timeout_s
    ({"rollout": HF_ROLLOUT | {"start_timeout_s": 0.01}}, ray.exceptions.GetTimeoutError),
    # no node can hold the rollouts' placement group
    ({"rollout": HF_ROLLOUT | {"num_cpus": 64, "placement_timeout_s": 0.5}}, RuntimeError),
    # the learners fail to set up (their model is not there)
    ({"rollout": HF_ROLLOUT, "model": "/nonexistent/unifer-model"}, FileNotFoundError),
], ids=["engine-start-timeout", "rollouts-never-placed", "learners-fail-to-set-up"])
def test_a_run_whose_actors_fail_to_start_leaves_no_placement_group(ray_cluster, tmp_path, tiny_model_dir,
                                                                    synthetic_root, override, error):
    """When the learners or the rollout workers cannot start, the run ends with the error, and no placement group
    of either outlives it (in a notebook or a test session it would hold its CPUs or GPUs until the driver exits)."""
    from unifer_ray.rl.controller import run_rlvr

    def live_groups() -> set[str]:
        return {group for group, row in ray.util.placement_group_table().items() if row["state"] != "REMOVED"}

    before = live_groups()
    config = rl_config(tmp_path, tiny_model_dir, synthetic_root) | override
    with pytest.raises(error):
        run_rlvr(parse_config(config, RLVRConfig))
    assert live_groups() == before
