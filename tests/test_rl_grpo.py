"""GRPO math against hand-computed values, the rewards, the learners' filler rows, and the RLVR configs (no cluster,
no model)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from unifer_ray.config import ConfigError, load_config, parse_config
from unifer_ray.engines import Completion
from unifer_ray.parallel import micro_batches, rank_shares
from unifer_ray.rl.checkpoint import RunState
from unifer_ray.rl.config import RewardSpec, RLVRConfig
from unifer_ray.rl.controller import ScoredBatch, score, step_record
from unifer_ray.rl.grpo import (
    aggregate,
    group_advantages,
    rollout_mismatch,
    sequence_weights,
    token_loss,
    truncated_is_weights,
)
from unifer_ray.rl.learner import TrainRow
from unifer_ray.rl.orders import ORDERS
from unifer_ray.rl.rewards import RewardSet, accuracy_reward, format_reward, load_reward
from unifer_ray.rl.rollout import Rollout

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- advantages


def test_group_advantages_by_hand():
    rewards = np.array([[1.0, 0.0, 0.0, 1.0], [2.0, 0.0, 1.0, 1.0]])
    advantages, all_equal = group_advantages(rewards, "grpo", eps=1e-4)
    # Group 1: mean 0.5, sample std sqrt((4 * 0.25) / 3) = sqrt(1/3).
    s1 = math.sqrt(1 / 3) + 1e-4
    # Group 2: mean 1, deviations (1, -1, 0, 0), sample std sqrt(2/3).
    s2 = math.sqrt(2 / 3) + 1e-4
    expected = [[0.5 / s1, -0.5 / s1, -0.5 / s1, 0.5 / s1], [1 / s2, -1 / s2, 0.0, 0.0]]
    np.testing.assert_allclose(advantages, expected, rtol=1e-12)
    assert all_equal.tolist() == [False, False]


def test_advantages_without_std_scaling_and_all_equal_groups():
    rewards = np.array([[1.0, 1.0, 1.0], [0.0, 3.0, 0.0]])
    advantages, all_equal = group_advantages(rewards, "dr_grpo", eps=1e-4)
    np.testing.assert_allclose(advantages, [[0.0, 0.0, 0.0], [-1.0, 2.0, -1.0]])
    assert all_equal.tolist() == [True, False]
    # Scaled, an all-equal group still has zero advantages (0 / (0 + eps)), not NaN.
    scaled, _ = group_advantages(rewards, "grpo", eps=1e-4)
    assert scaled[0].tolist() == [0.0, 0.0, 0.0]


def test_advantages_need_groups_of_two():
    with pytest.raises(ValueError, match="G >= 2"):
        group_advantages(np.array([[1.0], [0.0]]), "grpo", eps=1e-4)


# ---------------------------------------------------------------- per-token loss


def logp(p: float) -> float:
    return math.log(p)


def test_clipped_ratio_by_hand():
    # Four tokens: ratio 0.5/0.4 = 1.25 (above 1 + 0.2) and 0.2/0.4 = 0.5 (below 1 - 0.2), each with A = +1 and -1.
    new = torch.tensor([[logp(0.5), logp(0.2)], [logp(0.5), logp(0.2)]])
    old = torch.full((2, 2), logp(0.4))
    advantages = torch.tensor([1.0, -1.0])
    terms = token_loss(new, old, None, advantages, clip_low=0.2, clip_high=0.2, beta=0.0)
    # A=+1: -min(1.25, 1.2) = -1.2 (clipped); -min(0.5, 0.8) = -0.5.
    # A=-1: -min(-1.25, -1.2) = 1.25; -min(-0.5, -0.8) = 0.8 (clipped).
    torch.testing.assert_close(terms.loss, torch.tensor([[-1.2, -0.5], [1.25, 0.8]]))
    assert terms.clipped.tolist() == [[True, False], [False, True]]
    torch.testing.assert_close(terms.ratio, torch.tensor([[1.25, 0.5], [1.25, 0.5]]))
    assert terms.kl.abs().sum() == 0  # beta = 0: no reference, no KL


def test_clip_higher_widens_the_upper_bound_only():
    new = torch.tensor([[logp(0.5)]])
    old = torch.tensor([[logp(0.4)]])
    terms = token_loss(new, old, None, torch.tensor([1.0]), clip_low=0.2, clip_high=0.28, beta=0.0)
    torch.testing.assert_close(terms.loss, torch.tensor([[-1.25]]))  # 1.25 < 1.28: not clipped
    assert not terms.clipped.any()


def test_ratio_one_gives_the_plain_policy_gradient():
    new = torch.tensor([[logp(0.3), logp(0.6)]], requires_grad=True)
    terms = token_loss(new, new.detach(), None, torch.tensor([2.0]), clip_low=0.2, clip_high=0.2, beta=0.0)
    terms.loss.sum().backward()
    # d/dp of -(exp(p - p_old) A) at p = p_old is -A.
    torch.testing.assert_close(new.grad, torch.tensor([[-2.0, -2.0]]))


# ---------------------------------------------------------------- truncated importance sampling


def test_truncated_is_weights_by_hand():
    # π_old / π_rollout: 0.5/0.25 = 2, 0.3/0.1 = 3 (capped at 2.5), 0.2/0.4 = 0.5 (never raised).
    old = torch.tensor([[logp(0.5), logp(0.3), logp(0.2)]])
    rollout = torch.tensor([[logp(0.25), logp(0.1), logp(0.4)]])
    torch.testing.assert_close(truncated_is_weights(old, rollout, cap=2.5), torch.tensor([[2.0, 2.5, 0.5]]))


def test_is_weights_scale_the_policy_gradient_but_not_the_kl():
    new = torch.tensor([[logp(0.3), logp(0.6)]], requires_grad=True)
    ref = torch.tensor([[logp(0.3), logp(0.3)]])
    weights = torch.tensor([[2.0, 0.5]])
    plain = token_loss(new, new.detach(), ref, torch.tensor([1.0]), clip_low=0.2, clip_high=0.2, beta=0.04)
    weighted = token_loss(new, new.detach(), ref, torch.tensor([1.0]), clip_low=0.2, clip_high=0.2, beta=0.04,
                          is_weights=weights)
    torch.testing.assert_close(weighted.loss - weighted.kl * 0.04, (plain.loss - plain.kl * 0.04) * weights)
    weighted.loss.sum().backward()
    kl_grad = torch.tensor([[0.0, 0.04 * (1 - 0.3 / 0.6)]])  # d/dp of β (e^(q-p) - (q-p) - 1) = β (1 - e^(q-p))
    torch.testing.assert_close(new.grad, -weights + kl_grad)  # the IS weight carries no gradient


def test_rollout_mismatch_by_hand():
    old = torch.tensor([[logp(0.5), logp(0.3), logp(0.2), logp(0.9)]])
    rollout = torch.tensor([[logp(0.25), logp(0.1), logp(0.2), logp(0.1)]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])  # the last token is padding
    sums = rollout_mismatch(old, rollout, mask, cap=2.5)
    assert sums["gap"] == pytest.approx(math.log(2) + math.log(3))
    assert sums["mismatch_k3"] == pytest.approx((2 - 1 - math.log(2)) + (3 - 1 - math.log(3)))
    assert sums["is_clipped"] == 1  # only 3 > 2.5
    assert rollout_mismatch(old, old, mask, cap=None) == {"gap": 0.0, "mismatch_k3": 0.0, "is_clipped": 0.0}


def test_k3_kl_by_hand():
    new = torch.tensor([[logp(0.5), logp(0.25)]])
    ref = torch.tensor([[logp(0.25), logp(0.25)]])
    terms = token_loss(new, new, ref, torch.tensor([0.0]), clip_low=0.2, clip_high=0.2, beta=0.04)
    # exp(q - p) - (q - p) - 1 with q - p = log(0.5): 0.5 - log(0.5) - 1; zero where the policies agree.
    k3 = 0.5 - math.log(0.5) - 1
    torch.testing.assert_close(terms.kl, torch.tensor([[k3, 0.0]]))
    torch.testing.assert_close(terms.loss, torch.tensor([[0.04 * k3, 0.0]]))  # A = 0: only the KL term
    with pytest.raises(ValueError, match="reference"):
        token_loss(new, new, None, torch.tensor([0.0]), clip_low=0.2, clip_high=0.2, beta=0.04)


# ---------------------------------------------------------------- aggregation

LOSS = torch.tensor([[1.0, 3.0, 0.0, 0.0], [2.0, 2.0, 2.0, 6.0]])  # completion 1 has 2 tokens, completion 2 has 4
MASK = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])


@pytest.mark.parametrize(
    ("aggregation", "expected"),
    [
        ("grpo", ((1 + 3) / 2 + (2 + 2 + 2 + 6) / 4) / 2),  # mean of per-completion means = (2 + 3) / 2
        ("dapo", (1 + 3 + 2 + 2 + 2 + 6) / 6),  # token mean over the batch
        ("dr_grpo", (1 + 3 + 2 + 2 + 2 + 6) / (2 * 8)),  # constant normaliser: B × max_new_tokens (8)
    ],
)
def test_aggregations_by_hand(aggregation, expected):
    weights = torch.tensor(sequence_weights(np.array([2, 4]), aggregation, max_new_tokens=8))
    assert float(aggregate(LOSS, MASK, weights)) == pytest.approx(expected)


def test_unknown_aggregation_is_an_error():
    with pytest.raises(ValueError, match="unknown loss aggregation 'mean'"):
        sequence_weights(np.array([3]), "mean", max_new_tokens=8)


# ---------------------------------------------------------------- rewards

COMPLETIONS = [
    "<think>brows raised, mouth open</think><answer>surprise</answer>",  # right, well formed
    "<think>lips pressed</think> <answer> Angry. </answer>",  # right by synonym, well formed
    "<answer>fear</answer>",  # wrong answer, no think block
    "<think>a</think><answer>happiness</answer> and more",  # right answer, trailing text breaks the format
    "",
]
ANSWERS = ["surprise", "anger", "sadness", "happiness", "neutral"]


def test_accuracy_and_format_rewards():
    solutions = [f"<answer>{a}</answer>" for a in ANSWERS]
    assert accuracy_reward(COMPLETIONS, solutions, answers=ANSWERS) == [1.0, 1.0, 0.0, 1.0, 0.0]
    assert format_reward(COMPLETIONS, solutions) == [1.0, 1.0, 0.0, 0.0, 0.0]


def items(answers: list[str]) -> list[dict]:
    return [{"id": f"i{k}", "answer": a, "solution": f"<answer>{a}</answer>", "problem": "q", "task": "mc",
             "dataset": "rafdb"} for k, a in enumerate(answers)]


def short_answer(completions, solutions, **_):
    """A custom reward for the test: 1 for completions under 30 characters."""
    return [float(len(c) < 30) for c in completions]


def test_reward_set_weights_and_custom_functions():
    specs = [RewardSpec(name="accuracy", weight=2.0), RewardSpec(name="format", weight=0.5),
             RewardSpec(name="short", function=f"{__name__}:short_answer")]
    total, per_function = RewardSet(specs).score(COMPLETIONS, items(ANSWERS))
    assert per_function["short"].tolist() == [0.0, 0.0, 1.0, 0.0, 1.0]
    np.testing.assert_allclose(total, 2 * np.array([1, 1, 0, 1, 0]) + 0.5 * np.array([1, 1, 0, 0, 0])
                               + np.array([0, 0, 1, 0, 1]))


def wrong_length(completions, solutions, **_):
    return [1.0]


def not_finite(completions, solutions, **_):
    return [float("nan")] * len(completions)


@pytest.mark.parametrize(("function", "message"), [
    (f"{__name__}:wrong_length", "returned 1 scores for 5 completions"),
    (f"{__name__}:not_finite", "not a finite number"),
])
def test_bad_reward_output_is_a_clear_error(function, message):
    with pytest.raises(ValueError, match=message):
        RewardSet([RewardSpec(name="custom", function=function)]).score(COMPLETIONS, items(ANSWERS))


@pytest.mark.parametrize(("function", "message"), [
    ("nope", "unknown reward function 'nope'; expected one of accuracy, format"),
    ("no_such_module_xyz:f", "cannot be loaded"),
    (f"{__name__}:no_such_function", "cannot be loaded"),
    (f"{__name__}:REPO", "not callable"),
])
def test_unloadable_reward_names_the_function(function, message):
    with pytest.raises(ValueError, match=message):
        load_reward(function)


def test_a_steps_record_has_the_accuracy_of_each_task_type():
    """Three prompts of two samples: mc right once of two, binary twice of two, an item without a task never."""
    answers = ["happiness", "yes", "anger"]
    prompts = [item | {"image_uri": "/i.jpg", "task": task}
               for item, task in zip(items(answers), ["mc", "binary", ""])]
    texts = [["<think>t</think><answer>happiness</answer>", "<answer>sadness</answer>"],
             ["<answer>yes</answer>", "<think>t</think><answer>yes</answer>"],
             ["<answer>fear</answer>", ""]]
    completions = [[Completion(text=t, token_ids=[1] * (1 + len(t) // 8), logprobs=None, finish_reason="stop")
                    for t in group] for group in texts]
    config = parse_config(minimal(grpo={"group_size": 2, "prompts_per_step": 3}), RLVRConfig)
    record = score(Rollout(prompts, completions, [0, 0, 0], [], generate_s=0.0, wait_s=0.0), RewardSet(config.rewards),
                   config, learner_version=0, step=1).record
    assert record["accuracy"] == pytest.approx(3 / 6)
    assert {k: v for k, v in record.items() if k.startswith("accuracy/")} == {
        "accuracy/mc": 0.5, "accuracy/binary": 1.0, "accuracy/untyped": 0.0}


def test_a_steps_record_times_and_counts_the_step():
    rows = [TrainRow(image_uri="/i.png", problem="?", completion_ids=[1] * n, advantage=0.0, weight=1.0)
            for n in (3, 5)]
    rollout = Rollout([{}], [[]], [0], [{"error": "bad image"}], generate_s=2.0, wait_s=0.5)
    stats = {"kl": 0.1, "train_tokens": 8.0, "time_logprob_s": 1.0, "time_train_s": 4.0}
    record = step_record(RunState(step=3, version=3, epoch=1), rollout, ScoredBatch(rows, {"accuracy": 0.5}, []),
                         stats, {"sync_s": 0.25}, step_s=7.0, replacements=1, rollout_dtype="float32")
    assert record == {"step": 3, "epoch": 1, "policy_version": 3, "accuracy": 0.5, "kl": 0.1, "train_tokens": 8.0,
                      "time/generate_s": 2.0, "time/generate_wait_s": 0.5, "time/logprob_s": 1.0,
                      "time/train_s": 4.0, "time/sync_s": 0.25, "time/step_s": 7.0, "tokens_per_s/generate": 4.0,
                      "tokens_per_s/train": 2.0, "rollout_replacements": 1, "prompt_errors": 1,
                      "rollout_dtype": "float32"}
    assert "time_train_s" in stats  # the learners' statistics are left as they came


# ---------------------------------------------------------------- fillers: every rank runs every collective


def train_rows(n: int) -> list[TrainRow]:
    return [TrainRow(image_uri=f"/{i}.png", problem="?", completion_ids=[i], advantage=1.0, weight=1.0)
            for i in range(n)]


def test_a_ranks_rows_spread_evenly_over_its_micro_batches_and_an_empty_one_replays_a_row_at_weight_zero():
    rows = train_rows(5)
    assert micro_batches(rows, 4, 2, TrainRow.filler) == [rows[:3], rows[3:]]  # not 4 + 1: a step costs its rows
    rows = train_rows(3)
    chunks = micro_batches(rows, 2, 4, TrainRow.filler)
    assert chunks[:3] == [[row] for row in rows]
    assert chunks[3] == [TrainRow.filler(rows[0])] and chunks[3][0].weight == 0.0
    with pytest.raises(ValueError, match="5 rows do not make 1 to 2 micro-batches of 2"):
        micro_batches(train_rows(5), 2, 2, TrainRow.filler)
    with pytest.raises(ValueError, match="0 rows do not make"):
        micro_batches([], 2, 2, TrainRow.filler)


@pytest.mark.parametrize("n, world", [(7, 3), (6, 3), (2, 4), (1, 1)])
def test_rank_shares_are_contiguous_and_a_rank_without_rows_gets_a_filler(n, world):
    rows = train_rows(n)
    shares = rank_shares(rows, world, TrainRow.filler)
    expected = [list(share) for share in np.array_split(np.arange(n), world)]  # the first shares a row longer
    assert [[r.completion_ids[0] for r in share if r.weight] for share in shares] == expected
    assert all(share == [TrainRow.filler(rows[0])] for share, ids in zip(shares, expected) if not ids)


# ---------------------------------------------------------------- prompt orders


def answer_counts_per_step(order: np.ndarray, answers: list[str], step: int) -> list[dict[str, int]]:
    return [{a: sum(answers[i] == a for i in order[k:k + step]) for a in set(answers)}
            for k in range(0, len(order) - step + 1, step)]


def test_by_answer_gives_every_step_the_labels_in_their_share_and_a_shuffle_does_not():
    answers = ["fear"] * 60 + ["happy"] * 30 + ["sad"] * 10
    items = [{"id": str(i), "answer": a} for i, a in enumerate(answers)]
    share = {"fear": 6, "happy": 3, "sad": 1}  # of every 10 prompts
    order = ORDERS["by_answer"](items, np.random.default_rng([0, 0]))
    assert sorted(order.tolist()) == list(range(100))
    assert all(abs(counts[a] - share[a]) <= 1 for counts in answer_counts_per_step(order, answers, 10) for a in share)
    shuffled = ORDERS["shuffled"](items, np.random.default_rng([0, 0]))
    assert any(abs(counts[a] - share[a]) > 1 for counts in answer_counts_per_step(shuffled, answers, 10) for a in share)
    assert order.tolist() == ORDERS["by_answer"](items, np.random.default_rng([0, 0])).tolist()
    assert order.tolist() != ORDERS["by_answer"](items, np.random.default_rng([0, 1])).tolist()  # a new epoch's order
    assert ORDERS["id"](items, np.random.default_rng(0)).tolist() == list(range(100))


# ---------------------------------------------------------------- configs


def test_paper_config_validates():
    config = load_config(REPO / "configs" / "qwen2_5_vl_7b.yaml", RLVRConfig, section="rlvr")
    assert config.grpo.group_size == 8 and config.grpo.beta == 0.04 and config.grpo.temperature == 1.0
    assert config.learner.optimizer.lr == 1e-6 and config.grpo.max_new_tokens == 1024
    assert config.grpo.max_prompt_tokens == 4096
    assert [r.name for r in config.rewards] == ["accuracy", "format"] and {r.weight for r in config.rewards} == {1.0}
    assert config.learner.num_workers == 7 and config.learner.use_gpu and config.learner.strategy == "deepspeed"
    assert config.rollout.num_workers == 1 and config.rollout.engine.engine == "vllm"
    assert config.sync.kind == "nccl"


def test_paper_config_larger_layout_validates():
    config = load_config(REPO / "configs" / "qwen2_5_vl_7b.yaml", RLVRConfig, section="rlvr_large")
    assert config.rollout.num_workers > 1 and config.rollout.num_gpus == 2


def minimal(**changes) -> dict:
    return {"model": "/m", "data": {"paths": ["/d.jsonl"]}, "output_dir": "/o", "checkpoint_dir": "/c", "steps": 2,
            "rollout": {"engine": {"engine": "hf"}}} | changes


def test_config_errors_name_the_field():
    defaults = parse_config(minimal(), RLVRConfig)  # the paper's GRPO settings are the defaults
    assert (defaults.grpo.group_size, defaults.grpo.beta, defaults.grpo.aggregation) == (8, 0.04, "grpo")
    assert [r.name for r in defaults.rewards] == ["accuracy", "format"] and defaults.sync.kind == "object_store"
    cases = [
        (minimal(grpo={"group_size": 1}), "grpo.group_size"),
        (minimal(grpo={"aggregation": "mean"}), "grpo.aggregation"),
        (minimal(grpo={"advantage": "ppo"}), "grpo.advantage"),
        (minimal(data={"paths": ["/d.jsonl"], "order": "random"}), "data.order.*unknown prompt order 'random'; "
                                                                     "expected one of shuffled, by_answer, id"),
        (minimal(checkpoint_dir="s3://bucket/c"), "log_dir"),
        (minimal(rewards=[{"name": "a"}, {"name": "a"}]), "unique"),
        (minimal(sync={"kind": "nccl"}), "nccl"),
        (minimal(data={"paths": ["/d.jsonl"], "max_items": 4}), "data.max_items 4 is fewer than grpo.prompts_per_step"),
        (minimal(learner={"precision": "bf16"}), "bf16 needs use_gpu"),
        (minimal(rollout={"engine": {"engine": "openai"}}), "rollout.engine.engine"),
        (minimal(rollout={"engine": {"model": "/other"}}), "rollout.engine.model"),
        (minimal(unknown=1), "unknown"),
    ]
    for data, field in cases:
        with pytest.raises(ConfigError, match=field):
            parse_config(data, RLVRConfig, source="test.yaml")
