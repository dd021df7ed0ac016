"""`tcae-ldm ae-report`: an autoencoder checkpoint against the bicubic baseline with the same float budget.

The baseline downsamples each image bicubically to the largest RGB size that holds no more floats than the
latent (c * h * w), then upsamples back: the number any learned compressor has to beat.
"""
from __future__ import annotations

import json
import os

from tcae_ldm.commands import CommandParser, fail
from tcae_ldm.data.demo import DemoPhotosDataModule
from tcae_ldm.lit.loading import CheckpointError, load_autoencoder_module
from tcae_ldm.metrics.features import build_feature_extractor
from tcae_ldm.metrics.reconstruction import evaluate_against_bicubic
from tcae_ldm.utils.files import MissingWeightsError


def main(argv: list[str] | None = None) -> dict:
    p = CommandParser(prog="tcae-ldm ae-report", description=__doc__)
    p.add_argument("--ckpt", required=True, help="AutoencoderModule checkpoint (last.ckpt / best.ckpt)")
    p.add_argument("--out", required=True, help="folder for ae_report.json and ae_report.md")
    p.add_argument("--val-per-class", type=int, default=64, help="demo validation crops per class")
    p.add_argument("--image-size", type=int, default=None,
                   help="crop size (default: a TC-AE's training size; required for a DC-AE)")
    p.add_argument("--features", default=None,
                   help="an FID network (inception, demo-classifier, ...): adds rfid_<network> to both rows")
    p.add_argument("--weights", default=None, help="the FID network's weight file (demo-classifier: its .pt)")
    args = p.parse_args(argv)
    try:
        module = load_autoencoder_module(args.ckpt, metrics_lpips=None, metrics_fid=None)
    except CheckpointError as e:
        fail("tcae-ldm ae-report", str(e))
    image_size = args.image_size or getattr(module.net, "image_size", None)
    if image_size is None:
        fail("tcae-ldm ae-report", f"{module.hparams.net} has no training image size of its own: pass --image-size")
    dm = DemoPhotosDataModule(image_size=image_size, val_per_class=args.val_per_class,
                              train_per_class=1, global_batch_size=32)
    dm.setup()
    extractor = None
    if args.features:
        try:
            extractor = build_feature_extractor(args.features, weights_path=args.weights)
        except (KeyError, MissingWeightsError) as e:
            fail("tcae-ldm ae-report", str(e).strip("'\""))
    report = {"checkpoint": os.path.abspath(args.ckpt), "step": module.step_count, "net": module.hparams.net,
              **evaluate_against_bicubic(module.eval_net, dm.val_dataloader(), image_size, extractor)}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "ae_report.json"), "w") as f:
        json.dump(report, f, indent=2)
    a, b = report["autoencoder"], report["bicubic"]
    c, h, w = report["latent_shape"]
    fid = [k for k in a if k.startswith("rfid_")]
    head = "| method | floats kept | PSNR (dB) | SSIM |" + "".join(f" {k} ({report['images']} images) |" for k in fid)
    md = (f"{head}\n|---|---|---|---|{'---|' * len(fid)}\n"
          f"| {report['net']}, step {report['step']}, latent {c}x{h}x{w} | {report['latent_floats']} | "
          f"{a['psnr']:.2f} | {a['ssim']:.4f} |{''.join(f' {a[k]:.2f} |' for k in fid)}\n"
          f"| bicubic down/up via {report['bicubic_side']}x{report['bicubic_side']}x3 | {report['bicubic_floats']} "
          f"| {b['psnr']:.2f} | {b['ssim']:.4f} |{''.join(f' {b[k]:.2f} |' for k in fid)}\n")
    with open(os.path.join(args.out, "ae_report.md"), "w") as f:
        f.write(f"# Reconstruction on {report['images']} validation crops\n\n{md}")
    print(md)
    return report
