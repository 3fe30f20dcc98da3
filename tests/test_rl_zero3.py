"""Learners under DeepSpeed ZeRO-3 on CPU (gloo, 2 Ray actors, the real tiny model): the policy is built partitioned,
the KL reference is sharded like it, and its log-probabilities are those of the whole reference model."""

from __future__ import annotations

import math
import posixpath

import pytest
import ray
import torch

from tests.helpers import needs_vllm, rl_config
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
                                             "zero_stage": 3, "micro_batch_size": 2,
                                             "placement_strategy": "STRICT_PACK"},
                                    # a group timeout (400 + 900 + 600 s) unlike gloo's default (1800 s)
                                    rollout={"sync_timeout_s": 400},
                                    grpo={"group_size": 2, "beta": 0.04}), RLVRConfig)
    learners = LearnerGroup(config, str(tiny_model_dir))
    learners.wait_ready()
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
        from unifer_ray.optim import OptimizerConfig, build_optimizer
        from unifer_ray.parallel import load_trainable

        model, _ = load_trainable(worker.model_dir, worker.parallel.settings, worker.device)
        # Weight decay by the parameters' real shapes, not their partitions' 1-D placeholders.
        optimizer, _ = build_optimizer(model, OptimizerConfig(weight_decay=0.1), total_steps=1)
        decayed = sum(p.ds_numel for g in optimizer.param_groups if g["weight_decay"] for p in g["params"])
        # Straight out of the loader, before deepspeed.initialize: no parameter is held whole.
        return partitioned(model), [p.numel() for p in model.parameters()], decayed

    full, _ = load_model_and_processor(tiny_model_dir)
    matrices = sum(p.numel() for p in full.parameters() if p.ndim >= 2)
    for held, sizes, decayed in ray.get([w.__ray_call__.remote(load_policy) for w in learners.workers]):
        assert all(held) and sum(sizes) == 0
        assert decayed == matrices > 0

    def reference(worker, rows):
        batch = policy_batch(worker.processor, rows, image_size=worker.image_size, device=worker.device)
        with torch.no_grad():  # every rank runs the same forward pass: ZeRO-3 gathers collectively
            logprobs, _ = completion_logprobs(worker.reference, batch, config.grpo.temperature)
        # After the forward pass only small (persistent) parameters stay gathered.
        largest = max(worker.reference.module.parameters(), key=lambda p: p.ds_numel)
        return partitioned(worker.reference.module), largest.numel(), logprobs

    results = ray.get([w.__ray_call__.remote(reference, batch_rows) for w in learners.workers])
    batch = policy_batch(processor, batch_rows, image_size=config.data.image_size, device=torch.device("cpu"))
    with torch.no_grad():
        expected, _ = completion_logprobs(full, batch, config.grpo.temperature)
    for held, largest, logprobs in results:
        assert all(held) and largest == 0
        torch.testing.assert_close(logprobs * batch.mask, expected * batch.mask, rtol=1e-5, atol=1e-5)


def test_a_resuming_rank_downloads_only_its_own_partition_from_s3(zero3, s3_server):
    """Under ZeRO-3 each rank saves its own partition (parameters and optimizer states); resuming from S3 each rank
    fetches those and the shared files only, and gets back exactly the state it saved."""
    from unifer_ray import storage
    from unifer_ray.rl.checkpoint import rank_files

    _, learners = zero3
    uri = f"{s3_server}/zero3-resume/learner"

    def state(worker) -> dict[str, torch.Tensor]:  # collective: every rank gathers, rank 0 keeps
        return worker.parallel.trainable_state()

    def record_downloads(worker) -> None:  # inside the actor: every file its checkpoint reads copy
        from unifer_ray import storage

        worker.downloads, worker.copy_file = [], storage.copy_file

        def counted(source, target):
            worker.downloads.append(str(source))
            worker.copy_file(source, target)

        storage.copy_file = counted

    def downloads(worker) -> list[str]:
        from unifer_ray import storage

        storage.copy_file = worker.copy_file
        return worker.downloads

    saved = ray.get([w.__ray_call__.remote(state) for w in learners.workers])[0]
    learners.save(uri)
    names = [posixpath.relpath(f, uri) for f in storage.list_files(uri)]
    own = {rank: set(rank_files(names, rank)) for rank in range(WORLD)}
    for rank in range(WORLD):
        assert any(f"zero_pp_rank_{rank}_" in name and "optim_states" in name for name in own[rank])
        assert f"rng_rank{rank}.pt" in own[rank]
        others = {name for name in names if f"zero_pp_rank_{1 - rank}_" in name or f"rng_rank{1 - rank}" in name}
        assert others and not others & own[rank]
    assert own[0] & own[1]  # what every rank reads

    learners.train(rows(zero3[0], load_model_and_processor(zero3[0].model)[1].tokenizer))  # the weights move on
    ray.get([w.__ray_call__.remote(record_downloads) for w in learners.workers])
    learners.load(uri)
    fetched = ray.get([w.__ray_call__.remote(downloads) for w in learners.workers])
    for rank in range(WORLD):  # each rank downloaded exactly its own files and the shared ones
        assert sorted(posixpath.relpath(f, uri) for f in fetched[rank]) == sorted(own[rank])
    restored = ray.get([w.__ray_call__.remote(state) for w in learners.workers])[0]
    assert restored.keys() == saved.keys()
    for name, tensor in saved.items():
        torch.testing.assert_close(restored[name], tensor, rtol=0, atol=0)


def test_the_learners_share_one_placement_group_and_their_gathers_outwait_a_weight_update(zero3):
    """The ranks sit in one placement group of the configured strategy (never split over whatever nodes are up), and
    the group that ZeRO-3's gathers use (which the other ranks sit in while rank 0 waits for the engines) has the
    learners' timeout, above the controller's longest wait for an update, not torch's default."""
    from unifer_ray.rl.learner import group_timeout_s

    config, learners = zero3
    table = ray.util.placement_group_table(learners.placement_group)
    assert table["strategy"] == "STRICT_PACK" and len(table["bundles"]) == WORLD

    def where_and_timeouts(worker) -> tuple[str, list[float]]:
        groups = {id(p.ds_process_group): p.ds_process_group for p in worker.parallel.module.parameters()}
        timeouts = [g._get_backend(torch.device("cpu")).options._timeout.total_seconds() for g in groups.values()]
        return ray.get_runtime_context().get_placement_group_id(), timeouts

    for group_id, timeouts in ray.get([w.__ray_call__.remote(where_and_timeouts) for w in learners.workers]):
        assert group_id == learners.placement_group.id.hex()
        assert timeouts == [group_timeout_s(config)] != [1800.0]
    assert group_timeout_s(config) > config.rollout.update_timeout_s


@needs_vllm
def test_a_sender_that_fails_before_its_broadcast_still_joins_the_other_ranks_gathers(zero3):
    """NCCL sync under ZeRO-3 (vLLM's trainer engine on every rank, the sender without its NCCL endpoint, which needs
    CUDA). The other rank gathers every parameter of a send in step with the sender; a sender that raises before its
    first gather must still join them, or that rank waits in a collective until the group's timeout kills it (last
    in this module for that reason). Twice: an engine that died before the update began (vLLM's sender raises at
    `start_weight_update`), and a send on an aborted group."""
    from tests.stand_ins import EngineStandIn

    _, learners = zero3
    engine = ray.remote(num_cpus=0, max_restarts=0)(EngineStandIn).remote("wait")
    ray.kill(engine)  # a rollout node lost between the generation and the sync

    def arm(worker, engines) -> None:
        from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo, NCCLTrainerWeightTransferEngine

        from unifer_ray.rl.vllm_transfer import RolloutClient, TrainableSource

        worker.transfer_client = RolloutClient(engines, 1, timeout_s=60, abort=worker.abort_weight_transfer)
        worker.transfer_source = TrainableSource(worker.parallel, None)
        if worker.rank == 0:
            worker.transfer = NCCLTrainerWeightTransferEngine(client=worker.transfer_client,
                                                              source=worker.transfer_source)
        else:
            info = NCCLTrainerInitInfo(master_address="127.0.0.1", master_port=0, world_size=2, rank=worker.rank)
            worker.transfer = WeightTransferTrainerFactory.trainer_init(info, client=worker.transfer_client,
                                                                         source=worker.transfer_source)

    ray.get([w.__ray_call__.remote(arm, [engine]) for w in learners.workers])
    sender, other = (w.send_weights.remote(1) for w in learners.workers)
    with pytest.raises(ray.exceptions.RayTaskError) as failed:
        ray.get(sender, timeout=120)
    assert isinstance(failed.value.cause, ray.exceptions.RayActorError)
    ray.get(other, timeout=120)  # rank 1's gathers all found rank 0's

    def disable(worker) -> None:
        """Rank 0's communicator in PyNccl's `disabled` state, as destroy() (the abort) leaves it: its broadcasts
        would return at once and send nothing (a one-member group is disabled from the start)."""
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
        from vllm.distributed.utils import StatelessProcessGroup

        from unifer_ray.rl.learner import free_port

        if worker.rank == 0:
            group = StatelessProcessGroup.create("127.0.0.1", free_port(), rank=0, world_size=1)
            worker.transfer.model_update_group = PyNcclCommunicator(group, device="cpu")
            assert worker.transfer.model_update_group.disabled

    ray.get([w.__ray_call__.remote(disable) for w in learners.workers])
    sender, other = (w.send_weights.remote(2) for w in learners.workers)
    with pytest.raises(ray.exceptions.RayTaskError, match="weight-transfer group was aborted"):
        ray.get(sender, timeout=120)  # a send on an aborted group is refused, not silently empty
    ray.get(other, timeout=120)
    full = ray.get([w.trainable_state.remote() for w in learners.workers], timeout=120)[0]  # still in step
    assert full and all(torch.isfinite(t).all() for t in full.values())
