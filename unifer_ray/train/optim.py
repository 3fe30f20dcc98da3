"""AdamW and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch

from unifer_ray.train.config import OptimizerConfig


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """The learning-rate multiplier before optimizer step `step` (0-based): linear warmup, then cosine decay."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(
    model: torch.nn.Module, config: OptimizerConfig, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the trainable parameters: the language model at lr, the vision tower at lr × vision_lr_ratio;
    no weight decay on biases and norms (1-D tensors). The language model's group comes first (its lr is logged)."""
    vision = {id(p) for p in model.model.visual.parameters()}
    groups = []
    for in_vision, lr in ((False, config.lr), (True, config.lr * config.vision_lr_ratio)):
        params = [p for p in model.parameters() if p.requires_grad and (id(p) in vision) == in_vision]
        groups += [{"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay, "lr": lr},
                   {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0, "lr": lr}]
    groups = [g for g in groups if g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps)
    warmup = math.ceil(config.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: warmup_cosine(step, warmup_steps=warmup, total_steps=total_steps, min_ratio=config.min_lr_ratio),
    )
    return optimizer, scheduler
