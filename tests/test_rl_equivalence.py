"""The learners take the same step however a batch is split: over ranks, micro-batches and accumulation steps, with
filler rows where a rank or a micro-batch is short. Also: π_old, the ratio and its clipping on a batch's second
update; the vision tower's learning rate; and a rollout group that draws the same samples with two workers as one.

Real Ray actors (the LearnerGroup the controller uses, DDP over gloo; one learner rank in this process where a group
of one is all a test needs), the real tiny model, real images, real hf rollout workers.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
import torch.distributed as dist

from unifer_ray.config import parse_config
from unifer_ray.engines import Completion, SamplingParams
from unifer_ray.models.loading import load_model_and_processor
from unifer_ray.optim import OptimizerConfig, build_optimizer
from unifer_ray.prompts import ferbench_prompt
from unifer_ray.rl.config import RLVRConfig, RolloutConfig
from unifer_ray.rl.controller import rows_with_gradient
from unifer_ray.rl.grpo import sequence_weights
from unifer_ray.rl.learner import LearnerGroup, LearnerWorker, TrainRow, free_port, group_timeout_s
from unifer_ray.rl.rollout import RolloutGroup

LABELS = ["surprise", "fear", "disgust", "happiness", "sadness", "anger", "neutral"]
LENGTHS = [3, 9, 1, 6]  # unequal completion lengths: the aggregations weigh them differently
ADVANTAGES = [1.3, -0.4, 0.8, -1.7]
MAX_NEW_TOKENS = 12
RTOL = 1e-4


def images(synthetic_root: Path, count: int) -> list[str]:
    found = sorted((synthetic_root / "RAF-DB").rglob("*.jpg"))[:count]
    assert len(found) == count
    return [str(path) for path in found]


@pytest.fixture(scope="module")
def rows(tiny_model_dir, synthetic_root) -> list[TrainRow]:
    """Four completions of plain text tokens, each prompt with its own image and label order, and rollout
    log-probabilities drawn around the tiny model's (~ -log 650), so that some truncated importance weights reach
    the cap and others do not."""
    tokenizer = load_model_and_processor(tiny_model_dir)[1].tokenizer
    plain = [i for i in range(len(tokenizer)) if i not in tokenizer.all_special_ids]
    rng = np.random.default_rng(0)
    return [TrainRow(image_uri=uri, problem=ferbench_prompt(LABELS[k:] + LABELS[:k]),
                     completion_ids=[int(t) for t in rng.choice(plain, n)], advantage=a, weight=0.0,
                     rollout_logprobs=rng.uniform(-8.0, -5.0, n).tolist())
            for k, (uri, n, a) in enumerate(zip(images(synthetic_root, 4), LENGTHS, ADVANTAGES))]


def weighted(rows: list[TrainRow], aggregation: str) -> list[TrainRow]:
    """The rows with their weights in this batch, as the controller computes them for the whole batch."""
    lengths = np.array([len(r.completion_ids) for r in rows])
    return [TrainRow(**{**r.__dict__, "weight": float(w)})
            for r, w in zip(rows, sequence_weights(lengths, aggregation, MAX_NEW_TOKENS))]


def config(tmp: Path, model_dir: Path, *, learner: dict, grpo: dict | None = None, steps: int = 9) -> RLVRConfig:
    """A batch of 4 rows (2 prompts × 2)."""
    return parse_config({
        "model": str(model_dir), "data": {"paths": ["unused"], "image_size": 56},
        "output_dir": str(tmp / "model"), "checkpoint_dir": str(tmp / "checkpoints"), "steps": steps,
        "learner": {"strategy": "ddp", "num_cpus": 0.5, **learner},
        "grpo": {"group_size": 2, "prompts_per_step": 2, "max_new_tokens": MAX_NEW_TOKENS, **(grpo or {})},
    }, RLVRConfig)


# Adam moves each weight by about lr whatever its gradient's scale. With no momentum and eps far above the gradients
# the update is lr × gradient / eps instead: the weights after a step show that step's gradient, scale included
# (lr 0.1 makes the updates large beside the float32 spacing of the weights). A constant rate; no clipping, which
# would hide a scale.
PROPORTIONAL = {"lr": 0.1, "betas": (0.0, 0.999), "eps": 1.0, "max_grad_norm": 1e9, "warmup_ratio": 0.0,
                "min_lr_ratio": 1.0}
SPLITS = {"1 rank, micro-batch 4": {"num_workers": 1, "micro_batch_size": 4},
          "1 rank, 4 accumulated micro-batches of 1": {"num_workers": 1, "micro_batch_size": 1},
          "2 ranks, micro-batch 1": {"num_workers": 2, "micro_batch_size": 1}}


@pytest.fixture(scope="module")
def split_groups(ray_cluster, tiny_model_dir, tmp_path_factory):
    groups = {}
    try:
        for name, learner in SPLITS.items():
            tmp = tmp_path_factory.mktemp("split")
            groups[name] = LearnerGroup(config(tmp, tiny_model_dir, grpo={"beta": 0.04},
                                               learner={**learner, "optimizer": PROPORTIONAL}), str(tiny_model_dir))
            groups[name].wait_ready()
        yield groups
    finally:
        for group in groups.values():
            group.shutdown()


def state(group: LearnerGroup) -> dict[str, torch.Tensor]:
    return ray.get(group.trainable_state())


@pytest.mark.parametrize("aggregation", ["grpo", "dr_grpo", "dapo"])
def test_a_step_is_the_same_however_the_batch_is_split(split_groups, rows, aggregation):
    """The same rows on 1 rank in one micro-batch, on 1 rank in four accumulated micro-batches, and on 2 ranks; then
    3-row and 1-row batches, where ranks and micro-batches are filled up with weight-0 rows. Loss, gradient norm, the
    statistics and the change of every weight agree (the groups take every step alike, so each starts from the same
    weights)."""
    names = list(split_groups)
    reference = names[0]
    for count in (4, 3, 1):
        batch = weighted(rows[:count], aggregation)
        before = {name: state(group) for name, group in split_groups.items()}
        stats = {name: group.train(batch) for name, group in split_groups.items()}
        deltas = {name: {k: v - before[name][k] for k, v in state(group).items()}
                  for name, group in split_groups.items()}
        assert stats[reference]["grad_norm"] > 0 and deltas[reference]["lm_head.weight"].abs().max() > 0
        assert stats[reference]["train_tokens"] == sum(LENGTHS[:count])  # fillers count in no statistic
        # Changes are compared on the scale of the largest: a small change is also a difference of two float32
        # weights, exact to the weights' spacing only.
        scale = max(float(d.abs().max()) for d in deltas[reference].values())
        for name in names[1:]:
            where = f"{aggregation}, {count} rows, {name} vs {reference}"
            for key in ("loss", "grad_norm", "kl", "entropy", "train_tokens", "rollout_is_clipped_fraction"):
                assert stats[name][key] == pytest.approx(stats[reference][key], rel=RTOL, abs=1e-9), f"{where}: {key}"
            for key, delta in deltas[name].items():
                torch.testing.assert_close(delta, deltas[reference][key], rtol=RTOL, atol=RTOL * scale,
                                           msg=lambda m, key=key, where=where: f"{where}: {key}: {m}")
        if count == len(rows):
            assert 0 < stats[reference]["rollout_is_clipped_fraction"] < 1  # the cap bit on some tokens, not all


@contextlib.contextmanager
def learner_in_process(config: RLVRConfig, model_dir: Path, monkeypatch):
    """One learner rank in this process (a group of one, over gloo), built as LearnerGroup builds its workers."""
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.setenv(key, "")  # the worker sets them for its group; restored after the test
    worker = LearnerWorker(config.learner.model_dump(), config.grpo.model_dump(), model_dir=str(model_dir),
                           image_size=config.data.image_size, rank=0, world_size=1, grad_accum_steps=1,
                           total_steps=config.steps * config.grpo.updates_per_batch, seed=config.seed,
                           group_timeout_s=group_timeout_s(config))
    worker.setup(("127.0.0.1", free_port()))
    try:
        yield worker
    finally:
        dist.destroy_process_group()


def test_a_second_update_weighs_by_the_ratio_to_pi_old_and_clips_it(tiny_model_dir, tmp_path, rows, monkeypatch):
    """`updates_per_batch: 2` in one call: the first update has ratio 1 (π_old is π), the second weighs each token by
    π / π_old and clips it at 1 ± ε. Against two calls of one update each (ratio always 1, so never clipped): the
    clipped fraction is above 0 only with two updates, and the weights differ, with clipping and without. And the
    vision tower steps at lr × vision_lr_ratio."""
    lr, ratio = 3e-3, 0.1  # Adam's first step moves each weight by lr: far enough for ratios beyond 1 ± 0.02
    optimizer = {"lr": lr, "vision_lr_ratio": ratio, "warmup_ratio": 0.0, "min_lr_ratio": 1.0, "max_grad_norm": 1e9}
    learner = {"num_workers": 1, "micro_batch_size": 4, "optimizer": optimizer}
    # Rollout log-probabilities would add importance weights that depend on π_old: left out here.
    batch = [TrainRow(**{**r.__dict__, "rollout_logprobs": None}) for r in weighted(rows, "grpo")]
    runs = {"two updates, clipped": {"updates_per_batch": 2, "clip_eps": 0.02},
            "two updates, unclipped": {"updates_per_batch": 2, "clip_eps": 1e6},
            "two calls of one update": {"updates_per_batch": 1, "clip_eps": 0.02}}
    weights, clipped = {}, {}
    for name, grpo in runs.items():
        calls = 3 - grpo["updates_per_batch"]
        run_config = config(tmp_path / name.replace(" ", "_").replace(",", ""), tiny_model_dir, learner=learner,
                            grpo={**grpo, "beta": 0.0}, steps=calls)
        with learner_in_process(run_config, tiny_model_dir, monkeypatch) as worker:
            start = worker.trainable_state()
            sums = [worker.train(batch)["sums"]]
            if calls == 2:
                first = worker.trainable_state()  # after one Adam step: each weight with a gradient moved by its lr
                moved = {k: (first[k] - start[k]).abs().max().item() for k in start}
                vision = max(v for k, v in moved.items() if k.startswith("model.visual."))
                language = max(v for k, v in moved.items() if not k.startswith("model.visual."))
                assert vision == pytest.approx(ratio * lr, rel=1e-3) and language == pytest.approx(lr, rel=1e-3)
                sums.append(worker.train(batch)["sums"])
            weights[name] = worker.trainable_state()
            clipped[name] = sum(s["clipped"] for s in sums) / sum(s["tokens"] for s in sums)

    # Half of the tokens are the second update's: a fraction above 0.05 is a tenth of them or more.
    assert clipped["two updates, clipped"] > 0.05
    assert clipped["two updates, unclipped"] == 0 and clipped["two calls of one update"] == 0

    def differ(a: str, b: str) -> float:
        return max((weights[a][k] - weights[b][k]).abs().max().item() for k in weights[a])

    assert differ("two updates, clipped", "two updates, unclipped") > 1e-5, "clipping changed the second update"
    assert differ("two updates, unclipped", "two calls of one update") > 1e-5, "π / π_old weighed the second update"


def test_without_a_kl_term_rows_of_advantage_zero_are_skipped_and_the_step_is_the_same(tiny_model_dir, tmp_path, rows,
                                                                                     monkeypatch):
    """With beta 0 the controller sends the learners only the rows whose advantage is not 0 (an all-equal group's),
    and a filler where none is left: each step moves the weights exactly as the whole batch does, weight decay and
    learning rate schedule included."""
    mixed = weighted([replace(r, advantage=0.0) if i % 2 else r for i, r in enumerate(rows)], "grpo")
    nothing = [replace(r, advantage=0.0) for r in mixed]
    assert rows_with_gradient(mixed, 0.04) == mixed  # with a KL term every row has a gradient
    assert rows_with_gradient(mixed, 0.0) == [mixed[0], mixed[2]]
    assert rows_with_gradient(nothing, 0.0) == [nothing[0].filler()]
    learner = {"num_workers": 1, "micro_batch_size": 4, "optimizer": {**PROPORTIONAL, "weight_decay": 0.1}}
    deltas, stats = {}, {}
    runs = {"whole": [mixed, nothing], "skipped": [rows_with_gradient(batch, 0.0) for batch in (mixed, nothing)]}
    for name, batches in runs.items():
        run_config = config(tmp_path / name, tiny_model_dir, learner=learner, grpo={"beta": 0.0}, steps=2)
        with learner_in_process(run_config, tiny_model_dir, monkeypatch) as worker:
            for step, batch in enumerate(batches):
                start = worker.trainable_state()
                stats[name, step] = worker.train(batch)
                deltas[name, step] = {k: v - start[k] for k, v in worker.trainable_state().items()}
    for step in range(2):
        assert stats["skipped", step]["grad_norm"] == pytest.approx(stats["whole", step]["grad_norm"], rel=RTOL)
        scale = max(float(d.abs().max()) for d in deltas["whole", step].values())
        assert scale > 0  # step 1: weight decay alone
        for key, delta in deltas["skipped", step].items():
            torch.testing.assert_close(delta, deltas["whole", step][key], rtol=RTOL, atol=RTOL * scale)
    assert stats["whole", 0]["grad_norm"] > 0 and stats["whole", 1]["grad_norm"] == 0


def test_the_optimizer_gives_the_vision_tower_its_own_rate(tiny_model_dir):
    """Every trainable weight in exactly one group: the vision tower's (blocks and merger) at lr × vision_lr_ratio,
    the language model's at lr, through warmup and decay."""
    model, _ = load_model_and_processor(tiny_model_dir)
    config = OptimizerConfig(lr=4e-4, vision_lr_ratio=0.25, warmup_ratio=0.5, weight_decay=0.1)
    optimizer, scheduler = build_optimizer(model, config, total_steps=4)
    vision = {id(p) for p in model.model.visual.parameters()}
    grouped = [(id(p), group) for group in optimizer.param_groups for p in group["params"]]
    assert sorted(i for i, _ in grouped) == sorted(id(p) for p in model.parameters() if p.requires_grad)
    assert {i in vision for i, _ in grouped} == {True, False}
    for _ in range(4):
        language_lr = scheduler.get_last_lr()[0]
        assert language_lr > 0
        for i, group in grouped:
            assert group["lr"] == pytest.approx(language_lr * (config.vision_lr_ratio if i in vision else 1.0))
        optimizer.step()
        scheduler.step()


def test_two_rollout_workers_draw_the_samples_of_one(ray_cluster, tiny_model_dir, synthetic_root):
    """A group of two hf workers draws each prompt's samples as one worker drawing the whole batch does (the call a
    group of one makes: every prompt, the batch's seed)."""
    items = [{"id": f"i{k}", "image_uri": uri, "problem": ferbench_prompt(LABELS)}
             for k, uri in enumerate(images(synthetic_root, 3))]
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=10, logprobs=True)
    rollout = RolloutConfig(num_workers=2, num_cpus=0.5, engine={"engine": "hf", "max_batch_size": 8})
    group = RolloutGroup(rollout, model=str(tiny_model_dir), image_size=56, max_prompt_tokens=4096)
    try:
        two = group.generate(items, params, seed=100)
        one = ray.get(group.workers[0].generate.remote(items, params.model_copy(update={"seed": 100}).model_dump()))
    finally:
        group.shutdown()
    assert [i["id"] for i in two.items] == [i["id"] for i in items] and two.versions == [0, 0, 0]
    assert_same_samples(one["groups"], two.completions)


def assert_same_samples(one: list[list[Completion]], other: list[list[Completion]]) -> None:
    assert [[c.token_ids for c in group] for group in one] == [[c.token_ids for c in group] for group in other]
    for a, b in zip(one, other):
        for x, y in zip(a, b):
            assert x.logprobs == pytest.approx(y.logprobs, abs=1e-5)
    assert len({tuple(c.token_ids) for group in one for c in group}) > len(one)  # samples, not copies
