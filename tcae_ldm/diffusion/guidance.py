"""Classifier-free guidance, the one implementation every sampler calls (Ho & Salimans 2022; DiT's recipe).

``model_fn(x, t, y) -> prediction`` is any callable (a DiT, its EMA copy, a closed-form field in tests). Its
output may carry more channels than x (a learned-sigma DiT's variance): those are passed through from the
conditional pass, as DiT's ``forward_with_cfg`` does.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def check_cfg(cfg_scale: float, null_label: int | None) -> None:
    """Guidance needs the null class index (the DiT's num_classes): fail before sampling starts."""
    if cfg_scale != 1.0 and null_label is None:
        raise ValueError(f"cfg_scale={cfg_scale} needs null_label (the model's null class index, i.e. num_classes)")


def guided_prediction(
    model_fn: ModelFn,
    x: torch.Tensor,
    t: torch.Tensor,
    y: torch.Tensor,
    cfg_scale: float = 1.0,
    null_label: int | None = None,
    cfg_interval: Sequence[float] | None = None,
    guide_channels: int | None = None,
) -> torch.Tensor:
    """The model's output (B, C_out, H, W) for x (B, C, H, W) at times t (B,), guided when CFG is on at this t.

    CFG runs the model once on a doubled batch (labels y, then null labels); the first ``guide_channels``
    channels (default: the C channels of x) become uncond + cfg_scale * (cond - uncond), the others keep the
    conditional output. DiT's published sampler guides 3 of SD-VAE's 4 latent channels (its forward_with_cfg);
    ``guide_channels=3`` reproduces it. Outside ``cfg_interval = (t_lo, t_hi)`` only the conditional half is
    run, which saves the second pass where guidance is off (samplers pass one t per step, so the interval is
    read from t[0]).
    """
    c = guide_channels or x.shape[1]
    t_now = float(t[0])
    use_cfg = cfg_scale != 1.0 and (cfg_interval is None or cfg_interval[0] <= t_now <= cfg_interval[1])
    if not use_cfg:
        return model_fn(x, t, y)
    out = model_fn(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null_label)]))
    cond, uncond = out.chunk(2)  # (B, C_out, H, W) each
    guided = uncond[:, :c] + cfg_scale * (cond[:, :c] - uncond[:, :c])
    return torch.cat([guided, cond[:, c:]], dim=1)
