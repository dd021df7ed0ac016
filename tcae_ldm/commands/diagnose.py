"""`tcae-ldm diagnose`: linear probes (A1 on image tokens, A2 on latents) and the latent spectrum of a trained
autoencoder, on the demo photos or an ImageNet-style folder.

    tcae-ldm diagnose --ckpt runs/demo/tcae/checkpoints/last.ckpt --out runs/demo/diagnostics
    tcae-ldm diagnose --ckpt last.ckpt --data-root /data/imagenet --image-size 256 --max-images 10000 --out diag
"""
from __future__ import annotations

import os

import torch

from tcae_ldm.commands import CommandParser, fail
from tcae_ldm.data.demo import DemoPhotosDataModule
from tcae_ldm.data.images import ImageFolderDataModule
from tcae_ldm.lit.loading import CheckpointError, load_autoencoder_module
from tcae_ldm.metrics.diagnostics import (
    TOKEN_STAGES,
    diagnose,
    format_table,
    write_report,
)


def build_datamodule(args, image_size: int):
    if args.data_root:
        return ImageFolderDataModule(root=args.data_root, image_size=args.image_size or image_size,
                                     global_batch_size=args.batch_size, num_workers=args.num_workers, hflip=False)
    return DemoPhotosDataModule(image_size=args.image_size or image_size, train_per_class=args.train_per_class,
                                val_per_class=args.val_per_class, global_batch_size=args.batch_size, hflip=False,
                                num_workers=args.num_workers)


def main(argv: list[str] | None = None) -> dict:
    p = CommandParser(prog="tcae-ldm diagnose", description=__doc__)
    p.add_argument("--ckpt", required=True, help="AutoencoderModule checkpoint; EMA weights are used when present")
    p.add_argument("--out", required=True, help="folder for diagnostics.json and diagnostics.md")
    p.add_argument("--data", choices=["demo"], default="demo", help="the bundled photos, unless --data-root")
    p.add_argument("--data-root", help="ImageNet-style folder with train/<class>/ and val/<class>/ instead of demo")
    p.add_argument("--image-size", type=int, help="image side (default: the network's training size)")
    p.add_argument("--tokens", choices=TOKEN_STAGES, default="fine", help="image tokens probed for A1")
    p.add_argument("--max-images", type=int, help="at most this many images per split (seeded random subset)")
    p.add_argument("--train-per-class", type=int, default=128, help="demo training crops per class")
    p.add_argument("--val-per-class", type=int, default=16, help="demo validation crops per class")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    try:
        module = load_autoencoder_module(args.ckpt, metrics_lpips=None, metrics_fid=None)
    except CheckpointError as e:
        fail("tcae-ldm diagnose", str(e))
    net = module.eval_net.to(args.device)
    image_size = args.image_size or getattr(module.net, "image_size", None)
    if image_size is None:
        fail("tcae-ldm diagnose", f"{module.hparams.net} has no training image size of its own: pass --image-size")
    dm = build_datamodule(args, image_size)
    results = {"checkpoint": os.path.abspath(args.ckpt), "step": module.step_count,
               **diagnose(net, dm, tokens=args.tokens, max_images=args.max_images, batch_size=args.batch_size,
                          num_workers=args.num_workers, progress=True)}
    write_report(results, args.out)
    print(format_table(results))
    return results
