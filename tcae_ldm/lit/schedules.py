"""Learning-rate schedules shared by the Lightning modules."""
from __future__ import annotations

import math

import torch


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0) -> float:
    """LR factor: linear warm-up over warmup_steps, then cosine decay to min_lr_ratio at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Set every group's LR to factor x its base LR (remembered in the group, so it is in the checkpoint).

    A pure function of the step counter, unlike a stateful LR scheduler: resuming and optimizers that do
    not step on every iteration (a critic before disc_start) need no extra bookkeeping."""
    for group in optimizer.param_groups:
        group.setdefault("base_lr", group["lr"])
        group["lr"] = group["base_lr"] * factor


def param_groups(module: torch.nn.Module) -> list[dict]:
    """Weight decay on matrices and conv kernels only; none on biases, norms, tokens and 1-D parameters."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith("_token") or "pos." in name else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
