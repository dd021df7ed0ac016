"""The two terms of DDPM's variational bound: the KL between Gaussians and the decoder's discretised Gaussian
log-likelihood (Ho et al. 2020, Nichol & Dhariwal 2021), with the arithmetic of facebookresearch/DiT's
``diffusion/diffusion_utils.py`` (itself ADM's): the same tanh approximation of the normal CDF, the same 1/255
half-bin and the same 1e-12 floors, so the learned-variance loss matches DiT's to float precision.
"""
from __future__ import annotations

import math

import torch


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats (broadcasting)."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2).square() * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Phi(x) by the tanh approximation (the one GELU uses), as ADM and DiT evaluate it."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """log P(x) per element, in nats, of a Gaussian integrated over the 8-bit bin around x (bins of width 2/255 on
    [-1, 1], the two end bins open). DiT applies it unchanged to latents at t = 0; so do we."""
    if not x.shape == means.shape == log_scales.shape:
        raise ValueError(f"shapes differ: x {tuple(x.shape)}, means {tuple(means.shape)}, "
                         f"log_scales {tuple(log_scales.shape)}")
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))  # the lowest bin: everything below x + half a bin
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))  # the highest bin: everything above
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))
