"""Data parallelism for SFT and RL: a model wrapped by DeepSpeed ZeRO (stage 2 or 3) or torch DDP.

The process group exists before the wrapper is built: Ray Train sets up SFT's workers' group, RL's learners join
theirs (rl/learner.py). One convention for gradients: the loss that `micro_step` back-propagates is the micro-batch's
share of the global batch loss (the global loss is the sum of the shares over every rank and micro-batch). Both
wrappers average gradients over the ranks, so the share is multiplied by the world size (and DeepSpeed is told not
to divide by its accumulation steps): the gradient is that of the global loss whatever the number of ranks.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field, model_validator

from unifer_ray.models.loading import load_model_and_processor
from unifer_ray.optim import OptimizerConfig, build_optimizer

DEEPSPEED_TAG = "deepspeed"  # DeepSpeed's sub-directory inside a checkpoint
TORCH_STATE = "torch_state.pt"  # DDP's trainable weights, optimizer and scheduler inside a checkpoint
RNG_FILE = "rng_rank{rank}.pt"  # each rank's random state inside a checkpoint

Row = TypeVar("Row")


class ParallelConfig(BaseModel):
    """The training workers, their parallelism and optimisation: SFT's and the RL learners' alike."""

    model_config = ConfigDict(extra="forbid")

    num_workers: int = Field(1, gt=0)
    use_gpu: bool = False  # one GPU per worker
    num_cpus: float = Field(1.0, gt=0)  # per worker; fractional on small machines
    # Where the workers go (Ray's placement strategies): PACK (Ray Train's default) fills one node before the next;
    # STRICT_PACK keeps every rank on one node (NVLink; never starts when the group outgrows a node); SPREAD.
    placement_strategy: Literal["PACK", "STRICT_PACK", "SPREAD"] = "PACK"
    torch_threads: int = Field(1, gt=0)  # CPU threads per worker (ignored on GPU)
    strategy: Literal["deepspeed", "ddp"] = "deepspeed"
    zero_stage: Literal[2, 3] = 2  # deepspeed only
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    gradient_checkpointing: bool = False
    freeze_vision_tower: bool = False  # the vision blocks stay fixed (RL never syncs them); the merger trains
    micro_batch_size: int = Field(1, gt=0)  # sequences per worker per forward pass
    optimizer: OptimizerConfig = OptimizerConfig()

    @model_validator(mode="after")
    def _precision(self) -> ParallelConfig:
        if self.precision == "bf16" and not self.use_gpu:
            raise ValueError("precision: bf16 needs use_gpu (CPU training runs in fp32)")
        return self

    @property
    def worker_bundle(self) -> dict[str, float]:
        """What one worker (rank) asks Ray for."""
        return {"CPU": self.num_cpus} | ({"GPU": 1} if self.use_gpu else {})

    @property
    def bf16(self) -> bool:
        return self.precision == "bf16" or (self.precision == "auto" and self.use_gpu)

    def settings(self, *, grad_accum_steps: int, total_steps: int) -> ParallelSettings:
        return ParallelSettings(strategy=self.strategy, zero_stage=self.zero_stage, use_gpu=self.use_gpu,
                                bf16=self.bf16, micro_batch_size=self.micro_batch_size,
                                grad_accum_steps=grad_accum_steps, world_size=self.num_workers,
                                optimizer=self.optimizer, total_steps=total_steps)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare_model(model: torch.nn.Module, config: ParallelConfig) -> None:
    """Training mode, no KV cache; optionally a frozen vision tower and gradient checkpointing."""
    model.train()
    model.config.use_cache = False
    if config.freeze_vision_tower:
        for name, param in model.model.visual.named_parameters():
            if not name.startswith("merger."):
                param.requires_grad_(False)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


@dataclass(frozen=True)
class ParallelSettings:
    strategy: Literal["deepspeed", "ddp"]
    zero_stage: int  # deepspeed only
    use_gpu: bool
    bf16: bool
    micro_batch_size: int  # rows per forward pass
    grad_accum_steps: int  # forward passes per optimizer step, the same on every rank
    world_size: int
    optimizer: OptimizerConfig
    total_steps: int  # optimizer steps of the run, for the learning-rate schedule

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps * self.world_size

    @property
    def zero3(self) -> bool:
        return self.strategy == "deepspeed" and self.zero_stage == 3


def deepspeed_config(settings: ParallelSettings) -> dict[str, Any]:
    """DeepSpeed's config; optimizer and scheduler are ours (passed to deepspeed.initialize)."""
    zero: dict[str, Any] = {"stage": settings.zero_stage, "contiguous_gradients": True,
                            "overlap_comm": settings.use_gpu}
    if settings.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True  # export gathers the full weights on rank 0
    return {
        "train_micro_batch_size_per_gpu": settings.micro_batch_size,
        "gradient_accumulation_steps": settings.grad_accum_steps,
        "train_batch_size": settings.global_batch_size,
        "gradient_clipping": settings.optimizer.max_grad_norm,
        "bf16": {"enabled": settings.bf16},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # torch's AdamW, on CPU and GPU alike
        "steps_per_print": 2**31 - 1,  # our own metrics say it
        "wall_clock_breakdown": False,
    }


def training_dtype(settings: ParallelSettings) -> str:
    """The dtype a trainable model is loaded in. DeepSpeed's bf16 keeps fp32 master weights in its optimizer, so the
    model itself starts in bf16 (no fp32 copy is ever built); DDP autocasts, so its weights stay fp32."""
    return "bfloat16" if settings.bf16 and settings.strategy == "deepspeed" else "float32"


class _ZeRO3Loading:
    """What transformers asks of the DeepSpeed config it loads under (is_zero3, config). Its own HfDeepSpeedConfig
    needs `accelerate`, which nothing else here uses."""

    def __init__(self, config: dict[str, Any]):
        self.config = config

    def is_zero3(self) -> bool:
        return True


@contextlib.contextmanager
def sharded_loading(settings: ParallelSettings):
    """Under ZeRO-3, models loaded inside the block are built inside `deepspeed.zero.Init` (transformers' own ZeRO-3
    path: rank 0 reads the files, every rank keeps its partition), so no rank ever holds a whole model. Elsewhere,
    nothing changes. Scoped: a model loaded later (a full copy to generate with) is an ordinary one."""
    if not settings.zero3:
        yield
        return
    import deepspeed
    from transformers.integrations import set_hf_deepspeed_config, unset_hf_deepspeed_config

    # zero.Init partitions over DeepSpeed's view of the group: it adopts the existing one (deepspeed.initialize would
    # do the same, later).
    deepspeed.init_distributed(dist.get_backend(), auto_mpi_discovery=False)
    loading = _ZeRO3Loading(deepspeed_config(settings))  # transformers holds a weak reference only
    set_hf_deepspeed_config(loading)
    try:
        yield
    finally:
        unset_hf_deepspeed_config()


def load_trainable(model_dir: str, settings: ParallelSettings, device: torch.device,
                   revision: str | None = None) -> tuple[torch.nn.Module, Any]:
    """The starting policy in its training dtype, partitioned from the start under ZeRO-3; and its processor.
    `model_dir` may be a hub id, at `revision`."""
    with sharded_loading(settings):
        return load_model_and_processor(model_dir, dtype=training_dtype(settings), device=str(device),
                                        revision=revision)


def load_reference(model_dir: str, settings: ParallelSettings, device: torch.device) -> torch.nn.Module:
    """The frozen starting policy, for KL. Under ZeRO-3 it is sharded like the policy (an inference-only DeepSpeed
    engine: no optimizer, no gradients), 1/N per rank, gathered layer by layer in its forward pass: every rank must
    call it alike. Otherwise a full copy, bf16 when training in bf16."""
    with sharded_loading(settings):
        model, _ = load_model_and_processor(model_dir, dtype="bfloat16" if settings.bf16 else "float32",
                                            device=str(device))
    model.requires_grad_(False)
    if not settings.zero3:
        return model
    import deepspeed

    engine, *_ = deepspeed.initialize(model=model, config=deepspeed_config(settings), dist_init_required=False)
    engine.eval()
    return engine


def rank_shares(rows: list[Row], world_size: int, filler: Callable[[Row], Row]) -> list[list[Row]]:
    """`rows` in `world_size` contiguous shares, the first ones a row longer where they do not divide evenly; a rank
    left without rows gets one `filler` row (weight 0), so that it still takes part in every collective."""
    each, extra = divmod(len(rows), world_size)
    bounds = [rank * each + min(rank, extra) for rank in range(world_size + 1)]
    return [rows[start:end] or [filler(rows[0])] for start, end in zip(bounds, bounds[1:])]


def micro_batches(rows: list[Row], micro_batch_size: int, grad_accum_steps: int,
                  filler: Callable[[Row], Row]) -> list[list[Row]]:
    """A rank's `rows` spread evenly over the `grad_accum_steps` micro-batches of one step (a step's cost follows its
    rows, not its micro-batch size); a micro-batch left without rows replays the first row as `filler` (weight 0),
    so that every rank runs as many micro-steps and every collective meets."""
    if not rows or len(rows) > micro_batch_size * grad_accum_steps:
        raise ValueError(f"{len(rows)} rows do not make 1 to {grad_accum_steps} micro-batches of {micro_batch_size}")
    return rank_shares(rows, grad_accum_steps, filler)


class DataParallel:
    """`micro_step` runs one micro-batch's forward and backward; `step` ends the optimizer step.

    Every rank runs `settings.grad_accum_steps` micro-steps per step: a rank short of rows replays some at weight
    zero (`micro_batches`, `rank_shares`; SFT's loop replays an earlier micro-batch where the collator dropped every
    row of one), so that every collective meets. DDP autocasts to bf16 when asked; DeepSpeed holds the model in bf16
    itself.
    """

    def __init__(self, model: torch.nn.Module, settings: ParallelSettings):
        self.settings = settings
        self.rank = dist.get_rank()
        self.module = model
        self.device = next(model.parameters()).device
        optimizer, self.scheduler = build_optimizer(model, settings.optimizer, settings.total_steps)
        self.engine = None
        if settings.strategy == "deepspeed":
            import deepspeed

            self.engine, _, _, self.scheduler = deepspeed.initialize(
                model=model, optimizer=optimizer, lr_scheduler=self.scheduler, config=deepspeed_config(settings),
                dist_init_required=False)
            self.model = self.engine
            self.module = self.engine.module
        else:
            self.optimizer = optimizer
            if settings.world_size > 1:
                device_ids = [self.device] if self.device.type == "cuda" else None
                self.model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
            else:
                self.model = model

    @property
    def sharded(self) -> bool:
        """ZeRO-3: each rank holds only a partition of every parameter."""
        return self.engine is not None and self.engine.zero_optimization_stage() == 3

    def micro_step(self, loss_fn: Callable[[torch.nn.Module], tuple[torch.Tensor, Any]], *, last: bool) -> Any:
        """Forward (`loss_fn(model)` → the micro-batch's share of the global batch loss, and anything else) and
        backward; returns the anything else. `last`: the step's last micro-batch, where gradients are reduced."""
        world = self.settings.world_size
        if self.engine is not None:
            loss, extra = loss_fn(self.engine)
            self.engine.set_gradient_accumulation_boundary(last)
            self.engine.backward(loss * world, scale_wrt_gas=False)
            self.engine.step()  # clips, steps and schedules at the boundary only
            return extra
        no_sync = getattr(self.model, "no_sync", None)  # DDP all-reduces in the last micro-batch's backward only
        context = contextlib.nullcontext() if last or no_sync is None else no_sync()
        with context:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.settings.bf16):
                loss, extra = loss_fn(self.model)
            (loss * world).backward()
        return extra

    def step(self) -> float:
        """Clip, step, schedule; the gradient norm before clipping."""
        if self.engine is not None:  # the step itself happened in the last micro_step
            norm = self.engine.get_global_grad_norm()
            return float(norm) if norm is not None else float("nan")
        norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.settings.optimizer.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def lr(self) -> float:
        """The learning rate of the next step (the language model's)."""
        return self.scheduler.get_last_lr()[0]

    @contextlib.contextmanager
    def gathered(self, params: list[torch.nn.Parameter]):
        """Full parameters inside the block (collective under ZeRO-3: every rank enters it)."""
        if self.sharded:
            import deepspeed

            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                yield
        else:
            yield

    def trainable_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(name, p) for name, p in self.module.named_parameters() if p.requires_grad]

    def trainable_state(self) -> dict[str, torch.Tensor] | None:
        """The trainable weights on CPU at rank 0 (None elsewhere); collective under ZeRO-3."""
        named = self.trainable_parameters()
        with self.gathered([p for _, p in named]):
            if self.rank != 0:
                return None
            return {name: p.detach().to("cpu", copy=True) for name, p in named}

    def full_state(self) -> dict[str, torch.Tensor] | None:
        """Every weight, for save_pretrained (collective under ZeRO-3; rank 0 gets it)."""
        if self.sharded:
            return self.engine._zero3_consolidated_16bit_state_dict()
        return self.module.state_dict()

    def save(self, directory: Path) -> None:
        """This rank's part of the training state into a local directory (collective under DeepSpeed).

        The frozen weights are not saved: a resumed run loads them with the starting model.
        """
        directory.mkdir(parents=True, exist_ok=True)
        torch.save(_rng_state(), directory / RNG_FILE.format(rank=self.rank))
        if self.engine is not None:
            self.engine.save_checkpoint(str(directory), tag=DEEPSPEED_TAG)  # each rank its optimizer partition
        elif self.rank == 0:  # replicas are identical: one copy is the whole state
            trainable = {name for name, _ in self.trainable_parameters()}
            model = {k: v for k, v in self.module.state_dict().items() if k in trainable}
            torch.save({"model": model, "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict()}, directory / TORCH_STATE)

    def load(self, directory: Path) -> None:
        """The training state `save` wrote, into the model built from the starting checkpoint."""
        if self.engine is not None:
            path, _ = self.engine.load_checkpoint(str(directory), tag=DEEPSPEED_TAG)
            if path is None:
                raise FileNotFoundError(f"{directory}: no DeepSpeed checkpoint '{DEEPSPEED_TAG}' to resume from")
        else:
            state = torch.load(directory / TORCH_STATE, map_location=self.device, weights_only=True)
            unexpected = self.module.load_state_dict(state["model"], strict=False).unexpected_keys
            if unexpected:
                raise KeyError(f"{directory / TORCH_STATE}: weights not in the model: {unexpected[:5]}")
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        rng = directory / RNG_FILE.format(rank=self.rank)
        if rng.exists():  # a run resumed on more ranks than it saved: the new ranks keep their seeds
            _set_rng_state(torch.load(rng, weights_only=False))


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
