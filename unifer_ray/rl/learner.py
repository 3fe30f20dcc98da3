"""Learner actors: M Ray actors in one torch.distributed group compute log-probabilities and take GRPO steps.

A sample reaches a learner as the rollout produced it: the prompt (image URI + problem text) and the completion's
token ids. The learner rebuilds the prompt exactly as the engines build it (`chat_text`, left padding) and appends
the sampled ids, so the log-probabilities are those of the tokens that were sampled, not of a re-tokenised text.
"""

from __future__ import annotations

import math
import os
import time
import uuid
from dataclasses import dataclass, replace
from datetime import timedelta
from functools import partial
from typing import Any

import numpy as np
import ray
import torch
import torch.distributed as dist
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from unifer_ray import placement
from unifer_ray.data.images import load_image
from unifer_ray.engines.base import ChatRequest, SamplingParams
from unifer_ray.engines.hf import HFEngine, chat_text
from unifer_ray.models.loading import load_model_and_processor
from unifer_ray.models.model_dir import local_model_dir
from unifer_ray.parallel import (
    DataParallel,
    load_reference,
    load_trainable,
    micro_batches,
    prepare_model,
    rank_shares,
    seed_everything,
)
from unifer_ray.ray_runtime import THREAD_ENV, free_port
from unifer_ray.rl.checkpoint import readable_dir, writable_dir
from unifer_ray.rl.config import GRPOConfig, LearnerConfig, RLVRConfig
from unifer_ray.rl.grpo import TokenLoss, aggregate, rollout_mismatch, token_loss, truncated_is_weights
from unifer_ray.rl.logprobs import token_logprobs
from unifer_ray.rl.transfer_names import file_format

# Sums each learner returns from `train`; the group adds them up over ranks.
SUMS = ("tokens", "kl", "entropy", "clipped", "loss", "gap", "mismatch_k3", "is_clipped", "gap_tokens")
# How much longer than the controller's longest wait for a weight update a learner may sit in a collective.
GROUP_TIMEOUT_MARGIN_S = 600


@dataclass(frozen=True)
class TrainRow:
    """One completion as the controller sends it to a learner."""

    image_uri: str
    problem: str
    completion_ids: list[int]  # the sampled tokens
    advantage: float
    weight: float  # the completion's weight in the batch loss (rl/grpo.py sequence_weights); 0 for fillers
    rollout_logprobs: list[float] | None = None  # what the rollout engine reported for completion_ids

    def filler(self) -> TrainRow:
        """This row at weight 0: replayed where a rank is short of rows, so that every collective meets."""
        return replace(self, weight=0.0)


@dataclass
class PolicyBatch:
    """One micro-batch: prompts left-padded, completions right-padded after them, so every completion starts at
    the same column and `logits_to_keep` covers exactly the completions."""

    inputs: dict[str, torch.Tensor]  # the model's inputs but the embeddings (see completion_logprobs)
    token_ids: torch.Tensor  # (B, P + C) the prompt and completion tokens, embedded as they are
    completion_ids: torch.Tensor  # (B, C)
    mask: torch.Tensor  # (B, C) 1.0 on completion tokens
    advantages: torch.Tensor  # (B,)
    weights: torch.Tensor  # (B,) sequence weights in the batch loss; 0 for replayed filler rows
    rollout_logprobs: torch.Tensor | None  # (B, C) what the rollout engine reported: importance weights, metrics


def policy_batch(processor: Any, rows: list[TrainRow], *, image_size: int, device: torch.device) -> PolicyBatch:
    requests = [ChatRequest.single_image(load_image(r.image_uri, image_size), r.problem) for r in rows]
    encoded = processor(text=[chat_text(processor, r) for r in requests], images=[r.images()[0] for r in requests],
                        padding=True, padding_side="left", return_tensors="pt")
    width = max(1, max(len(r.completion_ids) for r in rows))
    ids = torch.full((len(rows), width), processor.tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width))
    rollout = torch.zeros((len(rows), width))
    for i, row in enumerate(rows):
        n = len(row.completion_ids)
        ids[i, :n] = torch.tensor(row.completion_ids, dtype=torch.long)
        mask[i, :n] = 1.0
        if row.rollout_logprobs is not None:
            rollout[i, :n] = torch.tensor(row.rollout_logprobs)
    token_ids = torch.cat([encoded["input_ids"], ids], dim=1)
    # The model finds its image slots by token id. A sampled image/video placeholder is plain text to the engine that
    # sampled it: it is embedded as itself, but blanked in the ids the model searches for slots.
    placeholders = torch.isin(ids, torch.tensor([processor.image_token_id, processor.video_token_id])) & mask.bool()
    inputs = dict(encoded)
    blanked = ids.masked_fill(placeholders, processor.tokenizer.pad_token_id)
    inputs["input_ids"] = torch.cat([encoded["input_ids"], blanked], dim=1)
    inputs["attention_mask"] = torch.cat([encoded["attention_mask"], mask.long()], dim=1)
    if "mm_token_type_ids" in encoded:  # completion tokens are text
        inputs["mm_token_type_ids"] = torch.cat([encoded["mm_token_type_ids"], torch.zeros_like(ids)], dim=1)
    has_rollout = all(r.rollout_logprobs is not None for r in rows)
    return PolicyBatch(
        inputs={k: v.to(device) for k, v in inputs.items()},
        token_ids=token_ids.to(device),
        completion_ids=ids.to(device),
        mask=mask.to(device),
        advantages=torch.tensor([r.advantage for r in rows], dtype=torch.float32, device=device),
        weights=torch.tensor([r.weight for r in rows], dtype=torch.float32, device=device),
        rollout_logprobs=rollout.to(device) if has_rollout else None,
    )


def completion_logprobs(model: Any, batch: PolicyBatch, temperature: float, *,
                        with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probabilities (B, C) of the completion tokens under softmax(logits / temperature), as sampled; and the
    per-token entropy of that distribution (no gradient) when asked."""
    width = batch.completion_ids.shape[1]
    # Embedded here (every rank, every batch alike: under ZeRO-3 each module call is a collective).
    embeddings = getattr(model, "module", model).get_input_embeddings()(batch.token_ids)
    outputs = model(**batch.inputs, inputs_embeds=embeddings, use_cache=False, logits_to_keep=width + 1)
    # Chunked: no full-vocabulary fp32 log-softmax of the whole micro-batch (see rl/logprobs.py).
    return token_logprobs(outputs.logits[:, :-1], batch.completion_ids, temperature, with_entropy=with_entropy)


def micro_batch_loss(model: Any, *, batch: PolicyBatch, grpo: GRPOConfig, old_logprobs: torch.Tensor | None,
                     ref_logprobs: torch.Tensor | None) -> tuple[torch.Tensor, tuple]:
    """One micro-batch's share of the GRPO batch loss under `model` (DataParallel.micro_step's `loss_fn`); and what
    its statistics need: π_old's log-probabilities (π's own, detached, when `old_logprobs` is None), the entropy and
    the loss terms."""
    logprobs, entropy = completion_logprobs(model, batch, grpo.temperature, with_entropy=True)
    old = old_logprobs if old_logprobs is not None else logprobs.detach()
    is_weights = None
    if grpo.rollout_is_cap is not None and batch.rollout_logprobs is not None:
        is_weights = truncated_is_weights(old, batch.rollout_logprobs, grpo.rollout_is_cap)
    terms = token_loss(logprobs, old, ref_logprobs, batch.advantages, clip_low=grpo.clip_eps,
                       clip_high=grpo.clip_high, beta=grpo.beta, is_weights=is_weights)
    return aggregate(terms.loss, batch.mask, batch.weights), (old, entropy, terms)


def add_sums(sums: dict[str, float], batch: PolicyBatch, old: torch.Tensor, entropy: torch.Tensor, terms: TokenLoss, *,
             is_cap: float | None, mismatch: bool) -> None:
    """Add a micro-batch's statistics to `sums` (SUMS), over its real tokens only; with `mismatch` (a step's first
    update), also the rollout-vs-learner gap."""
    real = batch.mask * (batch.weights > 0).float().unsqueeze(1)  # fillers count in no statistic
    sums["tokens"] += float(real.sum())
    sums["kl"] += float((terms.kl.detach() * real).sum())
    sums["entropy"] += float((entropy * real).sum())
    sums["clipped"] += float((terms.clipped.float() * real).sum())
    sums["loss"] += float(aggregate(terms.loss.detach(), batch.mask, batch.weights))
    if mismatch and batch.rollout_logprobs is not None:
        for key, value in rollout_mismatch(old, batch.rollout_logprobs, real, is_cap).items():
            sums[key] += value
        sums["gap_tokens"] += float(real.sum())


def group_timeout_s(config: RLVRConfig) -> float:
    """How long a learner may wait in a collective of its group (torch's default: 10 minutes for NCCL).

    Under ZeRO-3 every rank gathers the weights that rank 0 sends, and rank 0 first waits for the engines, which may
    finish a batch's generation before they take the update; in one_step_off it waits behind a long generation. The
    group's timeout stays above the controller's wait for an update, so that the controller aborts a failed sync
    before torch's watchdog kills a learner (learners are not replaceable)."""
    return config.rollout.update_timeout_s + GROUP_TIMEOUT_MARGIN_S


def join_process_group(master_addr: str, master_port: int, rank: int, world_size: int, use_gpu: bool,
                       timeout_s: float) -> torch.device:
    """Join the learners' group (NCCL on GPU, gloo on CPU); returns this learner's device.

    Ray Train sets up SFT's group; RL's learners are long-lived actors the controller calls step by step, so they
    join theirs themselves.
    """
    # DeepSpeed reads the usual launcher variables.
    os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK="0")
    device = torch.device("cuda", 0) if use_gpu else torch.device("cpu")  # Ray shows each learner its own GPU
    if use_gpu:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if use_gpu else "gloo", init_method=f"tcp://{master_addr}:{master_port}",
                            rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s))
    return device


class LearnerWorker:
    """One rank of the learner group (a Ray actor)."""

    def __init__(self, learner: dict, grpo: dict, *, model_dir: str, image_size: int, rank: int, world_size: int,
                 grad_accum_steps: int, total_steps: int, seed: int, group_timeout_s: float,
                 revision: str | None = None):
        self.config = LearnerConfig.model_validate(learner)
        self.grpo = GRPOConfig.model_validate(grpo)
        # Resolved once on this node (an s3:// copy, a hub snapshot): the policy, the reference and exports read it.
        self.model_dir = local_model_dir(model_dir, revision=revision)
        self.image_size = image_size
        self.rank, self.world_size = rank, world_size
        self.grad_accum_steps, self.total_steps = grad_accum_steps, total_steps
        self.seed = seed
        self.group_timeout_s = group_timeout_s

    def address(self) -> tuple[str, int]:
        return ray.util.get_node_ip_address(), free_port()

    def setup(self, address: tuple[str, int]) -> None:
        """Join the group at rank 0's `address` (`address()`), then load the policy, optimizer and reference."""
        if not self.config.use_gpu:
            torch.set_num_threads(self.config.torch_threads)
        self.device = join_process_group(*address, self.rank, self.world_size, self.config.use_gpu,
                                         self.group_timeout_s)
        seed_everything(self.seed + self.rank)
        settings = self.config.settings(grad_accum_steps=self.grad_accum_steps, total_steps=self.total_steps)
        model, self.processor = load_trainable(self.model_dir, settings, self.device)
        prepare_model(model, self.config)
        self.parallel = DataParallel(model, settings)
        # The frozen starting policy; with beta 0 the loss has no KL term.
        self.reference = load_reference(self.model_dir, settings, self.device) if self.grpo.beta > 0 else None

    def train(self, rows: list[TrainRow]) -> dict:
        """GRPO on this rank's rows: reference and old log-probabilities, then `updates_per_batch` optimizer steps.

        Returns this rank's sums (SUMS) and timings; rows of weight 0 are fillers and count in no statistic.
        """
        grpo = self.grpo
        chunks = micro_batches(rows, self.config.micro_batch_size, self.grad_accum_steps, TrainRow.filler)
        batches = [policy_batch(self.processor, chunk, image_size=self.image_size, device=self.device)
                   for chunk in chunks]

        started = time.perf_counter()
        ref_logprobs, old_logprobs = self._fixed_logprobs(batches)
        logprob_s = time.perf_counter() - started

        sums = dict.fromkeys(SUMS, 0.0)
        grad_norms = []
        started = time.perf_counter()
        for update in range(grpo.updates_per_batch):
            for j, batch in enumerate(batches):
                loss_fn = partial(micro_batch_loss, batch=batch, grpo=grpo, old_logprobs=old_logprobs[j],
                                  ref_logprobs=ref_logprobs[j])
                old, entropy, terms = self.parallel.micro_step(loss_fn, last=j == len(batches) - 1)
                add_sums(sums, batch, old, entropy, terms, is_cap=grpo.rollout_is_cap, mismatch=update == 0)
            grad_norms.append(self.parallel.step())
        return {"sums": sums, "grad_norm": float(np.mean(grad_norms)), "lr": self.parallel.lr(),
                "logprob_s": logprob_s, "train_s": time.perf_counter() - started}

    def _fixed_logprobs(self, batches: list[PolicyBatch]) -> tuple[list, list]:
        """Per micro-batch, the reference's and π_old's log-probabilities, which the updates keep fixed (None where
        not needed)."""
        grpo = self.grpo
        ref_logprobs = [None] * len(batches)
        old_logprobs = [None] * len(batches)
        with torch.no_grad():
            if self.reference is not None:
                ref_logprobs = [completion_logprobs(self.reference, b, grpo.temperature)[0] for b in batches]
            if grpo.updates_per_batch > 1:  # with one update π_old is π itself (ratio 1, gradient unchanged)
                old_logprobs = [completion_logprobs(self.parallel.model, b, grpo.temperature)[0] for b in batches]
        return ref_logprobs, old_logprobs

    def trainable_state(self, file_names: bool = False) -> dict[str, torch.Tensor] | None:
        """The trainable weights (rank 0; None elsewhere). Every rank is called: ZeRO-3 gathers collectively.

        `file_names`: named as in the model's files, for vLLM (see `file_format`)."""
        state = self.parallel.trainable_state()
        return file_format(self.parallel.module, state) if file_names and state is not None else state

    def init_weight_transfer(self, master_addr: str, master_port: int, world_size: int, rollouts: list,
                             ranks_per_engine: int, bucket_bytes: int, dtype: str, timeout_s: float) -> None:
        """NCCL sync through vLLM's trainer engine, on every rank: rank 0 (the sender) forms one NCCL group with every
        vLLM worker of `rollouts`; the other ranks only join the ZeRO-3 gathers of each send."""
        from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

        from unifer_ray.rl.vllm_transfer import RolloutClient, TrainableSource

        cast = {"auto": torch.bfloat16 if self.config.bf16 else None, "bfloat16": torch.bfloat16,
                "float32": torch.float32}[dtype]
        self.transfer_client = RolloutClient(rollouts, ranks_per_engine, timeout_s, abort=self.abort_weight_transfer)
        self.transfer_source = TrainableSource(self.parallel, cast)
        info = NCCLTrainerInitInfo(master_address=master_addr, master_port=master_port, world_size=world_size,
                                   packed=True, packed_buffer_size_bytes=bucket_bytes, rank=self.rank)
        self.transfer = WeightTransferTrainerFactory.trainer_init(
            info, client=self.transfer_client, source=self.transfer_source)

    def send_weights(self, version: int) -> None:
        """NCCL sync: one update of every engine (packed buckets), finished as `version`.

        An aborted communicator is `disabled`: its broadcasts return at once and send nothing. A send on one, or one
        aborted midway (the engines then hold partial weights), raises instead of finishing the engines' update."""
        group = self.transfer.model_update_group  # None on the ranks that only join the gathers
        self.transfer_source.start_send()
        try:
            if group is not None and group.disabled:
                raise RuntimeError("the NCCL weight-transfer group was aborted: form it again (init_weight_transfer)")
            self.transfer_client.version = str(version)
            self.transfer.send_weights()
        except BaseException:
            # A sender that fails before its broadcast (vLLM's stops at the first failed engine call, e.g.
            # `start_weight_update` on an engine that died) or midway: the other ranks' gathers must still find its.
            self.transfer_source.finish_gathers()
            raise
        if group is not None and group.disabled:
            raise RuntimeError(f"the NCCL update to version {version} was aborted midway")

    @ray.method(concurrency_group="abort")
    def abort_weight_transfer(self) -> None:
        """Tear the NCCL group down (a member died or hung): aborting the communicator ends a broadcast waiting on
        it. Runs on its own thread, beside a blocked `send_weights` (or on the thread of the engine call that
        failed)."""
        transfer = getattr(self, "transfer", None)
        if transfer is not None and transfer.model_update_group is not None:
            transfer.model_update_group.destroy()

    def generate(self, items: list[dict], params: dict) -> list[list[str]] | None:
        """Completions of the current weights (rank 0; None elsewhere), through the same engine code as the rollouts.

        Every rank is called: under ZeRO-3 the trainable weights are first gathered into a full copy of the model.
        """
        if self.parallel.sharded:
            state = self.parallel.trainable_state()
            if self.rank != 0:
                return None
            model, _ = load_model_and_processor(self.model_dir, device=str(self.device))
            model.load_state_dict(state, strict=False)
        elif self.rank != 0:
            return None
        else:
            model = self.parallel.module
        requests = [ChatRequest.single_image(load_image(i["image_uri"], self.image_size), i["problem"]) for i in items]
        model.eval()
        try:
            groups = HFEngine(model, self.processor).generate(requests, SamplingParams.model_validate(params))
        finally:
            model.train()
        return [[c.text for c in group] for group in groups]

    def save(self, uri: str) -> None:
        with writable_dir(uri) as directory:
            self.parallel.save(directory)

    def load(self, uri: str) -> None:
        with readable_dir(uri, rank=self.rank) as directory:  # from S3: this rank's files only
            self.parallel.load(directory)

    def export(self, uri: str) -> None:
        """The policy as a Hugging Face directory (model + processor) at `uri` (rank 0 writes)."""
        state = self.parallel.full_state()  # collective under ZeRO-3
        if self.rank != 0:
            return
        module = self.parallel.module
        module.config.use_cache = True  # training turned the cache off; the exported model generates
        try:
            with writable_dir(uri) as directory:
                module.save_pretrained(directory, state_dict=state)
                self.processor.save_pretrained(directory)
        finally:
            module.config.use_cache = False


def mismatch_metrics(sums: dict[str, float]) -> dict[str, float]:
    """Rollout vs learner, per token of the step's first update: mean |Δ log p|, mean k3, the IS-clipped fraction."""
    tokens = sums["gap_tokens"]
    if not tokens:
        keys = ("rollout_logprob_gap", "rollout_mismatch_k3", "rollout_is_clipped_fraction")
        return dict.fromkeys(keys, float("nan"))
    return {"rollout_logprob_gap": sums["gap"] / tokens, "rollout_mismatch_k3": sums["mismatch_k3"] / tokens,
            "rollout_is_clipped_fraction": sums["is_clipped"] / tokens}


class LearnerGroup:
    """The M learner actors of a run, called together."""

    def __init__(self, config: RLVRConfig, model_dir: str):
        learner = config.learner
        self.world_size = learner.num_workers
        self.updates_per_batch = config.grpo.updates_per_batch
        rows_per_rank = math.ceil(config.batch_size / self.world_size)
        grad_accum_steps = math.ceil(rows_per_rank / learner.micro_batch_size)
        name = f"learner-{uuid.uuid4().hex[:8]}"
        self.placement_group = self._placed(learner)
        options = {"num_cpus": learner.num_cpus, "num_gpus": 1 if learner.use_gpu else 0,
                   "runtime_env": {"env_vars": THREAD_ENV}}
        self.workers = [
            ray.remote(concurrency_groups={"abort": 1})(LearnerWorker).options(
                name=f"{name}-{rank}", scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self.placement_group, placement_group_bundle_index=rank), **options).remote(
                learner.model_dump(), config.grpo.model_dump(), model_dir=model_dir, revision=config.revision,
                image_size=config.data.image_size, rank=rank, world_size=self.world_size,
                grad_accum_steps=grad_accum_steps, total_steps=config.steps * config.grpo.updates_per_batch,
                seed=config.seed, group_timeout_s=group_timeout_s(config))
            for rank in range(self.world_size)
        ]
        # Not waited for here: the ranks set up (process group, model, optimizer) while the caller starts the
        # rollout engines; an actor runs its calls in order, so any later call finds its rank set up.
        address = self.workers[0].address.remote()  # rank 0's, passed on by Ray without a round trip here
        self._setup = [w.setup.remote(address) for w in self.workers]

    def wait_ready(self) -> None:
        """Wait for every rank's setup, raising its error (a rank that failed to set up still holds its bundle)."""
        try:
            ray.get(self._setup)
        except BaseException:
            self.shutdown()
            raise

    def _placed(self, learner: LearnerConfig) -> ray.util.placement_group.PlacementGroup:
        """One bundle per rank on learner nodes, placed by `learner.placement_strategy`: without a group, ranks go
        wherever a GPU is free, e.g. split over two learner nodes that are both up."""
        bundles = [learner.worker_bundle] * self.world_size
        group = placement_group(bundles, **placement.group_options("learner", len(bundles),
                                                                   learner.placement_strategy))
        try:
            ray.get(group.ready(), timeout=learner.placement_timeout_s)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(group)
            raise RuntimeError(f"the learners' placement group ({len(bundles)} x {bundles[0]}, "
                               f"{learner.placement_strategy}) was not placed within {learner.placement_timeout_s}s: "
                               "no learner node (or not enough of them) can hold it") from None
        return group

    def train(self, rows: list[TrainRow]) -> dict:
        """One GRPO step on the batch `rows` (each rank takes a contiguous share); the group's statistics."""
        shares = rank_shares(rows, self.world_size, TrainRow.filler)
        results = ray.get([w.train.remote(share) for w, share in zip(self.workers, shares)])
        sums = {k: sum(r["sums"][k] for r in results) for k in SUMS}
        tokens = max(sums["tokens"], 1.0)  # summed over the updates, like the other token sums
        return {
            "loss": sums["loss"] / self.updates_per_batch,
            "kl": sums["kl"] / tokens,
            "entropy": sums["entropy"] / tokens,
            "clip_fraction": sums["clipped"] / tokens,
            **mismatch_metrics(sums),
            "grad_norm": results[0]["grad_norm"],
            "lr": results[0]["lr"],
            "train_tokens": sums["tokens"] / self.updates_per_batch,
            "time_logprob_s": max(r["logprob_s"] for r in results),
            "time_train_s": max(r["train_s"] for r in results),
        }

    def trainable_state(self, file_names: bool = False) -> ray.ObjectRef:
        """A reference to rank 0's trainable weights: one object in the object store."""
        refs = [w.trainable_state.remote(file_names) for w in self.workers]
        ray.get(refs[1:])  # the other ranks only take part in the gather
        ray.wait([refs[0]], fetch_local=False)
        return refs[0]

    def generate(self, items: list[dict], params: dict) -> list[list[str]]:
        """Rank 0's completions of `items` with the current weights (evaluation and checks)."""
        return ray.get([w.generate.remote(items, params) for w in self.workers])[0]

    def save(self, uri: str) -> None:
        ray.get([w.save.remote(uri) for w in self.workers])

    def load(self, uri: str) -> None:
        ray.get([w.load.remote(uri) for w in self.workers])

    def export(self, uri: str) -> None:
        ray.get([w.export.remote(uri) for w in self.workers])

    def shutdown(self) -> None:
        for worker in self.workers:
            ray.kill(worker)
        remove_placement_group(self.placement_group)
