"""What a run writes besides its metrics: its folder (the logger's), image grids saved there and sent to every logger
that takes images, and the gradient norms it logs."""
from __future__ import annotations

import os
import shutil

import torch
from torchvision.utils import make_grid, save_image


def log_dir(trainer) -> str:
    """The run's folder: the first logger's log_dir (CSV, TensorBoard), else the trainer's default_root_dir."""
    logger = trainer.logger
    return getattr(logger, "log_dir", None) or trainer.default_root_dir


def save_grid(trainer, images: torch.Tensor, subdir: str, step: int, tag: str, nrow: int) -> str:
    """images (N, 3, H, W) in [-1, 1] -> <log dir>/<subdir>/step{step:07d}.png, also sent to every logger that takes
    images; returns the file's path."""
    grid = make_grid(images.detach().float().clamp(-1, 1).cpu(), nrow=nrow, normalize=True, value_range=(-1, 1))
    out_dir = os.path.join(log_dir(trainer), subdir)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"step{step:07d}.png")
    save_image(grid, path)
    for logger in trainer.loggers:
        log_image(logger, tag, grid, step, path, subdir)
    return path


def log_image(logger, tag: str, grid: torch.Tensor, step: int, path: str, subdir: str) -> None:
    """Send a grid (3, H, W) in [0, 1] to a logger through the API it has: `log_image(key, images, step)` (W&B,
    Neptune), `experiment.add_image` (TensorBoard); a logger that only writes files (CSV) gets a copy of the PNG in
    its own folder when that is not where the PNG already is."""
    if callable(getattr(logger, "log_image", None)):
        image = grid.mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()  # (H, W, 3): unambiguous for any API
        logger.log_image(key=tag, images=[image], step=step)
        return
    experiment = getattr(logger, "experiment", None)
    if callable(getattr(experiment, "add_image", None)):
        experiment.add_image(tag, grid, step)
        return
    folder = getattr(logger, "log_dir", None)
    if folder and os.path.abspath(os.path.join(folder, subdir)) != os.path.abspath(os.path.dirname(path)):
        os.makedirs(os.path.join(folder, subdir), exist_ok=True)
        shutil.copyfile(path, os.path.join(folder, subdir, os.path.basename(path)))


def grad_norm(params) -> torch.Tensor:
    """The 2-norm of all gradients of params together (what clip_grad_norm_ measures); 0 when none has one."""
    grads = [p.grad.detach() for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
