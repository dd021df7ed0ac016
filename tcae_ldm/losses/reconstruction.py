"""Reconstruction loss L_rec = L1 + lambda_p * LPIPS + lambda_q * GAN, which owns the discriminator.

The adversarial term is a hinge loss on a PatchGAN critic, off until ``disc_start`` generator steps, with
the optional VQGAN adaptive weight ||grad L_nll|| / ||grad L_gan|| at the decoder's last layer. Every loss
is computed in fp32, also under bf16 autocast.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from tcae_ldm.losses.lpips import FrozenLPIPS, build_lpips
from tcae_ldm.models.discriminator import PatchDiscriminator
from tcae_ldm.utils.precision import autocast_off


@dataclass
class ReconstructionLossConfig:
    """Weights and switches of L_rec; every field is a config key under `model.loss`.

    Args:
        l1_weight: weight of the pixel L1 term.
        lpips_weight: lambda_p; 0 turns LPIPS off (no VGG16 weights needed).
        lpips_trunk: VGG16 trunk: 'pretrained' (torchvision's cache), 'random' (tests), or a file.
        gan_weight: lambda_q; 0 removes the discriminator.
        disc_start: generator steps before the GAN term and the critic's updates start.
        adaptive_gan_weight: scale lambda_q by ||grad L_nll|| / ||grad L_gan|| at the decoder's last layer (VQGAN).
        max_adaptive_weight: clamp of that ratio.
        disc_channels: PatchGAN base width.
        disc_layers: PatchGAN stride-2 layers.
        disc_norm: 'group' (DDP-safe with small batches), 'batch' or 'none'.
    """
    l1_weight: float = 1.0
    lpips_weight: float = 1.0
    lpips_trunk: str = "pretrained"
    gan_weight: float = 0.1
    disc_start: int = 0
    adaptive_gan_weight: bool = True
    max_adaptive_weight: float = 1e4
    disc_channels: int = 64
    disc_layers: int = 3
    disc_norm: str = "group"


# Checkpoints keep this config in their hyper-parameters; allow it under torch.load(weights_only=True).
torch.serialization.add_safe_globals([ReconstructionLossConfig])


def _fp32(*xs):
    return [x.float() for x in xs]


class ReconstructionLoss(nn.Module):
    """L1 + LPIPS + hinge GAN with adaptive weight; generator and discriminator losses are separate calls."""

    def __init__(self, cfg: ReconstructionLossConfig | None = None):
        super().__init__()
        cfg = self.cfg = cfg or ReconstructionLossConfig()
        self.l1_weight, self.lpips_weight, self.gan_weight = cfg.l1_weight, cfg.lpips_weight, cfg.gan_weight
        self.disc_start, self.adaptive = cfg.disc_start, cfg.adaptive_gan_weight
        self.lpips: FrozenLPIPS | None = None  # built by load_lpips(): the module builds without the VGG16 file
        self.discriminator = PatchDiscriminator(channels=cfg.disc_channels, num_layers=cfg.disc_layers,
                                                norm=cfg.disc_norm) if cfg.gan_weight > 0 else None

    def load_lpips(self) -> FrozenLPIPS | None:
        """The LPIPS network when lpips_weight > 0, built on first call; a missing VGG16 file raises here."""
        if self.lpips is None and self.lpips_weight > 0:
            self.lpips = FrozenLPIPS(build_lpips(self.cfg.lpips_trunk))
        return self.lpips

    def gan_active(self, step: int) -> bool:
        return self.discriminator is not None and step >= self.disc_start

    def critic(self, x, frozen: bool = False):
        """PatchGAN logits in fp32. frozen=True reads the critic's weights detached, so the generator's loss
        sends no gradient into the discriminator and both losses can share one backward pass (one DDP
        forward, one backward)."""
        with autocast_off(x.device):
            if not frozen:
                return self.discriminator(x.float()).float()
            params = {n: p.detach() for n, p in self.discriminator.named_parameters()}
            params.update(self.discriminator.named_buffers())
            return torch.func.functional_call(self.discriminator, params, (x.float(),)).float()

    def perceptual(self, x, x_rec):
        """Mean LPIPS distance in fp32 (0 when LPIPS is off)."""
        lpips = self.load_lpips()
        return x.new_zeros(()) if lpips is None else lpips(x, x_rec).mean()

    def _adaptive_weight(self, nll, g_loss, last_layer):
        g_nll = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
        g_gan = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
        w = g_nll.norm() / (g_gan.norm() + 1e-4)
        return w.clamp(0.0, self.cfg.max_adaptive_weight).detach()

    def generator_loss(self, x, x_rec, step: int, last_layer: torch.Tensor | None = None):
        """(loss, logs) for the autoencoder update; x, x_rec: (B, 3, H, W) in [-1, 1]."""
        x, x_rec = _fp32(x, x_rec)
        l1 = (x - x_rec).abs().mean()
        lp = self.perceptual(x, x_rec)
        nll = self.l1_weight * l1 + self.lpips_weight * lp
        logs = {"l1": l1.detach(), "lpips": lp.detach()}
        if not self.gan_active(step):
            return nll, logs
        g_loss = -self.critic(x_rec, frozen=True).mean()
        w = self._adaptive_weight(nll, g_loss, last_layer) if (self.adaptive and last_layer is not None
                                                               and torch.is_grad_enabled()) else x.new_ones(())
        logs.update(gan_g=g_loss.detach(), gan_weight=w * self.gan_weight)
        return nll + self.gan_weight * w * g_loss, logs

    def discriminator_loss(self, x, x_rec, step: int):
        """(hinge loss, logs) for the critic update; x_rec is detached here."""
        real, fake = self.critic(x), self.critic(x_rec.detach())
        loss = 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())
        return loss, {"disc": loss.detach(), "logits_real": real.mean().detach(),
                      "logits_fake": fake.mean().detach()}
