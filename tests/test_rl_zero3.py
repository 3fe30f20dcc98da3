"""Learners under DeepSpeed ZeRO-3 on CPU (gloo, 2 Ray actors, the real tiny model): the policy is built partitioned,
the KL reference is sharded like it, and its log-probabilities are those of the whole reference model."""

from __future__ import annotations

import math

import pytest
import ray
import torch
from test_rl_system import rl_config

from unifer_ray.config import parse_config
from unifer_ray.models.loading import load_model_and_processor
from unifer_ray.rl.config import RLVRConfig
from unifer_ray.rl.learner import LearnerGroup, TrainRow, completion_logprobs, policy_batch
from unifer_ray.rl.prompts import PromptSource

WORLD = 2


@pytest.fixture(scope="module")
def zero3(ray_cluster, tmp_path_factory, tiny_model_dir, synthetic_root):
    tmp = tmp_path_factory.mktemp("zero3")
    config = parse_config(rl_config(tmp, tiny_model_dir, synthetic_root,
                                    learner={"num_workers": WORLD, "num_cpus": 0.5, "strategy": "deepspeed",
                                             "zero_stage": 3, "micro_batch_size": 2},
                                    grpo={"group_size": 2, "beta": 0.04}), RLVRConfig)
    learners = LearnerGroup(config, str(tiny_model_dir))
    yield config, learners
    learners.shutdown()


def rows(config: RLVRConfig, tokenizer) -> list[TrainRow]:
    items = PromptSource(config.data, prompts_per_step=config.grpo.prompts_per_step, seed=0).batch(0)
    completions = ["<think>a smile</think><answer>happy</answer>", "<answer>sad</answer>"]
    return [TrainRow(image_uri=item["image_uri"], problem=item["problem"], advantage=sign, weight=0.25,
                     completion_ids=tokenizer.encode(text, add_special_tokens=False))
            for item in items for text, sign in zip(completions, (1.0, -1.0))]


def test_the_policy_is_loaded_partitioned_and_the_reference_is_sharded(zero3, tiny_model_dir):
    config, learners = zero3
    _, processor = load_model_and_processor(tiny_model_dir)
    batch_rows = rows(config, processor.tokenizer)

    first, second = learners.train(batch_rows), learners.train(batch_rows)
    assert first["kl"] == pytest.approx(0.0, abs=1e-7)  # the policy starts as the reference
    assert second["kl"] > 1e-6 and math.isfinite(second["grad_norm"]) and first["grad_norm"] > 0

    # Run inside the actors: nested, so that Ray pickles them by value (the test module is not importable there).
    def partitioned(model: torch.nn.Module) -> list[bool]:
        """Per parameter: this rank holds its 1/WORLD partition (ZeRO-3's ds_tensor)."""
        return [p.ds_tensor.numel() == math.ceil(p.ds_numel / WORLD) for p in model.parameters()]

    def load_policy(worker):
        from unifer_ray.parallel import load_trainable

        model, _ = load_trainable(worker.model_dir, worker.parallel.settings, worker.device)
        # Straight out of the loader, before deepspeed.initialize: no parameter is held whole.
        return partitioned(model), [p.numel() for p in model.parameters()]

    for held, sizes in ray.get([w.__ray_call__.remote(load_policy) for w in learners.workers]):
        assert all(held) and sum(sizes) == 0

    def reference(worker, rows):
        batch = policy_batch(worker.processor, rows, image_size=worker.image_size, device=worker.device)
        with torch.no_grad():  # every rank runs the same forward pass: ZeRO-3 gathers collectively
            logprobs, _ = completion_logprobs(worker.reference, batch, config.grpo.temperature)
        # After the forward pass only small (persistent) parameters stay gathered.
        largest = max(worker.reference.module.parameters(), key=lambda p: p.ds_numel)
        return partitioned(worker.reference.module), largest.numel(), logprobs

    results = ray.get([w.__ray_call__.remote(reference, batch_rows) for w in learners.workers])
    full, _ = load_model_and_processor(tiny_model_dir)
    batch = policy_batch(processor, batch_rows, image_size=config.data.image_size, device=torch.device("cpu"))
    with torch.no_grad():
        expected, _ = completion_logprobs(full, batch, config.grpo.temperature)
    for held, largest, logprobs in results:
        assert all(held) and largest == 0
        torch.testing.assert_close(logprobs * batch.mask, expected * batch.mask, rtol=1e-5, atol=1e-5)
