"""AdamW and the warmup + cosine learning-rate schedule, for SFT and the RL learners alike."""

from __future__ import annotations

import math

import torch
from pydantic import BaseModel, ConfigDict, Field


class OptimizerConfig(BaseModel):
    """AdamW with linear warmup, then cosine decay to `min_lr_ratio` × lr at the last step."""

    model_config = ConfigDict(extra="forbid")

    lr: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    warmup_ratio: float = Field(0.03, ge=0, lt=1)  # share of the optimizer steps spent warming up
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    max_grad_norm: float = Field(1.0, gt=0)  # gradients are clipped to this global norm
    # The vision tower (blocks and merger) trains at lr × vision_lr_ratio. A randomly initialised tower trained at
    # the full rate collapses its image tokens into one shared vector the language model uses as context; slower,
    # it keeps the per-image information while the language model learns to read it.
    vision_lr_ratio: float = Field(1.0, ge=0)


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """The learning-rate multiplier before optimizer step `step` (0-based): linear warmup, then cosine decay."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def dims(param: torch.nn.Parameter) -> int:
    """The dimensions of the parameter the model holds: under ZeRO-3 a partitioned parameter's tensor is a 1-D
    placeholder, its real shape is `ds_shape`."""
    return len(getattr(param, "ds_shape", param.shape))


def build_optimizer(
    model: torch.nn.Module, config: OptimizerConfig, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the trainable parameters: the language model at lr, the vision tower at lr × vision_lr_ratio;
    no weight decay on biases and norms (1-D tensors). The language model's group comes first (its lr is logged)."""
    vision = {id(p) for p in model.model.visual.parameters()}
    groups = []
    for in_vision, lr in ((False, config.lr), (True, config.lr * config.vision_lr_ratio)):
        params = [p for p in model.parameters() if p.requires_grad and (id(p) in vision) == in_vision]
        groups += [{"params": [p for p in params if dims(p) >= 2], "weight_decay": config.weight_decay, "lr": lr},
                   {"params": [p for p in params if dims(p) < 2], "weight_decay": 0.0, "lr": lr}]
    groups = [g for g in groups if g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps)
    warmup = math.ceil(config.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: warmup_cosine(step, warmup_steps=warmup, total_steps=total_steps, min_ratio=config.min_lr_ratio),
    )
    return optimizer, scheduler
