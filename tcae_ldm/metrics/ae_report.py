"""`tcae-ldm ae-report`: an autoencoder checkpoint against the bicubic baseline with the same float budget.

The baseline downsamples each image bicubically to the largest RGB size that holds no more floats than the
latent (c * h * w), then upsamples back: the number any learned compressor has to beat.
"""
from __future__ import annotations

import argparse
import json
import math
import os

import torch
import torch.nn.functional as F

from tcae_ldm.data.demo import DemoPhotosDataModule
from tcae_ldm.lit.autoencoder import AutoencoderModule
from tcae_ldm.metrics.reconstruction import ReconstructionMetrics


def bicubic_side(latent_floats: int) -> int:
    """Side of the square RGB image holding at most latent_floats values."""
    return int(math.isqrt(latent_floats // 3))


def bicubic_roundtrip(x: torch.Tensor, side: int) -> torch.Tensor:
    small = F.interpolate(x, size=(side, side), mode="bicubic", antialias=True, align_corners=False)
    return F.interpolate(small, size=x.shape[-2:], mode="bicubic", align_corners=False).clamp(-1, 1)


@torch.no_grad()
def evaluate(module: AutoencoderModule, loader, image_size: int) -> dict:
    """PSNR / SSIM of the (EMA) autoencoder and of the bicubic baseline on every batch of `loader`."""
    net = module.eval_net.eval()
    c, h, w = net.latent_shape(image_size)
    side = bicubic_side(c * h * w)
    ae, bic = ReconstructionMetrics(), ReconstructionMetrics()
    for batch in loader:
        x = batch["image"]
        ae.update(x, net(x)[0])
        bic.update(x, bicubic_roundtrip(x, side))
    return {"latent_shape": [c, h, w], "latent_floats": c * h * w, "bicubic_side": side,
            "bicubic_floats": 3 * side * side, "images": int(ae.psnr_mean.weight.item()),
            "autoencoder": {k: round(float(v), 4) for k, v in ae.compute().items()},
            "bicubic": {k: round(float(v), 4) for k, v in bic.compute().items()}}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="tcae-ldm ae-report", description=__doc__)
    p.add_argument("--ckpt", required=True, help="AutoencoderModule checkpoint (last.ckpt / best.ckpt)")
    p.add_argument("--out", required=True, help="folder for ae_report.json and ae_report.md")
    p.add_argument("--val-per-class", type=int, default=64, help="demo validation crops per class")
    p.add_argument("--image-size", type=int, default=None,
                   help="crop size (default: a TC-AE's training size; required for a DC-AE)")
    args = p.parse_args(argv)
    module = AutoencoderModule.load_from_checkpoint(args.ckpt, map_location="cpu", metrics_lpips=None,
                                                  metrics_fid=None)
    image_size = args.image_size or getattr(module.net, "image_size", None)
    if image_size is None:
        p.error(f"{module.hparams.net} has no training image size of its own: pass --image-size")
    dm = DemoPhotosDataModule(image_size=image_size, val_per_class=args.val_per_class,
                              train_per_class=1, global_batch_size=32)
    dm.setup()
    report = {"checkpoint": os.path.abspath(args.ckpt), "step": module.step_count, "net": module.hparams.net,
              **evaluate(module, dm.val_dataloader(), image_size)}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "ae_report.json"), "w") as f:
        json.dump(report, f, indent=2)
    a, b = report["autoencoder"], report["bicubic"]
    c, h, w = report["latent_shape"]
    md = (f"| method | floats kept | PSNR (dB) | SSIM |\n|---|---|---|---|\n"
          f"| {report['net']}, step {report['step']}, latent {c}x{h}x{w} | {report['latent_floats']} | "
          f"{a['psnr']:.2f} | {a['ssim']:.4f} |\n"
          f"| bicubic down/up via {report['bicubic_side']}x{report['bicubic_side']}x3 | {report['bicubic_floats']} "
          f"| {b['psnr']:.2f} | {b['ssim']:.4f} |\n")
    with open(os.path.join(args.out, "ae_report.md"), "w") as f:
        f.write(f"# Reconstruction on {report['images']} validation crops\n\n{md}")
    print(md)
    return report
