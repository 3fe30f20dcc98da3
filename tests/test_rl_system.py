"""RLVR on real Ray actors with the real tiny model and vLLM's CPU build as the rollout engine: weight transfer through
vLLM's API (greedy output equal to the learner's after every push, prefix caching on), a rollout actor killed or hung
mid-generation and killed mid-run, --resume after a stop, and the job submitted with `ray job submit` to a head node
started for the test."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import ray
import torch
import yaml

from unifer_ray.config import parse_config
from unifer_ray.curate.config import CurateSource
from unifer_ray.curate.rlvr import make_tasks
from unifer_ray.curate.samples import source_rows
from unifer_ray.engines import ChatRequest, SamplingParams
from unifer_ray.engines.hf import HFEngine
from unifer_ray.models.loading import load_model_and_processor
from unifer_ray.rl.checkpoint import latest
from unifer_ray.rl.config import PromptData, RLVRConfig, SyncConfig
from unifer_ray.rl.controller import run_rlvr
from unifer_ray.rl.learner import LearnerGroup, TrainRow
from unifer_ray.rl.metrics import read_run_log
from unifer_ray.rl.prompts import PromptSource
from unifer_ray.rl.rewards import accuracy_reward, format_reward
from unifer_ray.rl.rollout import RolloutGroup
from unifer_ray.rl.weight_sync import WeightSync

REPO = Path(__file__).resolve().parent.parent
PROMPTS, GROUP = 2, 4
# Prefix caching on (vLLM's default, said out loud): a push that left old KV in the cache would show in the outputs.
VLLM = {"enable_prefix_caching": True, "max_model_len": 1024}
HF = {"engine": "hf", "max_batch_size": 8}
# Mean |Δ log p| of the sampled tokens between the rollout engine and the learner holding the same weights: vLLM's CPU
# kernels and transformers differ in the last digits (fp32 both), nothing like a policy step.
SAME_POLICY_GAP = 5e-3


def write_rlvr_set(synthetic_root: Path, path: Path) -> Path:
    """RLVR items (the released format) for the synthetic RAF-DB train images, one multiple-choice question each."""
    rows, errors = source_rows(CurateSource(dataset="rafdb", root=str(synthetic_root / "RAF-DB")))
    assert not errors
    rng = np.random.default_rng(0)
    with open(path, "w") as f:
        for row in rows:
            [task] = make_tasks(row["label"], row["candidate_labels"], ["mc"], rng)
            f.write(json.dumps({"image_path": row["image_path"], "problem": task["problem"],
                                "solution": task["solution"], "id": row["id"], "task": "mc"}) + "\n")
    return path


def rl_config(tmp: Path, model_dir: Path, synthetic_root: Path, **changes) -> dict:
    data = write_rlvr_set(synthetic_root, tmp / "rlvr.jsonl")
    config = {
        "model": str(model_dir),
        "data": {"paths": [str(data)], "image_root": str(synthetic_root), "image_size": 56},
        "output_dir": str(tmp / "model"), "checkpoint_dir": str(tmp / "checkpoints"), "log_dir": str(tmp / "logs"),
        "steps": 2, "seed": 0,
        "rollout": {"num_workers": 1, "engine": {"engine": "vllm", "vllm_kwargs": VLLM}, "num_cpus": 1},
        "learner": {"num_workers": 1, "num_cpus": 1, "strategy": "ddp", "micro_batch_size": 8,
                    "optimizer": {"lr": 1e-3, "warmup_ratio": 0.0}},
        "grpo": {"group_size": GROUP, "prompts_per_step": PROMPTS, "max_new_tokens": 12, "beta": 0.04},
        "checkpoint_every": 1, "sample_log_every": 1,
    }
    for key, value in changes.items():
        config[key] = config[key] | value if isinstance(value, dict) else value
    return config


def test_the_prompt_order_is_the_same_however_the_shards_are_named(ray_cluster, tmp_path, synthetic_root):
    """A second curation run writes the same items under new shard names: the same epochs follow."""
    lines = write_rlvr_set(synthetic_root, tmp_path / "one.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "zz_000000.jsonl").write_text("".join(lines[: len(lines) // 2]))
    (tmp_path / "shards" / "aa_000001.jsonl").write_text("".join(lines[len(lines) // 2 :]))

    def order(path: Path) -> list[str]:
        data = PromptData(paths=[str(path)], image_root=str(synthetic_root), image_size=56)
        source = PromptSource(data, prompts_per_step=PROMPTS, seed=0)
        return [item["id"] for step in range(len(source)) for item in source.batch(step)]

    assert order(tmp_path / "one.jsonl") == order(tmp_path / "shards")


# ---------------------------------------------------------------- weight sync


def train_rows(rollout, signs) -> list[TrainRow]:
    return [TrainRow(image_uri=item["image_uri"], problem=item["problem"], completion_ids=c.token_ids,
                     rollout_logprobs=c.logprobs, advantage=sign, weight=1 / (PROMPTS * GROUP))
            for item, group in zip(rollout.items, rollout.completions) for c, sign in zip(group, signs)]


@pytest.mark.parametrize("engine", ["vllm", "hf"])
def test_each_push_makes_the_rollouts_greedy_output_the_learners(engine, ray_cluster, tmp_path, tiny_model_dir,
                                                                 synthetic_root):
    rollout = {"engine": HF} if engine == "hf" else {}
    config = parse_config(rl_config(tmp_path, tiny_model_dir, synthetic_root, rollout=rollout,
                                    learner={"freeze_vision_tower": True, "optimizer": {"lr": 1e-2}},
                                    grpo={"beta": 0.0}), RLVRConfig)
    items = PromptSource(config.data, prompts_per_step=PROMPTS, seed=0).batch(0)
    learners = LearnerGroup(config, str(tiny_model_dir))
    rollouts = RolloutGroup(config.rollout, model=str(tiny_model_dir), image_size=56, max_prompt_tokens=4096)
    sync = WeightSync.create(SyncConfig(), learners, rollouts)
    greedy = SamplingParams(max_new_tokens=12, temperature=0.0)
    sampling = SamplingParams(n=GROUP, max_new_tokens=12, temperature=1.0, logprobs=True)
    tokenizer = load_model_and_processor(tiny_model_dir)[1].tokenizer

    def texts(rollout) -> list[list[str]]:
        # Decoded as the learner decodes (vLLM's incremental detokenizer holds back a partial UTF-8 character).
        return [[tokenizer.decode(c.token_ids, skip_special_tokens=True) for c in g] for g in rollout.completions]

    try:
        before = rollouts.generate(items, greedy, seed=0)
        assert before.versions == [0, 0]
        outputs = [texts(before)]
        assert outputs[0] == learners.generate(items, greedy.model_dump())
        for version in (1, 2):
            sampled = rollouts.generate(items, sampling, seed=version)
            stats = learners.train(train_rows(sampled, [1.0, -1.0, 1.0, -1.0]))
            # The learner rebuilt each prompt and scored the sampled ids: what the engine reported, up to numerics.
            assert stats["rollout_logprob_gap"] < SAME_POLICY_GAP and stats["rollout_mismatch_k3"] < 1e-4
            assert stats["rollout_is_clipped_fraction"] == 0 and stats["grad_norm"] > 0

            timings = sync.push(version)
            assert timings["sync_s"] >= timings["sync_load_s"] > 0
            # The same prompts again: the prefix, multimodal and encoder caches hold entries of the old weights.
            after = rollouts.generate(items, greedy, seed=0)
            assert after.versions == [version, version]
            outputs.append(texts(after))
            assert outputs[-1] != outputs[-2], "the rollout output changed"
            assert outputs[-1] == learners.generate(items, greedy.model_dump()), "to the learner's greedy output"

        # Only trainable weights travel: the frozen vision blocks stay out, the merger and the language model go
        # (named as in the model's files for vLLM, which maps those names only).
        state = ray.get(sync.state)
        prefix = "visual." if engine == "vllm" else "model.visual."
        assert not any(name.startswith(prefix + "blocks") for name in state)
        assert any(name.startswith(prefix + "merger") for name in state) and "lm_head.weight" in state
    finally:
        rollouts.shutdown()
        learners.shutdown()


def engine_processes(actor: ray.actor.ActorHandle) -> list[psutil.Process]:
    """The vLLM engine-core process(es) under a rollout actor: vLLM runs the model outside the actor's process."""
    pid = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))
    engines = [p for p in psutil.Process(pid).children(recursive=True) if "EngineCore" in p.name()]
    assert engines, "the rollout actor runs its vLLM engine in a child process"
    return engines


def test_a_worker_killed_or_hung_mid_generation_is_replaced_and_its_share_generated_again(
        ray_cluster, tmp_path, tiny_model_dir, synthetic_root):
    config = parse_config(rl_config(tmp_path, tiny_model_dir, synthetic_root, rollout={"generate_timeout_s": 12}),
                          RLVRConfig)
    items = PromptSource(config.data, prompts_per_step=PROMPTS, seed=0).batch(0)
    rollouts = RolloutGroup(config.rollout, model=str(tiny_model_dir), image_size=56, max_prompt_tokens=4096)

    def tokens(rollout) -> list[list[list[int]]]:
        return [[c.token_ids for c in g] for g in rollout.completions]

    hung = []
    try:
        params = SamplingParams(n=GROUP, max_new_tokens=64, temperature=1.0, logprobs=True)
        expected = rollouts.generate(items, params, seed=3)
        pending = rollouts.submit(items, params, seed=3)
        ray.kill(rollouts.workers[0])  # while it generates the share
        regenerated = rollouts.collect(pending)
        assert rollouts.replacements == 1
        assert regenerated.items == expected.items
        # The replacement starts from the same weights and seeds: the share's real completions, none fabricated.
        assert tokens(regenerated) == tokens(expected)

        # A hung engine: the actor is alive, its vLLM engine process stops answering (SIGSTOP).
        hung = engine_processes(rollouts.workers[0])
        for process in hung:
            process.suspend()
        started = time.monotonic()
        regenerated = rollouts.collect(rollouts.submit(items, params, seed=3))
        assert time.monotonic() - started >= config.rollout.generate_timeout_s
        assert rollouts.replacements == 2
        # Killing the actor took its engine process with it: no hung engine keeps holding memory (or a GPU).
        assert not any(process.is_running() for process in hung)
        assert tokens(regenerated) == tokens(expected)
    finally:
        rollouts.shutdown()
        for process in hung:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()


# ---------------------------------------------------------------- a killed rollout actor, then --resume

def length_reward(completions, solutions, **_):
    """A custom reward that random completions differ on, so that the tiny random model's weights move."""
    return [len(c) / 100 for c in completions]


CHAOS = {"calls": 0, "stop_after": 3, "killed": []}


def chaos(completions, solutions, **_):
    """A zero-weight reward that kills the run's rollout actor while step 1 is scored, and stops the run during
    step 4 (whose latest checkpoint is step 2's) while "stop_after" is set: a crash."""
    CHAOS["calls"] += 1
    if CHAOS["calls"] == 1:
        for actor in ray.util.list_named_actors():
            if actor.startswith("rollout-"):
                ray.kill(ray.get_actor(actor))
                CHAOS["killed"].append(actor)
    if CHAOS["stop_after"] is not None and CHAOS["calls"] > CHAOS["stop_after"]:
        raise RuntimeError("stopped by the test")
    return [0.0] * len(completions)


@pytest.fixture(scope="module")
def stopped_run(ray_cluster, tmp_path_factory, tiny_model_dir, synthetic_root):
    """A 4-step run whose rollout actor is killed during step 1 and which stops during step 4."""
    tmp = tmp_path_factory.mktemp("rlvr_stop")
    config = rl_config(tmp, tiny_model_dir, synthetic_root, steps=4, checkpoint_every=2,
                       rewards=[{"name": "accuracy"}, {"name": "format"},
                                {"name": "length", "function": f"{__name__}:length_reward"},
                                {"name": "chaos", "function": f"{__name__}:chaos", "weight": 0.0}])
    CHAOS.update(calls=0, stop_after=3, killed=[])
    with pytest.raises(RuntimeError, match="stopped by the test"):
        run_rlvr(parse_config(config, RLVRConfig))
    return tmp, config, CHAOS["killed"]


def test_a_killed_rollout_actor_is_replaced_and_no_step_trains_on_fabricated_rewards(stopped_run):
    tmp, config, killed = stopped_run
    assert killed, "a rollout actor was killed mid-run"
    records = read_run_log(tmp / "logs")
    assert [r["step"] for r in records] == [1, 2, 3]  # every planned step before the stop ran
    # The weight sync of step 1 found the worker dead; its replacement got version 1 and generated steps 2 and 3.
    assert [r["rollout_replacements"] for r in records] == [1, 0, 0]
    assert all(r["samples"] == PROMPTS * GROUP and r["prompts"] == PROMPTS for r in records)
    # Every scored sample is a real completion of the engine, and its reward is what the functions say of it.
    samples = read_run_log(tmp / "logs", "samples.jsonl")
    assert len(samples) == 3 * PROMPTS * GROUP
    texts = [s["completion"] for s in samples]
    answers = [s["answer"] for s in samples]
    assert all(s["tokens"] > 0 for s in samples)
    assert [s["rewards"]["accuracy"] for s in samples] == accuracy_reward(texts, answers, answers=answers)
    assert [s["rewards"]["format"] for s in samples] == format_reward(texts, answers)
    assert [s["rewards"]["length"] for s in samples] == length_reward(texts, answers)
    assert [s["reward"] for s in samples] == pytest.approx(
        [sum(s["rewards"][k] for k in ("accuracy", "format", "length")) for s in samples])
    assert all(r["grad_norm"] > 0 for r in records)  # the policy really trained
    assert [s["version"] for s in samples] == [v for v in (0, 1, 2) for _ in range(PROMPTS * GROUP)]


def test_resume_continues_at_the_right_step_and_policy_version(stopped_run, tiny_model_dir):
    tmp, config, _ = stopped_run
    _, state = latest(config["checkpoint_dir"])
    assert (state.step, state.version) == (2, 2)  # the stop came during step 4: step 2 is the latest checkpoint
    with pytest.raises(ValueError, match="pass --resume"):
        run_rlvr(parse_config(config, RLVRConfig))

    CHAOS["stop_after"] = None
    result = run_rlvr(parse_config(config, RLVRConfig), resume=True)
    assert (result.steps, result.policy_version) == (4, 4)
    resumed = [r for r in read_run_log(tmp / "logs") if r["attempt"] == 2]
    assert [(r["step"], r["policy_version"]) for r in resumed] == [(3, 3), (4, 4)]
    assert resumed[0]["rollout_logprob_gap"] < SAME_POLICY_GAP  # rollouts and learners: the checkpoint's weights

    # Step 3 ran again from the checkpoint: the same prompts (batch 2), the same version-2 weights and the same
    # seed, so exactly the completions the first attempt generated before the stop.
    samples = read_run_log(tmp / "logs", "samples.jsonl")
    first, again = ([s for s in samples if s["step"] == 3 and s["attempt"] == attempt] for attempt in (0, 2))
    items = PromptSource(parse_config(config, RLVRConfig).data, prompts_per_step=PROMPTS, seed=0).batch(2)
    assert [s["id"] for s in again] == [item["id"] for item in items for _ in range(GROUP)]
    assert {s["version"] for s in again} == {2}
    assert [s["completion"] for s in again] == [s["completion"] for s in first]

    exported, _ = load_model_and_processor(result.model_dir)
    base, _ = load_model_and_processor(tiny_model_dir)
    assert exported.state_dict().keys() == base.state_dict().keys()
    assert not torch.equal(exported.state_dict()["lm_head.weight"], base.state_dict()["lm_head.weight"])


# ---------------------------------------------------------------- ray job submit to a head node


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


HEAD_PORTS = ("port", "dashboard-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
              "runtime-env-agent-port", "metrics-export-port", "ray-client-server-port", "node-manager-port",
              "object-manager-port")


@pytest.fixture
def head_node(tmp_path):
    """`ray start --head --block` on loopback with its own ports and temp dir; SIGTERM to that process stops exactly
    the processes it started (`ray stop` would stop every Ray process of the machine)."""
    ports = {name: free_port() for name in HEAD_PORTS}
    temp_dir = Path("/tmp") / f"rlvr-head-{os.getpid()}-{ports['port']}"  # short: Ray's socket paths are limited
    env = os.environ | {"RAY_AUTH_MODE": "token", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    args = ["ray", "start", "--head", "--block", "--num-cpus", "4", "--node-ip-address", "127.0.0.1",
            "--dashboard-host", "127.0.0.1", "--include-dashboard", "true", "--disable-usage-stats",
            "--temp-dir", str(temp_dir)] + [arg for name, port in ports.items() for arg in (f"--{name}", str(port))]
    with open(tmp_path / "head.log", "w") as log:
        head = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        yield f"http://127.0.0.1:{ports['dashboard-port']}", env
    finally:
        head.send_signal(signal.SIGTERM)
        head.wait(timeout=120)
        shutil.rmtree(temp_dir, ignore_errors=True)


def ray_cli(env: dict, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["ray", *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def test_job_submitted_to_a_head_node_runs_rlvr(head_node, tmp_path, tiny_model_dir, synthetic_root):
    address, env = head_node
    config = rl_config(tmp_path, tiny_model_dir, synthetic_root, mode="one_step_off",
                       learner={"num_workers": 2, "num_cpus": 0.5, "strategy": "deepspeed", "micro_batch_size": 4})
    (tmp_path / "rlvr.yaml").write_text(yaml.safe_dump({"rlvr": config}))

    deadline = time.monotonic() + 120  # the dashboard's job agent comes up a little after the head
    while True:
        submitted = ray_cli(env, "job", "submit", "--address", address, "--submission-id", "rlvr-test", "--no-wait",
                            "--working-dir", ".", "--", "python", "jobs/rlvr.py", "--config",
                            str(tmp_path / "rlvr.yaml"))
        if submitted.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert submitted.returncode == 0, submitted.stderr[-2000:]
    logs = ray_cli(env, "job", "logs", "--address", address, "--follow", "rlvr-test", timeout=480).stdout
    status = ray_cli(env, "job", "status", "--address", address, "--log-color", "false", "rlvr-test").stdout
    assert "Job 'rlvr-test' succeeded" in status, logs[-3000:]
    # The job's log shows the run's progress as plain lines (no carriage-return redraws), the last at the end.
    progress = [line for line in logs.split("\n") if line.startswith("rlvr: ")]
    assert progress and progress[-1].startswith("rlvr: 2/2 steps (100%)"), logs[-3000:]
    assert all(key in progress[-1] for key in ("| reward ", " accuracy ", " kl ")) and "\r" not in "".join(progress)

    records = read_run_log(tmp_path / "logs")
    assert [(r["step"], r["policy_version"]) for r in records] == [(1, 1), (2, 2)]
    for record in records:
        assert record["samples"] == PROMPTS * GROUP
        for key in ("reward/mean", "reward/accuracy/mean", "reward/format/mean", "accuracy", "format_rate", "kl",
                    "entropy", "clip_fraction", "response_length/mean", "version_lag/mean", "time/generate_s",
                    "time/logprob_s", "time/train_s", "time/sync_s", "tokens_per_s/generate"):
            assert np.isfinite(record[key]), key
    # one_step_off: step 2 trained on samples of version 0, generated while step 1 trained.
    assert [r["version_lag/max"] for r in records] == [0, 1]
    assert (tmp_path / "logs" / "tensorboard").is_dir()
    assert latest(config["checkpoint_dir"])[1].step == 2
    model, processor = load_model_and_processor(config["output_dir"])  # FERBench loads the export unchanged
    assert HFEngine(model, processor).generate([ChatRequest([{"role": "user", "content": "hi"}])],
                                               SamplingParams(max_new_tokens=4))[0][0].token_ids
