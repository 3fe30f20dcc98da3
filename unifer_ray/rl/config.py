"""RLVR configuration: the `rlvr:` section of a YAML file."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from unifer_ray import storage
from unifer_ray.engines.spec import EngineSpec
from unifer_ray.optim import OptimizerConfig
from unifer_ray.parallel import ParallelConfig
from unifer_ray.registry import lookup
from unifer_ray.rl.grpo import ADVANTAGES, AGGREGATIONS
from unifer_ray.rl.orders import ORDERS


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PromptData(_Strict):
    paths: list[str] = Field(min_length=1)  # RLVR files or directories of them (.json/.jsonl/.parquet, local or s3://)
    image_root: str | None = None  # items' image_path is read below this root (local or s3://)
    image_size: int = Field(224, gt=0)  # images are resized to image_size², as in FERBench and SFT
    # Each epoch's seeded order (rl/orders.py ORDERS): `by_answer` spreads each answer's items evenly over the epoch,
    # so that every step's prompts hold the labels in their share (docs/post-training.md); `shuffled`, a plain
    # permutation; `id`, the items sorted by id.
    order: str = "by_answer"
    # Only the items of these task types (their `task` field: mc, mc_shuffled, binary, unified); None: every item. A
    # task the starting policy never answers right gives groups of equal rewards, which teach nothing.
    tasks: list[str] | None = Field(None, min_length=1)
    # Only this many items, a seeded draw in `order` (so `by_answer` keeps the labels' shares), the same every epoch;
    # None: every item. With fewer items than a run's prompts the epochs repeat them, and the training curve then
    # compares the same prompts early and late rather than easier ones with harder ones.
    max_items: int | None = Field(None, gt=0)

    @field_validator("order")
    @classmethod
    def _order(cls, name: str) -> str:
        lookup(ORDERS, name, "prompt order")
        return name


class RolloutEngine(_Strict):
    """A rollout worker's engine: EngineSpec's local-engine options. Its model is always the policy (the run's
    `model`, then the weights the learners send)."""

    # auto: vLLM wherever it is installed (its CPU build on a laptop, a GPU build on clusters), else hf
    engine: Literal["auto", "hf", "vllm"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_batch_size: int = Field(16, gt=0)  # hf: requests per forward pass
    vllm_kwargs: dict[str, Any] = Field(default_factory=dict)  # extra keyword arguments for vllm.LLM
    one_process: bool | None = None  # vllm: the engine inside the worker's process; None: on CPUs (EngineSpec)

    def spec(self, model: str, revision: str | None = None) -> EngineSpec:
        return EngineSpec(model=model, revision=revision, **self.model_dump())


class RolloutConfig(_Strict):
    """N actors, each one GenerationEngine; on GPUs each vLLM engine gets its own placement group."""

    num_workers: int = Field(1, gt=0)
    engine: RolloutEngine = RolloutEngine()
    num_cpus: float = Field(1.0, ge=0)  # per worker (per bundle on GPUs)
    num_gpus: int = Field(0, ge=0)  # per worker: a vLLM engine's tensor_parallel_size GPUs, one bundle each
    torch_threads: int = Field(1, gt=0)  # CPU threads of the hf engine
    max_replacements: int = Field(3, ge=0)  # dead or hung workers replaced over the run before it fails
    # A worker that does not answer within these is taken for hung: it is killed and replaced like a dead one.
    start_timeout_s: float = Field(900, gt=0)  # an engine's start (vLLM compiles its model first)
    generate_timeout_s: float = Field(900, gt=0)  # one batch share, from the moment the controller waits for it
    sync_timeout_s: float = Field(300, gt=0)  # one weight update
    # A worker's placement group, before its engine starts: on a cluster, a node's launch and image pull (a spot
    # rollout lost with its node waits here for the next one, not in start_timeout_s).
    placement_timeout_s: float = Field(1800, gt=0)

    @property
    def bundles(self) -> list[dict[str, float]]:
        """One worker's placement group: a bundle per tensor-parallel GPU, or one of CPUs."""
        return [{"CPU": self.num_cpus, "GPU": 1}] * self.num_gpus or [{"CPU": self.num_cpus}]

    @property
    def update_timeout_s(self) -> float:
        """The longest wait for a weight update: it may queue behind the batch an engine is generating."""
        return self.sync_timeout_s + self.generate_timeout_s

    @model_validator(mode="after")
    def _engine(self) -> RolloutConfig:
        tp = int(self.engine.vllm_kwargs.get("tensor_parallel_size", 1))
        if self.num_gpus and self.engine.engine == "vllm" and self.num_gpus != tp:
            raise ValueError(f"num_gpus {self.num_gpus} must equal the vLLM tensor_parallel_size {tp}")
        return self


class LearnerConfig(ParallelConfig):
    """M actors in one torch.distributed group (NCCL on GPU, gloo on CPU); ParallelConfig's fields, RL's defaults.
    Their gradient accumulation follows from the batch: grpo.prompts_per_step × group_size rows over the learners."""

    micro_batch_size: int = Field(4, gt=0)
    optimizer: OptimizerConfig = OptimizerConfig(lr=1e-6, warmup_ratio=0.0)
    placement_timeout_s: float = Field(1800, gt=0)  # the learners' placement group: on a cluster, a node's launch


class GRPOConfig(_Strict):
    group_size: int = Field(8, ge=2)  # G completions per prompt; a group of one has no advantage
    prompts_per_step: int = Field(8, gt=0)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(1024, gt=0)  # completion length
    max_prompt_tokens: int = Field(4096, gt=0)  # longer prompts are errors, never truncated
    beta: float = Field(0.04, ge=0)  # KL weight; 0 skips the reference model entirely
    clip_eps: float = Field(0.2, gt=0)  # ratio clipped to [1 - clip_eps, 1 + clip_eps_high]
    clip_eps_high: float | None = Field(None, gt=0)  # DAPO's clip-higher; default clip_eps
    updates_per_batch: int = Field(1, gt=0)  # optimizer steps on one batch (μ); >1 makes the clipping bite
    advantage: str = "grpo"  # grpo: (r - mean) / (std + std_eps); dr_grpo: r - mean (rl/grpo.py ADVANTAGES)
    std_eps: float = Field(1e-4, gt=0)
    aggregation: str = "grpo"  # grpo, dr_grpo or dapo (rl/grpo.py AGGREGATIONS)
    # Truncated importance sampling: samples come from the rollout engine (vLLM's numerics, and one version old in
    # one_step_off), so each token's loss is weighted by min(π_old / π_rollout, cap). None: no correction.
    rollout_is_cap: float | None = Field(2.0, gt=0)

    @field_validator("advantage")
    @classmethod
    def _advantage(cls, name: str) -> str:
        lookup(ADVANTAGES, name, "advantage estimator")
        return name

    @field_validator("aggregation")
    @classmethod
    def _aggregation(cls, name: str) -> str:
        lookup(AGGREGATIONS, name, "loss aggregation")
        return name

    @property
    def clip_high(self) -> float:
        return self.clip_eps if self.clip_eps_high is None else self.clip_eps_high


class RewardSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_]+$")  # the name in metrics
    function: str | None = None  # a registered name or 'package.module:function'; default: `name`
    weight: float = 1.0


class SyncConfig(_Strict):
    kind: Literal["object_store", "nccl"] = "object_store"
    bucket_mb: int = Field(512, gt=0)  # nccl: parameters broadcast per bucket
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # nccl: auto sends the learner's parameter dtype


DEFAULT_REWARDS = [RewardSpec(name="accuracy"), RewardSpec(name="format")]


class RLVRConfig(_Strict):
    # The starting policy (and the KL reference): a Hugging Face directory (local or s3://), e.g. the SFT output, or
    # a hub id (org/name) at `revision` (a branch, tag or commit; default main).
    model: str
    revision: str | None = None
    data: PromptData
    output_dir: str  # the final policy, a Hugging Face directory (model + processor); local or s3://
    checkpoint_dir: str  # checkpoints and `latest`; local or s3://
    log_dir: str | None = None  # metrics.jsonl, samples.jsonl, errors.jsonl, tensorboard/ (local)

    steps: int = Field(gt=0)  # training steps; one step = one batch of prompts × group_size
    mode: Literal["sync", "one_step_off"] = "sync"
    seed: int = 0
    rollout: RolloutConfig = RolloutConfig()
    learner: LearnerConfig = LearnerConfig()
    grpo: GRPOConfig = GRPOConfig()
    rewards: list[RewardSpec] = Field(default_factory=lambda: list(DEFAULT_REWARDS), min_length=1)
    sync: SyncConfig = SyncConfig()

    checkpoint_every: int = Field(50, gt=0)  # steps; the last step is always checkpointed
    keep_checkpoints: int = Field(2, gt=0)
    sample_log_every: int = Field(0, ge=0)  # write every completion of every k-th step to samples.jsonl (0: never)

    @model_validator(mode="after")
    def _check(self) -> RLVRConfig:
        if self.log_dir is None and storage.is_s3(self.checkpoint_dir):
            raise ValueError("log_dir: required when checkpoint_dir is s3:// (TensorBoard writes local files)")
        names = [r.name for r in self.rewards]
        if len(set(names)) != len(names):
            raise ValueError(f"rewards: names must be unique, got {names}")
        if self.sync.kind == "nccl" and not (self.learner.use_gpu and self.rollout.num_gpus):
            raise ValueError("sync.kind nccl needs GPU learners and GPU (vLLM) rollout workers; use object_store")
        if self.data.max_items is not None and self.data.max_items < self.grpo.prompts_per_step:
            raise ValueError(f"data.max_items {self.data.max_items} is fewer than grpo.prompts_per_step "
                             f"{self.grpo.prompts_per_step}: a step needs that many prompts")
        return self

    @property
    def metrics_dir(self) -> str:
        return self.log_dir or storage.join(self.checkpoint_dir, "logs")

    @property
    def batch_size(self) -> int:
        return self.grpo.prompts_per_step * self.grpo.group_size
