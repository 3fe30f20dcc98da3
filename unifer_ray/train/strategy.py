"""How a worker's model is wrapped for data parallelism: DeepSpeed ZeRO (stage 2 or 3) or plain DDP.

Both present one interface to the training loop: `micro_step` (forward and backward of one micro-batch),
`optimizer_step` at the end of each accumulated batch, `save`/`load` of the full training state, and
`export_state_dict` for the final model.

The loss of an optimizer step is the mean over every assistant token of the global batch (all workers, all
accumulated micro-batches), whatever the number of workers. Each micro-batch's token-loss *sum* is scaled by
`loss_scale(global_tokens)`, which undoes the wrapper's own averaging (DDP divides by the world size; DeepSpeed by
the world size and the accumulation steps), so that 1 worker and N workers compute the same gradient.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from unifer_ray.train.collate import IGNORE
from unifer_ray.train.config import SFTConfig
from unifer_ray.train.optim import build_optimizer

DEEPSPEED_TAG = "deepspeed"  # DeepSpeed's sub-directory inside a checkpoint
TORCH_STATE = "torch_state.pt"  # DDP's model, optimizer and scheduler inside a checkpoint


def token_loss_sum(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed next-token cross-entropy over the labelled tokens (labels are -100 elsewhere).

    Logits are computed only from the position before the batch's first labelled token on: the prompt's positions
    (system and user turns, image tokens) need none, and a 150k-word vocabulary makes them the largest tensor.
    """
    labels = inputs["labels"]
    first = max(1, int((labels != IGNORE).int().argmax(dim=1).min()))
    keep = labels.shape[1] - first + 1  # positions first-1 … end; position p predicts token p+1
    logits = model(**{k: v for k, v in inputs.items() if k != "labels"}, use_cache=False, logits_to_keep=keep).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, first:].flatten(),
                           ignore_index=IGNORE, reduction="sum")


def deepspeed_config(config: SFTConfig) -> dict[str, Any]:
    """The DeepSpeed config of an SFT run; optimizer and scheduler are ours (passed to deepspeed.initialize)."""
    zero: dict[str, Any] = {"stage": config.zero_stage, "contiguous_gradients": True, "overlap_comm": config.use_gpu}
    if config.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True  # export gathers the full weights on rank 0
    return {
        "train_micro_batch_size_per_gpu": config.micro_batch_size,
        "gradient_accumulation_steps": config.grad_accum_steps,
        "train_batch_size": config.global_batch_size,
        "gradient_clipping": config.optimizer.max_grad_norm,
        "bf16": {"enabled": config.bf16},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # torch's AdamW, on CPU and GPU alike
        "steps_per_print": 2**31 - 1,  # our own metrics say it
        "wall_clock_breakdown": False,
    }


class DDPStrategy:
    """torch DistributedDataParallel (through Ray Train's prepare_model); autocast to bf16 on GPU when asked."""

    def __init__(self, model: torch.nn.Module, config: SFTConfig, total_steps: int):
        import ray.train.torch

        self.config = config
        self.optimizer, self.scheduler = build_optimizer(model, config.optimizer, total_steps)
        self.model = ray.train.torch.prepare_model(model)  # DDP when there are several workers
        self.module = model
        self.device = next(model.parameters()).device
        self.world_size = ray.train.get_context().get_world_size()

    def loss_scale(self, global_tokens: int) -> float:
        return self.world_size / global_tokens

    def micro_step(self, inputs: dict[str, torch.Tensor], scale: float, *, last: bool) -> float:
        """Forward and backward of one micro-batch; returns its token-loss sum."""
        # Gradients are all-reduced once per optimizer step, on its last micro-batch.
        sync = contextlib.nullcontext() if last or self.world_size == 1 else self.model.no_sync()
        with sync:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.bf16):
                loss = token_loss_sum(self.model, inputs)
            (loss * scale).backward()
        return loss.item()

    def optimizer_step(self) -> float:
        """Clip, step, schedule; returns the gradient norm before clipping."""
        grad_norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.config.optimizer.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm)

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save(self, directory: Path, rank: int) -> None:
        if rank == 0:  # the replicas are identical: one copy is the whole state
            torch.save({"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict()}, directory / TORCH_STATE)

    def load(self, directory: Path) -> None:
        state = torch.load(directory / TORCH_STATE, map_location=self.device, weights_only=True)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()


class DeepSpeedStrategy:
    """A DeepSpeed engine over the torch process group Ray Train set up (NCCL on GPU, gloo on CPU)."""

    def __init__(self, model: torch.nn.Module, config: SFTConfig, total_steps: int):
        import deepspeed
        import ray.train

        optimizer, scheduler = build_optimizer(model, config.optimizer, total_steps)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(config),
            dist_init_required=False,
        )
        self.module = self.engine.module
        self.world_size = ray.train.get_context().get_world_size()
        self.accum = config.grad_accum_steps

    def loss_scale(self, global_tokens: int) -> float:
        return self.world_size * self.accum / global_tokens

    def micro_step(self, inputs: dict[str, torch.Tensor], scale: float, *, last: bool) -> float:
        loss = token_loss_sum(self.engine, inputs)
        self.engine.backward(loss * scale)
        self.engine.step()  # steps the optimizer (clips, schedules) only at the accumulation boundary
        return loss.item()

    def optimizer_step(self) -> float:
        """The step itself happened in the last micro_step; returns the gradient norm DeepSpeed measured."""
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save(self, directory: Path, rank: int) -> None:
        # Collective: each rank writes its own optimizer partition; Ray Train merges the ranks' directories.
        self.engine.save_checkpoint(str(directory), tag=DEEPSPEED_TAG)

    def load(self, directory: Path) -> None:
        path, _ = self.engine.load_checkpoint(str(directory), tag=DEEPSPEED_TAG)
        if path is None:
            raise FileNotFoundError(f"{directory}: no DeepSpeed checkpoint '{DEEPSPEED_TAG}' to resume from")

    def export_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The full weights (collective: under ZeRO-3 every rank takes part in the gather; rank 0 gets them)."""
        if self.engine.zero_optimization_stage() == 3:
            return self.engine._zero3_consolidated_16bit_state_dict()
        return self.module.state_dict()


def make_strategy(model: torch.nn.Module, config: SFTConfig, total_steps: int) -> DDPStrategy | DeepSpeedStrategy:
    cls = DeepSpeedStrategy if config.strategy == "deepspeed" else DDPStrategy
    return cls(model, config, total_steps)
