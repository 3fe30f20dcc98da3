"""RLVR on real Ray actors with the real tiny model and vLLM's CPU build as the rollout engine: weight transfer through
vLLM's API (greedy output equal to the learner's after every push, prefix caching on), a rollout actor killed or hung
mid-generation and killed mid-run, --resume after a stop. The job submitted with `ray job submit` runs in
tests/test_cluster_sim.py."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest
import ray
import torch

from tests.helpers import GROUP, PROMPTS, VLLM, needs_vllm, rl_config, write_rlvr_set
from unifer_ray.config import parse_config
from unifer_ray.engines import SamplingParams
from unifer_ray.engines.platform import cpu_engine_dtype, vllm_installed
from unifer_ray.models.loading import load_model_and_processor
from unifer_ray.rl.checkpoint import latest
from unifer_ray.rl.config import PromptData, RLVRConfig, SyncConfig
from unifer_ray.rl.controller import run_rlvr
from unifer_ray.rl.learner import LearnerGroup, TrainRow
from unifer_ray.rl.prompts import PromptSource
from unifer_ray.rl.rollout import RolloutGroup
from unifer_ray.rl.weight_sync import WeightSync
from unifer_ray.runlog import read_run_log

REPO = Path(__file__).resolve().parent.parent
HF = {"engine": "hf", "max_batch_size": 8}
# Mean |Δ log p| of the sampled tokens between the rollout engine and the learner holding the same weights: vLLM's CPU
# kernels and transformers differ in the last digits (fp32 both), nothing like a policy step.
SAME_POLICY_GAP = 5e-3


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


def test_data_tasks_keeps_only_those_task_types_and_names_the_ones_that_match_nothing(ray_cluster, tmp_path,
                                                                                     synthetic_root):
    lines = write_rlvr_set(synthetic_root, tmp_path / "mc.jsonl").read_text().splitlines()
    items = [json.loads(line) for line in lines]
    for item in items[::3]:
        item["task"] = "binary"
    (tmp_path / "mixed.jsonl").write_text("".join(json.dumps(item) + "\n" for item in items))

    def source(tasks: list[str] | None, prompts: int = PROMPTS) -> PromptSource:
        data = PromptData(paths=[str(tmp_path / "mixed.jsonl")], image_root=str(synthetic_root), image_size=56,
                          tasks=tasks)
        return PromptSource(data, prompts_per_step=prompts, seed=0)

    binary = {item["id"] for item in items[::3]}
    assert {item["id"] for item in source(["binary"]).items} == binary
    assert {item["task"] for item in source(["mc"]).items} == {"mc"} and len(source(["mc"])) == len(items) - len(binary)
    assert len(source(None)) == len(source(["binary", "mc"])) == len(items)
    with pytest.raises(ValueError, match=r"mixed.jsonl.*data.tasks \['unified'\] match no valid RLVR item "
                                         r"\(their tasks: \['binary', 'mc'\]\)"):
        source(["mc", "unified"])
    with pytest.raises(ValueError, match=rf"{len(binary)} valid RLVR items of the tasks \['binary'\] "
                                         rf"\(of {len(items)} valid\), fewer than prompts_per_step 99"):
        source(["binary"], prompts=99)



def test_max_items_repeats_one_seeded_subset_every_epoch_with_the_labels_in_their_share(ray_cluster, tmp_path,
                                                                                       synthetic_root):
    """`data.max_items`: the same drawn items in every epoch (each epoch their own order), so the first and the last
    steps of a run see the same prompts; drawn in the `by_answer` order, the labels keep their shares."""
    path = write_rlvr_set(synthetic_root, tmp_path / "set.jsonl")

    def source(max_items: int | None, seed: int = 0) -> PromptSource:
        data = PromptData(paths=[str(path)], image_root=str(synthetic_root), image_size=56, max_items=max_items)
        return PromptSource(data, prompts_per_step=PROMPTS, seed=seed)

    every = source(None)
    some = source(2 * PROMPTS)
    assert len(some) == 2 * PROMPTS < len(every)
    epochs = [[item["id"] for step in range(2 * e, 2 * e + 2) for item in some.batch(step)] for e in range(3)]
    assert all(sorted(ids) == sorted(epochs[0]) for ids in epochs) and epochs[0] != epochs[1]
    labels = Counter(item["answer"] for item in every.items)
    drawn = Counter(item["answer"] for item in some.items)
    assert all(abs(drawn[a] - labels[a] * len(some) / len(every)) <= 1 for a in labels)
    assert [item["id"] for item in some.items] == [item["id"] for item in source(2 * PROMPTS).items]
    assert [item["id"] for item in some.items] != [item["id"] for item in source(2 * PROMPTS, seed=1).items]


# ---------------------------------------------------------------- weight sync


def train_rows(rollout, signs) -> list[TrainRow]:
    return [TrainRow(image_uri=item["image_uri"], problem=item["problem"], completion_ids=c.token_ids,
                     rollout_logprobs=c.logprobs, advantage=sign, weight=1 / (PROMPTS * GROUP))
            for item, group in zip(rollout.items, rollout.completions) for c, sign in zip(group, signs)]


# What the hang test waits before it replaces a frozen engine. A healthy new engine's first call with log-probabilities
# also compiles vLLM's token-rank kernel (torch.compile, about 2 s alone): beside a second test worker, 12 s were
# not enough (2026-12-03).
GENERATE_TIMEOUT_S = 30


def push_test_config(tmp: Path, model_dir: Path, synthetic_root: Path, engine: dict) -> RLVRConfig:
    return parse_config(rl_config(tmp, model_dir, synthetic_root,
                                  rollout={"engine": engine, "generate_timeout_s": GENERATE_TIMEOUT_S},
                                  learner={"freeze_vision_tower": True, "optimizer": {"lr": 1e-2}},
                                  grpo={"beta": 0.0}), RLVRConfig)


class RLActors:
    """A learner, rollout workers and the weight sync between them."""

    def __init__(self, config: RLVRConfig, model_dir: Path):
        self.config = config
        self.items = PromptSource(config.data, prompts_per_step=PROMPTS, seed=0).batch(0)
        self.learners = LearnerGroup(config, str(model_dir))
        self.rollouts = RolloutGroup(config.rollout, model=str(model_dir), image_size=56, max_prompt_tokens=4096)
        self.learners.wait_ready()
        self.sync = WeightSync.create(SyncConfig(), self.learners, self.rollouts)
        self.tokenizer = load_model_and_processor(model_dir)[1].tokenizer

    def shutdown(self) -> None:
        self.rollouts.shutdown()
        self.learners.shutdown()


@pytest.fixture(scope="module")
def vllm_actors(ray_cluster, tmp_path_factory, tiny_model_dir, synthetic_root):
    """One set of vLLM actors for the module's tests, in order: pushes, then a worker killed and hung (an engine
    start costs tens of seconds here)."""
    # Engines in processes of their own, as on GPUs (CPU engines run inside their actor): the kill and hang tests
    # check that those processes end with their actor.
    config = push_test_config(tmp_path_factory.mktemp("vllm_actors"), tiny_model_dir, synthetic_root,
                              {"engine": "vllm", "vllm_kwargs": VLLM, "one_process": False})
    actors = RLActors(config, tiny_model_dir)
    yield actors
    actors.shutdown()


def check_pushes(actors: RLActors) -> None:
    """Each push makes the rollouts' greedy output the learners' (a push that left old KV in a cache would not)."""
    rollouts, learners, items = actors.rollouts, actors.learners, actors.items
    greedy = SamplingParams(max_new_tokens=12, temperature=0.0)
    sampling = SamplingParams(n=GROUP, max_new_tokens=12, temperature=1.0, logprobs=True)

    def texts(rollout) -> list[list[str]]:
        # Decoded as the learner decodes (vLLM's incremental detokenizer holds back a partial UTF-8 character).
        return [[actors.tokenizer.decode(c.token_ids, skip_special_tokens=True) for c in g]
                for g in rollout.completions]

    def tokens(rollout) -> list[list[list[int]]]:
        return [[c.token_ids for c in g] for g in rollout.completions]

    before = rollouts.generate(items, greedy, seed=0)
    assert before.versions == [0, 0]
    outputs, ids = [texts(before)], [tokens(before)]
    assert outputs[0] == learners.generate(items, greedy.model_dump())
    for version in (1, 2):
        sampled = rollouts.generate(items, sampling, seed=version)
        stats = learners.train(train_rows(sampled, [1.0, -1.0, 1.0, -1.0]))
        # The learner rebuilt each prompt and scored the sampled ids: what the engine reported, up to numerics.
        assert stats["rollout_logprob_gap"] < SAME_POLICY_GAP and stats["rollout_mismatch_k3"] < 1e-4
        assert stats["rollout_is_clipped_fraction"] == 0 and stats["grad_norm"] > 0

        timings = actors.sync.push(version)
        assert timings["sync_s"] >= timings["sync_load_s"] > 0
        # The same prompts again: the prefix, multimodal and encoder caches hold entries of the old weights.
        after = rollouts.generate(items, greedy, seed=0)
        assert after.versions == [version, version]
        outputs.append(texts(after))
        ids.append(tokens(after))
        # Token ids: the random model's bytes often decode to the same run of U+FFFD whatever they are.
        assert ids[-1] != ids[-2], "the rollout output changed"
        assert outputs[-1] == learners.generate(items, greedy.model_dump()), "to the learner's greedy output"

    # Only trainable weights travel: the frozen vision blocks stay out, the merger and the language model go
    # (named as in the model's files for vLLM, which maps those names only).
    state = ray.get(actors.sync.state)
    prefix = "visual." if rollouts.vllm else "model.visual."
    assert not any(name.startswith(prefix + "blocks") for name in state)
    assert any(name.startswith(prefix + "merger") for name in state) and "lm_head.weight" in state


@needs_vllm
def test_each_push_makes_the_vllm_rollouts_greedy_output_the_learners(vllm_actors):
    check_pushes(vllm_actors)


def test_each_push_makes_the_hf_rollouts_greedy_output_the_learners(ray_cluster, tmp_path, tiny_model_dir,
                                                                    synthetic_root):
    actors = RLActors(push_test_config(tmp_path, tiny_model_dir, synthetic_root, HF), tiny_model_dir)
    try:
        check_pushes(actors)
    finally:
        actors.shutdown()


def engine_processes(actor: ray.actor.ActorHandle) -> list[psutil.Process]:
    """The vLLM engine-core process(es) under a rollout actor: vLLM runs the model outside the actor's process."""
    pid = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))
    engines = [p for p in psutil.Process(pid).children(recursive=True) if "EngineCore" in p.name()]
    assert engines, "the rollout actor runs its vLLM engine in a child process"
    return engines


def assert_gone(pids: list[int]) -> None:
    """Right away, not eventually: the group ends a replaced worker's engine processes before going on."""
    alive = [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"engine processes {alive} outlived their replaced rollout actor"


@needs_vllm
def test_a_worker_killed_or_hung_mid_generation_is_replaced_restored_and_its_share_generated_again(vllm_actors):
    rollouts, items = vllm_actors.rollouts, vllm_actors.items
    version = rollouts.version  # 2 after the push test; the replacements are restored to it through the sync

    def tokens(rollout) -> list[list[list[int]]]:
        return [[c.token_ids for c in g] for g in rollout.completions]

    hung = []
    try:
        params = SamplingParams(n=GROUP, max_new_tokens=64, temperature=1.0, logprobs=True)
        expected = rollouts.generate(items, params, seed=3)
        # Counted from here: on a loaded machine an earlier generation may have outlasted generate_timeout_s.
        replaced = rollouts.replacements
        first_engine = rollouts.engine_processes[0]["pids"]
        assert first_engine and set(first_engine) >= {p.pid for p in engine_processes(rollouts.workers[0])}
        pending = rollouts.submit(items, params, seed=3)
        ray.kill(rollouts.workers[0])  # while it generates the share
        regenerated = rollouts.collect(pending)
        assert rollouts.replacements == replaced + 1
        assert_gone(first_engine)
        assert regenerated.items == expected.items and regenerated.versions == [version, version]
        # The replacement is restored to the same weights and gets the same seeds: the share's real completions,
        # none fabricated.
        assert tokens(regenerated) == tokens(expected)

        # A hung engine: the actor is alive, its vLLM engine process stops answering (SIGSTOP).
        hung = engine_processes(rollouts.workers[0])
        for process in hung:
            process.suspend()
        started = time.monotonic()
        regenerated = rollouts.collect(rollouts.submit(items, params, seed=3))
        assert time.monotonic() - started >= vllm_actors.config.rollout.generate_timeout_s
        assert rollouts.replacements == replaced + 2
        # Killing the actor took its engine process with it: no hung engine keeps holding memory (or a GPU).
        assert_gone([process.pid for process in hung])
        assert tokens(regenerated) == tokens(expected)
    finally:
        for process in hung:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()


# ---------------------------------------------------------------- a killed rollout actor, then --resume

def length_reward(completions, solutions, **_):
    """A custom reward that random completions differ on, so that the tiny random model's weights move."""
    return [len(c) / 100 for c in completions]


CHAOS = {"calls": 0, "stop_after": 3, "killed": [], "others": set()}  # others: actors that are not the run's


def kill_mid_update(name: str) -> None:
    """Freeze the rollout actor's vLLM engine, and once the actor is inside the next weight load (it holds the
    update's file in shared memory open, waiting on its engine), kill the actor and its engine."""
    actor = ray.get_actor(name)
    if not vllm_installed():
        # Transformers keeps the model inside the actor, which cannot be frozen halfway through a load: the actor
        # dies before the update instead, and the sync finds it dead all the same.
        ray.kill(actor)
        CHAOS["killed"].append(name)
        return
    pid = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))
    engines = engine_processes(actor)
    for process in engines:
        process.suspend()

    def kill() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any(
                f.path.endswith(".safetensors") for f in psutil.Process(pid).open_files()):
            time.sleep(0.02)
        ray.kill(actor)
        for process in engines:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        CHAOS["killed"].append(name)

    threading.Thread(target=kill, daemon=True).start()


def chaos(completions, solutions, **_):
    """A zero-weight reward that, while step 1 is scored, has the run's rollout actor die in the middle of the weight
    update that follows, and stops the run during step 4 (whose latest checkpoint is step 2's) while "stop_after" is
    set: a crash."""
    CHAOS["calls"] += 1
    if CHAOS["calls"] == 1:
        for name in ray.util.list_named_actors():
            if name.startswith("rollout-") and name not in CHAOS["others"]:
                kill_mid_update(name)
    if CHAOS["stop_after"] is not None and CHAOS["calls"] > CHAOS["stop_after"]:
        raise RuntimeError("stopped by the test")
    return [0.0] * len(completions)


SYNC_TIMEOUT_S = 1800  # far above a replacement engine's start on a loaded machine (166 s seen at load 25)


@pytest.fixture(scope="module")
def stopped_run(ray_cluster, tmp_path_factory, tiny_model_dir, synthetic_root):
    """A 4-step run whose rollout actor is killed during step 1 and which stops during step 4."""
    tmp = tmp_path_factory.mktemp("rlvr_stop")
    config = rl_config(tmp, tiny_model_dir, synthetic_root, steps=4, checkpoint_every=2,
                       # the kill freezes the engine's own processes first (as on GPUs; see vllm_actors)
                       rollout={"sync_timeout_s": SYNC_TIMEOUT_S,
                                "engine": {"engine": "auto", "vllm_kwargs": VLLM, "one_process": False}},
                       rewards=[{"name": "accuracy"}, {"name": "format"},
                                {"name": "length", "function": f"{__name__}:length_reward"},
                                {"name": "chaos", "function": f"{__name__}:chaos", "weight": 0.0}])
    # The module's other rollout actors (vllm_actors) are alive too: only this run's is killed.
    CHAOS.update(calls=0, stop_after=3, killed=[], others=set(ray.util.list_named_actors()))
    with pytest.raises(RuntimeError, match="stopped by the test"):
        run_rlvr(parse_config(config, RLVRConfig))
    return tmp, config, CHAOS["killed"]


def test_a_killed_rollout_actor_is_replaced_and_no_step_trains_on_fabricated_rewards(stopped_run):
    tmp, config, killed = stopped_run
    assert len(killed) == 1, killed  # the run's rollout actor, killed mid-run
    records = read_run_log(tmp / "logs")
    assert [r["step"] for r in records] == [1, 2, 3]  # every planned step before the stop ran
    # The worker died during step 1's weight load; the sync saw it at once (not after sync_timeout_s), and its
    # replacement got the whole of version 1 and generated steps 2 and 3.
    assert [r["rollout_replacements"] for r in records] == [1, 0, 0]
    assert records[0]["time/sync_s"] < SYNC_TIMEOUT_S / 4  # a vLLM engine's restart included
    # No step trained on a partial update: the engine held exactly the learners' weights for steps 2 and 3.
    assert all(r["rollout_logprob_gap"] < SAME_POLICY_GAP for r in records)
    assert all(r["samples"] == PROMPTS * GROUP and r["prompts"] == PROMPTS for r in records)
    # The mismatch is logged beside the dtype the rollouts ran in: the CPU's fast one (float32 for transformers).
    assert {r["rollout_dtype"] for r in records} == {cpu_engine_dtype() if vllm_installed() else "float32"}
    # Every scored sample is a real completion of the engine, and the learners trained on exactly those. Three
    # witnesses that do not share the controller's code: the learners' own count of the tokens they trained on (from
    # their masks) equals each step's logged completion lengths, so no placeholder or lost share was trained on; the
    # learners' log-probabilities of those tokens match the engine's (the gap above), which fabricated tokens would
    # not; and each logged reward is what this test's own rules say of the logged text.
    samples = read_run_log(tmp / "logs", "samples.jsonl")
    assert len(samples) == 3 * PROMPTS * GROUP
    # A completion may be empty text (the engine's first token ended it: one token), never tokenless.
    assert all(s["tokens"] > 0 for s in samples)
    for record in records:
        logged = [s for s in samples if s["step"] == record["step"]]
        assert record["train_tokens"] == sum(s["tokens"] for s in logged)
    for s in samples:
        assert s["rewards"]["length"] == len(s["completion"]) / 100
        if "<answer>" not in s["completion"]:  # nothing answered earns no accuracy, no format
            assert s["rewards"]["accuracy"] == s["rewards"]["format"] == 0.0
        assert s["reward"] == pytest.approx(sum(s["rewards"][k] for k in ("accuracy", "format", "length")))
    assert all(r["grad_norm"] > 0 for r in records)  # the policy really trained
    assert [s["version"] for s in samples] == [v for v in (0, 1, 2) for _ in range(PROMPTS * GROUP)]


def test_resume_continues_at_the_right_step_and_policy_version(stopped_run, tiny_model_dir):
    tmp, config, _ = stopped_run
    _, state = latest(config["checkpoint_dir"])
    assert (state.step, state.version) == (2, 2)  # the stop came during step 4: step 2 is the latest checkpoint
    with pytest.raises(ValueError, match="pass --resume"):
        run_rlvr(parse_config(config, RLVRConfig))

    CHAOS["stop_after"] = None
    # The resumed run's engine inside its actor (the CPU default): how an engine runs is no part of the run's state,
    # and it starts in a third of the time.
    engine = config["rollout"]["engine"] | {"one_process": None}
    result = run_rlvr(parse_config(config | {"rollout": config["rollout"] | {"engine": engine}}, RLVRConfig),
                      resume=True)
    assert (result.steps, result.policy_version) == (4, 4)
    resumed = [r for r in read_run_log(tmp / "logs") if r["start_step"] == 2]
    assert [(r["step"], r["policy_version"]) for r in resumed] == [(3, 3), (4, 4)]
    assert resumed[0]["rollout_logprob_gap"] < SAME_POLICY_GAP  # rollouts and learners: the checkpoint's weights

    # Step 3 ran again from the checkpoint: the same prompts (batch 2), the same version-2 weights and the same
    # seed, so exactly the completions the first attempt generated before the stop.
    samples = read_run_log(tmp / "logs", "samples.jsonl")
    first, again = ([s for s in samples if s["step"] == 3 and s["start_step"] == start] for start in (0, 2))
    items = PromptSource(parse_config(config, RLVRConfig).data, prompts_per_step=PROMPTS, seed=0).batch(2)
    assert [s["id"] for s in again] == [item["id"] for item in items for _ in range(GROUP)]
    assert {s["version"] for s in again} == {2}
    assert [s["completion"] for s in again] == [s["completion"] for s in first]

    exported, _ = load_model_and_processor(result.model_dir)
    base, _ = load_model_and_processor(tiny_model_dir)
    assert exported.state_dict().keys() == base.state_dict().keys()
    assert not torch.equal(exported.state_dict()["lm_head.weight"], base.state_dict()["lm_head.weight"])
