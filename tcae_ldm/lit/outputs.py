"""What a run writes besides its metrics: its folder (the logger's), image grids saved there and sent to every logger
that takes images, and the gradient norms it logs."""
from __future__ import annotations

import os

import torch
from torchvision.utils import make_grid, save_image


def log_dir(trainer) -> str:
    """The run's folder: the first logger's log_dir (CSV, TensorBoard), else the trainer's default_root_dir."""
    logger = trainer.logger
    return getattr(logger, "log_dir", None) or trainer.default_root_dir


def save_grid(trainer, images: torch.Tensor, subdir: str, step: int, tag: str, nrow: int) -> str:
    """images (N, 3, H, W) in [-1, 1] -> <log dir>/<subdir>/step{step:07d}.png, also sent to a logger that takes
    images; returns the file's path."""
    grid = make_grid(images.detach().float().clamp(-1, 1).cpu(), nrow=nrow, normalize=True, value_range=(-1, 1))
    out_dir = os.path.join(log_dir(trainer), subdir)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"step{step:07d}.png")
    save_image(grid, path)
    exp = getattr(trainer.logger, "experiment", None)
    if hasattr(exp, "add_image"):
        exp.add_image(tag, grid, step)
    return path


def grad_norm(params) -> torch.Tensor:
    """The 2-norm of all gradients of params together (what clip_grad_norm_ measures); 0 when none has one."""
    grads = [p.grad.detach() for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
