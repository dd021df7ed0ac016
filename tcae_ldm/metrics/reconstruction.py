"""Reconstruction metrics: PSNR, SSIM (on [0, 1] images), LPIPS (named by its backbone) and rFID (named by its
feature network), DDP-reduced; and the bicubic baseline with the latent's float budget, the number any learned
compressor has to beat."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchmetrics import MeanMetric
from torchmetrics.image import StructuralSimilarityIndexMeasure

from tcae_ldm.metrics.fid import FrechetStats, frechet_distance, metric_name


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of (B, 3, H, W) images in [0, 1]."""
    mse = (a.float() - b.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


class ReconstructionMetrics(nn.Module):
    """Accumulates per-image PSNR / SSIM / LPIPS over a validation epoch; compute() returns a name -> value dict."""

    def __init__(self, lpips=None, fid=None):
        """lpips: a callable (x, y) -> per-image distances, e.g. tcae_ldm.losses.lpips.FrozenLPIPS;
        fid: a tcae_ldm.metrics.fid.ReconstructionFID."""
        super().__init__()
        self.psnr_mean = MeanMetric()  # per-image PSNR averaged over images, as autoencoder papers report it
        self.ssim = StructuralSimilarityIndexMeasure(data_range=1.0)
        self.lpips_mean = MeanMetric()
        self.lpips, self.fid = lpips, fid

    @torch.no_grad()
    def update(self, x: torch.Tensor, x_rec: torch.Tensor) -> None:
        """x, x_rec: (B, 3, H, W) in [-1, 1]."""
        a, b = ((x.float() + 1) / 2).clamp(0, 1), ((x_rec.float() + 1) / 2).clamp(0, 1)
        self.psnr_mean.update(psnr(a, b))
        self.ssim.update(b, a)
        if self.lpips is not None:
            self.lpips_mean.update(self.lpips(x, x_rec.clamp(-1, 1)))
        if self.fid is not None:
            self.fid.update(x, x_rec)

    def compute(self) -> dict[str, torch.Tensor]:
        out = {"psnr": self.psnr_mean.compute(), "ssim": self.ssim.compute()}
        if self.lpips is not None:
            out["lpips_vgg"] = self.lpips_mean.compute()
        if self.fid is not None:
            out[self.fid.name] = torch.tensor(self.fid.compute())  # every rank: the statistics are all-reduced
            # the number of images behind it, beside it: a rFID of part of the split never passes for the whole
            out["rfid_images"] = torch.tensor(float(self.fid.num_images))
        return out

    def reset(self) -> None:
        for m in (self.psnr_mean, self.ssim, self.lpips_mean):
            m.reset()
        if self.fid is not None:
            self.fid.reset()


def bicubic_side(latent_floats: int) -> int:
    """Side of the square RGB image holding at most latent_floats values."""
    return int(math.isqrt(latent_floats // 3))


def bicubic_roundtrip(x: torch.Tensor, side: int) -> torch.Tensor:
    small = F.interpolate(x, size=(side, side), mode="bicubic", antialias=True, align_corners=False)
    return F.interpolate(small, size=x.shape[-2:], mode="bicubic", align_corners=False).clamp(-1, 1)


@torch.no_grad()
def evaluate_against_bicubic(net, loader, image_size: int, extractor=None) -> dict:
    """PSNR / SSIM of an autoencoder (forward(x).sample: its reconstruction) and of the bicubic baseline with the same float
    budget, on every batch of `loader`; with a feature `extractor`, also the rFID of each under that network, so that
    both rows of the report are measured on the same images by the same instrument."""
    net = net.eval()
    c, h, w = net.latent_shape(image_size)
    side = bicubic_side(c * h * w)
    metrics = (ReconstructionMetrics(), ReconstructionMetrics())  # autoencoder, bicubic
    # rFID as ReconstructionFID computes it, with the originals' features extracted once for both rows
    real, fakes = (FrechetStats(extractor.dim), (FrechetStats(extractor.dim), FrechetStats(extractor.dim))) \
        if extractor is not None else (None, ())
    for batch in loader:
        x = batch["image"]
        if real is not None:
            real.update(extractor(x))
        for i, x_rec in enumerate((net(x).sample, bicubic_roundtrip(x, side))):
            metrics[i].update(x, x_rec)
            if real is not None:
                fakes[i].update(extractor(x_rec.clamp(-1, 1)))
    results = [{k: round(float(v), 4) for k, v in m.compute().items()} for m in metrics]
    for result, fake in zip(results, fakes):
        result[metric_name("rfid", extractor.name)] = round(frechet_distance(*fake.mean_cov(), *real.mean_cov()), 4)
    return {"latent_shape": [c, h, w], "latent_floats": c * h * w, "bicubic_side": side,
            "bicubic_floats": 3 * side * side, "images": int(metrics[0].psnr_mean.weight.item()),
            "autoencoder": results[0], "bicubic": results[1]}
