"""A simulated autoscaling cluster: Ray's fake multi-node provider under autoscaler v2, node types mirroring
cluster/aws.yaml (same names, labels, logical GPUs), a head on loopback with token authentication, and the stages
submitted the way users do: `ray job submit --runtime-env cluster/runtime_env.yaml -- python jobs/<stage>.py`.

From zero workers: the right node types scale up, every actor lands on its node type (read from the nodes' labels
as the cluster reports them), a rollout node preempted mid-run is replaced without a step training on a lost
rollout, and the workers scale back to zero when idle."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.helpers import GROUP, PROMPTS, rl_config, wait_for_engines_to_end
from unifer_ray.cluster_sim import Head, start_head
from unifer_ray.engines import ChatRequest, SamplingParams
from unifer_ray.engines.hf import HFEngine
from unifer_ray.models.loading import load_model_and_processor
from unifer_ray.placement import ROLE_LABEL
from unifer_ray.rl.checkpoint import latest
from unifer_ray.runlog import read_run_log

REPO = Path(__file__).resolve().parent.parent
SIM_IDLE_MINUTES = 0.25


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    log = tmp_path_factory.mktemp("sim") / "head.log"
    head = start_head(cluster_file=REPO / "cluster" / "aws.yaml", labels={ROLE_LABEL: "head"}, log_path=log,
                      idle_timeout_minutes=SIM_IDLE_MINUTES)
    yield head
    head.stop()


def roles_of_actors(head: Head) -> dict[str, set[str]]:
    """Actor class -> the `unifer-role` labels of the nodes its actors ran on, dead actors and nodes included (as
    `ray list` reports them: the cluster keeps the record of both)."""
    nodes = {n["node_id"]: (n.get("labels") or {}).get(ROLE_LABEL) for n in head.state("nodes")}
    found: dict[str, set[str]] = {}
    for actor in head.state("actors"):
        if actor.get("node_id"):
            found.setdefault(actor["class_name"], set()).add(nodes.get(actor["node_id"]))
    return found


def wait_for_zero_workers(head: Head) -> list[dict]:
    deadline = time.monotonic() + SIM_IDLE_MINUTES * 60 + 150
    while time.monotonic() < deadline:
        alive = head.alive_nodes()
        if len(alive) == 1:
            return alive
        time.sleep(5)
    return head.alive_nodes()


def test_submission_needs_the_clusters_token(sim):
    without = sim.env | {"RAY_AUTH_TOKEN": "not-the-token"}
    done = Head(sim.address, without, sim.process, sim.temp_dir).ray(
        "job", "submit", "--address", sim.address, "--runtime-env", "cluster/runtime_env.yaml", "--no-wait",
        "--", "python", "jobs/placement.py")
    assert done.returncode != 0
    assert "auth" in (done.stderr + done.stdout).lower()


def test_runtime_env_submission_places_each_role_on_its_node_type(sim):
    """docs/cluster.md's form, from zero workers: one probe actor per role; each starts a node of its type. The actors'
    own prints reach `ray job logs`, so worker logs are forwarded to the driver."""
    assert [n["labels"].get(ROLE_LABEL) for n in sim.alive_nodes()] == ["head"]
    sim.submit(["python", "jobs/placement.py"], submission_id="placement")
    state = sim.wait("placement", 600)
    logs = sim.logs("placement")
    assert state == "SUCCEEDED", logs[-4000:]
    landed = json.loads(next(line for line in logs.splitlines() if line.startswith('{"placement"')))["placement"]
    assert landed == {"learner": "learner", "rollout": "rollout", "serve": "serve", "cpu": "cpu"}
    for role in ("learner", "rollout", "serve", "cpu"):
        assert f"probe {role}: on node" in logs  # printed inside the actor
    assert roles_of_actors(sim)["Probe"] == {"learner", "rollout", "serve", "cpu"}  # as the cluster reports it
    # The autoscaler started exactly one node of each type the probes asked for.
    launched = [n["labels"].get(ROLE_LABEL) for n in sim.state("nodes")]
    assert sorted(launched) == ["cpu", "head", "learner", "rollout", "serve"]


def preempt_the_rollout_node_after(sim: Head, log_dir: Path, steps: int, preempted: list[str]) -> threading.Thread:
    """In the background: once the rollout node is up and `steps` steps are logged, kill that node (a spot reclaim).
    A tiny step takes a fraction of a second, so the metrics file is watched closely, not between job polls."""

    def logged() -> int:
        try:
            return len(read_run_log(log_dir))
        except json.JSONDecodeError:  # a line being written
            return 0

    def run() -> None:
        deadline = time.monotonic() + 600
        node = None  # the node the rollout actor runs on (an idle rollout node of an earlier job is not it)
        while node is None and time.monotonic() < deadline:
            node = next((a["node_id"] for a in sim.state("actors")
                         if a["class_name"] == "RolloutWorker" and a["state"] == "ALIVE"), None)
            time.sleep(0.5)
        while logged() < steps and time.monotonic() < deadline:
            time.sleep(0.05)
        if node is not None and time.monotonic() < deadline:
            sim.preempt(node)
            preempted.append(node)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_rlvr_job_scales_up_survives_a_preempted_rollout_node_and_scales_to_zero(sim, tmp_path, tiny_model_dir,
                                                                                synthetic_root):
    # The rollout node is preempted once step 2 is logged. One step off, at most step 3's samples exist by then:
    # the steps after it wait for the replacement (a new node, a vLLM engine start), however fast a step is.
    steps = 10
    config = rl_config(tmp_path, tiny_model_dir, synthetic_root, steps=steps, mode="one_step_off",
                       rollout={"max_replacements": 1}, checkpoint_every=5, sample_log_every=0)
    (tmp_path / "rlvr.yaml").write_text(yaml.safe_dump({"rlvr": config}))
    sim.submit(["python", "jobs/rlvr.py", "--config", str(tmp_path / "rlvr.yaml")], submission_id="rlvr")

    preempted: list[str] = []
    preempter = preempt_the_rollout_node_after(sim, tmp_path / "logs", 2, preempted)
    state = sim.wait("rlvr", 900)
    logs = sim.logs("rlvr")
    assert state == "SUCCEEDED", logs[-5000:]
    preempter.join(timeout=5)
    assert preempted, "the rollout node was not preempted"
    assert len(read_run_log(tmp_path / "logs")) == steps

    # Every actor ran on its own node type: the learners, both rollout actors (the preempted one and its
    # replacement), and the job's driver-side supervisor on the head.
    placed = roles_of_actors(sim)
    assert placed["LearnerWorker"] == {"learner"}
    assert placed["RolloutWorker"] == {"rollout"}
    assert placed["JobSupervisor"] == {"head"}
    rollout_nodes_used = {a["node_id"] for a in sim.state("actors") if a["class_name"] == "RolloutWorker"} - {None}
    assert len(rollout_nodes_used) == 2  # the replacement ran on a new rollout node
    # The preempted node is dead; a new rollout node replaced it.
    rollout_nodes = [n for n in sim.state("nodes") if n["labels"].get(ROLE_LABEL) == "rollout"]
    assert {n["node_id"] for n in rollout_nodes} - set(preempted), rollout_nodes
    assert next(n for n in rollout_nodes if n["node_id"] == preempted[0])["state"] == "DEAD"

    # Every step trained on a full batch generated by a live worker: none on a lost rollout.
    records = read_run_log(tmp_path / "logs")
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    assert all(r["samples"] == PROMPTS * GROUP and r["prompt_errors"] == 0 for r in records)
    # One lost node, one replacement: the calls that found the node unreachable waited for the cluster to declare
    # it dead, so no replacement was placed on it meanwhile.
    assert sum(r["rollout_replacements"] for r in records) == 1, logs[-5000:]
    assert "replacing it" in logs  # the controller's warning, in the job's log
    # The job's log shows the run's progress as plain lines (no carriage-return redraws), the last at the end.
    progress = [line for line in logs.split("\n") if line.startswith("rlvr: ")]
    assert progress and progress[-1].startswith(f"rlvr: {steps}/{steps} steps (100%)"), logs[-3000:]
    assert all(key in progress[-1] for key in ("| reward ", " accuracy ", " kl ")) and "\r" not in "".join(progress)
    for record in records:
        for key in ("reward/mean", "reward/accuracy/mean", "reward/format/mean", "accuracy", "format_rate", "kl",
                    "entropy", "clip_fraction", "response_length/mean", "version_lag/mean", "time/generate_s",
                    "time/logprob_s", "time/train_s", "time/sync_s", "tokens_per_s/generate"):
            assert np.isfinite(record[key]), key
    # one_step_off: from step 2 on, each step trained on samples generated while the step before it trained.
    assert records[0]["version_lag/max"] == 0 and records[1]["version_lag/max"] == 1
    assert (tmp_path / "logs" / "tensorboard").is_dir()
    assert latest(config["checkpoint_dir"])[1].step == steps
    model, processor = load_model_and_processor(config["output_dir"])  # FERBench loads the export unchanged
    assert HFEngine(model, processor).generate([ChatRequest([{"role": "user", "content": "hi"}])],
                                               SamplingParams(max_new_tokens=4))[0][0].token_ids
    # The preempted node's engine went with it, the rest with the job: no engine process of this run is left.
    assert not wait_for_engines_to_end(), "vLLM engine processes outlived the job"

    # Idle workers go away: back to the head alone.
    assert [n["labels"].get(ROLE_LABEL) for n in wait_for_zero_workers(sim)] == ["head"]
