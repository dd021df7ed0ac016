"""Rectified flow: linear interpolant with velocity prediction (SiT / SD3 convention), ODE samplers, CFG.

Convention: t = 0 is data, t = 1 is noise; x_t = (1 - t) x + t eps and the model predicts v = eps - x,
so sampling integrates dx/dt = v from t = 1 down to t = 0. The model sees t in [0, 1] (DiT's
``time_scale=1000`` maps that onto the usual sinusoid range).

``model_fn(x, t, y) -> prediction`` is any callable (a DiT, its EMA copy, a closed-form field in tests);
only the first ``x.shape[1]`` channels of its output are used, so a learned-sigma DiT also fits.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .guidance import ModelFn, check_cfg, guided_prediction

#################################################################################
#                                 Rectified flow                                #
#################################################################################

TIME_SAMPLINGS = ("uniform", "logit_normal")
FLOW_SAMPLERS = ("euler", "heun")


class RectifiedFlow:
    """Linear-interpolant flow matching objective with Euler / Heun ODE sampling."""

    def __init__(self, time_sampling: str = "uniform", logit_mean: float = 0.0, logit_std: float = 1.0):
        """time_sampling: "uniform" t ~ U(0, 1), or "logit_normal" t = sigmoid(N(logit_mean, logit_std))
        (SD3; concentrates training on the middle of the path where the velocity is hardest to predict)."""
        if time_sampling not in TIME_SAMPLINGS:
            raise ValueError(f"time_sampling must be one of {TIME_SAMPLINGS}, got {time_sampling!r}")
        self.time_sampling = time_sampling
        self.logit_mean = logit_mean
        self.logit_std = logit_std

    # --- training -------------------------------------------------------------------------------------

    def sample_t(self, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Training timesteps (n,) in [0, 1]."""
        if self.time_sampling == "uniform":
            return torch.rand(n, device=device)
        return torch.sigmoid(self.logit_mean + self.logit_std * torch.randn(n, device=device))

    @staticmethod
    def interpolate(x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = (1 - t) x + t noise, t (B,) broadcast over (B, C, H, W)."""
        t = t.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
        return (1 - t) * x + t * noise

    @staticmethod
    def target(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Velocity d x_t / dt = noise - x."""
        return noise - x

    def loss(
        self,
        model_fn: ModelFn,
        x: torch.Tensor,
        y: torch.Tensor,
        noise: torch.Tensor | None = None,
        t: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Scalar MSE between the predicted and true velocity (noise and t drawn when not given)."""
        noise = torch.randn_like(x) if noise is None else noise
        t = self.sample_t(x.shape[0], x.device) if t is None else t
        pred = model_fn(self.interpolate(x, noise, t), t, y)[:, : x.shape[1]]
        return F.mse_loss(pred.float(), self.target(x, noise).float())  # fp32 even under bf16 autocast

    # --- sampling -------------------------------------------------------------------------------------

    @staticmethod
    def timesteps(steps: int, shift: float = 1.0, device: torch.device | str = "cpu") -> torch.Tensor:
        """steps + 1 times from 1 to 0; shift > 1 spends more steps near the noise end (SD3's shift)."""
        t = torch.linspace(1.0, 0.0, steps + 1, device=device)
        return shift * t / (1 + (shift - 1) * t)

    @torch.no_grad()
    def sample(
        self,
        model_fn: ModelFn,
        noise: torch.Tensor,
        y: torch.Tensor,
        steps: int = 50,
        sampler: str = "euler",
        cfg_scale: float = 1.0,
        cfg_interval: Sequence[float] | None = None,
        null_label: int | None = None,
        shift: float = 1.0,
        guide_channels: int | None = None,
    ) -> torch.Tensor:
        """Integrate from noise (t = 1) to data (t = 0); Heun costs two model calls per step."""
        if sampler not in FLOW_SAMPLERS:
            raise ValueError(f"sampler must be one of {FLOW_SAMPLERS}, got {sampler!r}")
        check_cfg(cfg_scale, null_label)
        ts = self.timesteps(steps, shift, noise.device)
        x = noise

        def velocity(x: torch.Tensor, t: float) -> torch.Tensor:
            t_batch = torch.full((x.shape[0],), t, device=x.device)
            out = guided_prediction(model_fn, x, t_batch, y, cfg_scale, null_label, cfg_interval, guide_channels)
            return out[:, : x.shape[1]].to(x.dtype)

        for t_cur, t_next in zip(ts[:-1].tolist(), ts[1:].tolist()):
            dt = t_next - t_cur  # negative: we go towards the data
            d = velocity(x, t_cur)
            x_next = x + dt * d
            if sampler == "heun":  # trapezoidal correction with the slope at the Euler endpoint
                x_next = x + dt * 0.5 * (d + velocity(x_next, t_next))
            x = x_next
        return x
