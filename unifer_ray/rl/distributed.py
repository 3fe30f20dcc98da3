"""The learners' data parallelism: one torch.distributed group of Ray actors, wrapped by DeepSpeed ZeRO or DDP.

Ray Train sets up SFT's process group; RL's learners are long-lived actors that the controller calls step by step,
so they join their group themselves (`join_process_group`). The model wrapping reuses SFT's pieces: its DeepSpeed
config, optimizer and schedule. Gradients: each micro-batch's loss is already its share of the global batch loss
(see rl/grpo.py), so `micro_step` only undoes the wrapper's averaging over ranks.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from unifer_ray.rl.config import LearnerConfig
from unifer_ray.train.config import OptimizerConfig
from unifer_ray.train.optim import build_optimizer
from unifer_ray.train.strategy import DEEPSPEED_TAG, TORCH_STATE, deepspeed_config

RNG_FILE = "rng_rank{rank}.pt"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def join_process_group(master_addr: str, master_port: int, rank: int, world_size: int, use_gpu: bool) -> torch.device:
    """Join the learners' group (NCCL on GPU, gloo on CPU); returns this learner's device."""
    # DeepSpeed reads the usual launcher variables.
    os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK="0")
    device = torch.device("cuda", 0) if use_gpu else torch.device("cpu")  # Ray shows each learner its own GPU
    if use_gpu:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if use_gpu else "gloo", init_method=f"tcp://{master_addr}:{master_port}",
                            rank=rank, world_size=world_size)
    return device


@dataclass(frozen=True)
class DeepSpeedSettings:
    """What train.strategy.deepspeed_config reads, for RL's batches."""

    zero_stage: int
    use_gpu: bool
    bf16: bool
    micro_batch_size: int
    grad_accum_steps: int
    global_batch_size: int
    optimizer: OptimizerConfig


class DataParallel:
    """`micro_step` runs one micro-batch's forward and backward; `step` ends the accumulated batch.

    `micro_batches` is the fixed number of micro-batches per optimizer step on every rank (ranks short of rows
    replay one at weight zero, so that every collective meets).
    """

    def __init__(self, model: torch.nn.Module, config: LearnerConfig, *, world_size: int, micro_batches: int,
                 total_steps: int):
        self.config = config
        self.world_size = world_size
        self.module = model
        optimizer, scheduler = build_optimizer(model, config.optimizer, total_steps)
        self.engine = None
        if config.strategy == "deepspeed":
            import deepspeed

            settings = DeepSpeedSettings(
                zero_stage=config.zero_stage, use_gpu=config.use_gpu, bf16=config.bf16,
                micro_batch_size=config.micro_batch_size, grad_accum_steps=micro_batches,
                global_batch_size=config.micro_batch_size * micro_batches * world_size, optimizer=config.optimizer)
            self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(settings),
                dist_init_required=False)
            self.model = self.engine
            self.module = self.engine.module
        else:
            self.optimizer, self.scheduler = optimizer, scheduler
            if world_size > 1:
                device_ids = [torch.cuda.current_device()] if config.use_gpu else None
                self.model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
            else:
                self.model = model

    @property
    def sharded(self) -> bool:
        """ZeRO-3: each rank holds only a partition of every parameter."""
        return self.engine is not None and self.engine.zero_optimization_stage() == 3

    def micro_step(self, loss_fn: Callable[[torch.nn.Module], tuple[torch.Tensor, Any]], *, last: bool) -> Any:
        """Forward (`loss_fn(model)` → this micro-batch's share of the batch loss, and anything else) and backward."""
        if self.engine is not None:
            loss, extra = loss_fn(self.engine)
            self.engine.set_gradient_accumulation_boundary(last)
            self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
            self.engine.step()  # clips, steps and schedules at the boundary only
            return extra
        # DDP all-reduces once per optimizer step, in the last micro-batch's backward.
        no_sync = getattr(self.model, "no_sync", None)
        context = contextlib.nullcontext() if last or no_sync is None else no_sync()
        with context:
            with torch.autocast(self.module.device.type, dtype=torch.bfloat16, enabled=self.config.bf16):
                loss, extra = loss_fn(self.model)
            (loss * self.world_size).backward()
        return extra

    def step(self) -> float:
        """Clip, step, schedule; the gradient norm before clipping."""
        if self.engine is not None:  # the step itself happened in the last micro_step
            norm = self.engine.get_global_grad_norm()
            return float(norm) if norm is not None else float("nan")
        norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.config.optimizer.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def lr(self) -> float:
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

    def trainable_state(self, rank: int) -> dict[str, torch.Tensor] | None:
        """The trainable weights on CPU at rank 0 (None elsewhere); collective under ZeRO-3."""
        named = self.trainable_parameters()
        with self.gathered([p for _, p in named]):
            if rank != 0:
                return None
            return {name: p.detach().to("cpu", copy=True) for name, p in named}

    def full_state(self) -> dict[str, torch.Tensor] | None:
        """Every weight, for save_pretrained (collective under ZeRO-3; rank 0 gets it)."""
        if self.sharded:
            return self.engine._zero3_consolidated_16bit_state_dict()
        return self.module.state_dict()

    def save(self, directory: Path, rank: int) -> None:
        """This rank's part of the training state into a local directory."""
        directory.mkdir(parents=True, exist_ok=True)
        torch.save(_rng_state(), directory / RNG_FILE.format(rank=rank))
        if self.engine is not None:
            self.engine.save_checkpoint(str(directory), tag=DEEPSPEED_TAG)  # each rank its optimizer partition
        elif rank == 0:  # replicas are identical: one copy is the whole state
            trainable = {name for name, _ in self.trainable_parameters()}
            model = {k: v for k, v in self.module.state_dict().items() if k in trainable}
            torch.save({"model": model, "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict()}, directory / TORCH_STATE)

    def load(self, directory: Path, rank: int) -> None:
        if self.engine is not None:
            path, _ = self.engine.load_checkpoint(str(directory), tag=DEEPSPEED_TAG)
            if path is None:
                raise FileNotFoundError(f"{directory}: no DeepSpeed checkpoint '{DEEPSPEED_TAG}'")
        else:
            state = torch.load(directory / TORCH_STATE, map_location=self.module.device, weights_only=True)
            missing = self.module.load_state_dict(state["model"], strict=False).unexpected_keys
            if missing:
                raise KeyError(f"{directory}: checkpoint weights not in the model: {missing[:5]}")
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        rng = directory / RNG_FILE.format(rank=rank)
        if rng.exists():  # a run resumed on more learners than it saved: the new ranks keep their seeds
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
