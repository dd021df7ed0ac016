"""DiT's DDPM objective: epsilon prediction, linear betas 1e-4..0.02 over 1000 steps, simple MSE loss.

Only the simple loss is implemented: with a learned-sigma DiT (``learn_sigma=True``) the extra output
channels are ignored here, the VLB term that trains them is not, and sampling uses the fixed (posterior)
variance. Build DiTs for this objective with ``learn_sigma=False`` unless the sigma head is wanted for
other reasons.

Sampling runs through diffusers' DDPM / DDIM schedulers built in code (no download). The model sees the
integer step divided by ``num_timesteps``, i.e. t in [0, 1) like the flow objective, so one DiT
``time_scale`` (1000) serves both and reproduces the original DiT's embedding of integer steps.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler

from .guidance import ModelFn, check_cfg, guided_prediction

DDPM_SAMPLERS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}


class DDPM:
    """Epsilon-prediction DDPM objective with diffusers DDPM / DDIM sampling."""

    def __init__(self, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        self.num_timesteps = num_timesteps
        self.scheduler_config = dict(
            num_train_timesteps=num_timesteps,
            beta_start=beta_start,
            beta_end=beta_end,
            beta_schedule="linear",
            prediction_type="epsilon",
            clip_sample=False,  # latents are not bounded to [-1, 1]
        )
        # The training schedule is read from the sampling scheduler so the two cannot drift apart.
        self.alphas_cumprod = DDPMScheduler(**self.scheduler_config).alphas_cumprod.float()  # (T,)

    def make_scheduler(self, sampler: str):
        """A fresh diffusers scheduler (they keep per-run state in set_timesteps)."""
        if sampler not in DDPM_SAMPLERS:
            raise ValueError(f"sampler must be one of {sorted(DDPM_SAMPLERS)}, got {sampler!r}")
        return DDPM_SAMPLERS[sampler](**self.scheduler_config)

    def model_time(self, steps: torch.Tensor) -> torch.Tensor:
        """Integer steps (B,) -> model time in [0, 1)."""
        return steps.float() / self.num_timesteps

    # --- training -------------------------------------------------------------------------------------

    def interpolate(self, x: torch.Tensor, noise: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        """q(x_t | x): sqrt(abar_t) x + sqrt(1 - abar_t) noise for integer steps (B,)."""
        abar = self.alphas_cumprod.to(x.device)[steps].view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
        return abar.sqrt() * x + (1 - abar).sqrt() * noise

    def loss(
        self,
        model_fn: ModelFn,
        x: torch.Tensor,
        y: torch.Tensor,
        noise: torch.Tensor | None = None,
        t: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Scalar MSE between predicted and true noise; t are integer steps (drawn uniformly if None)."""
        noise = torch.randn_like(x) if noise is None else noise
        t = torch.randint(0, self.num_timesteps, (x.shape[0],), device=x.device) if t is None else t
        pred = model_fn(self.interpolate(x, noise, t), self.model_time(t), y)[:, : x.shape[1]]
        return F.mse_loss(pred.float(), noise.float())

    # --- sampling -------------------------------------------------------------------------------------

    @torch.no_grad()
    def sample(
        self,
        model_fn: ModelFn,
        noise: torch.Tensor,
        y: torch.Tensor,
        steps: int = 250,
        sampler: str = "ddpm",
        cfg_scale: float = 1.0,
        cfg_interval: Sequence[float] | None = None,
        null_label: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Denoise from pure noise in ``steps`` scheduler steps; cfg_interval is in model time [0, 1)."""
        check_cfg(cfg_scale, null_label)
        scheduler = self.make_scheduler(sampler)
        scheduler.set_timesteps(steps, device=noise.device)
        x = noise * scheduler.init_noise_sigma
        for step in scheduler.timesteps:
            t = self.model_time(torch.full((x.shape[0],), int(step), device=x.device))
            eps = guided_prediction(model_fn, x, t, y, cfg_scale, null_label, cfg_interval)
            x = scheduler.step(eps.to(x.dtype), step, x, generator=generator).prev_sample
        return x
