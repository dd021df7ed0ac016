"""`tcae-ldm ae-report`: an autoencoder checkpoint against the bicubic baseline with the same float budget.

    tcae-ldm ae-report --ckpt runs/demo/tcae/checkpoints/last.ckpt --out runs/demo/ae_report           # demo photos
    tcae-ldm ae-report --ckpt last.ckpt --images /data/imagenet/val --max-images 5000 --out report      # any folder
    tcae-ldm ae-report --ckpt last.ckpt --data-config configs/tcae.yaml --out report   # a config's validation split

The baseline downsamples each image bicubically to the largest RGB size that holds no more floats than the
latent (c * h * w), then upsamples back: the number any learned compressor has to beat. The images are the demo
photos' validation crops, the ADM centre crops of any image folder (searched recursively), or the validation
split of the datamodule a training config names (its `data:` section).
"""
from __future__ import annotations

import json
import os

from tcae_ldm.commands import CommandParser, fail

PROG = "tcae-ldm ae-report"


class FolderBatches:
    """{"image": (B, 3, S, S) in [-1, 1]} batches of the ADM centre crops of an image folder's files."""

    def __init__(self, root: str, image_size: int, batch_size: int, max_images: int | None, num_workers: int):
        from torch.utils.data import DataLoader

        from tcae_ldm.data.images import CroppedImageFiles, find_images

        paths = find_images(root)[:max_images]
        self.loader = DataLoader(CroppedImageFiles(paths, image_size), batch_size=batch_size, num_workers=num_workers)

    def __iter__(self):
        for x in self.loader:
            yield {"image": x.float() / 127.5 - 1}


def config_datamodule(path: str, image_size: int, batch_size: int):
    """The datamodule of a training config's `data:` section (class_path + init_args; the project's classes only),
    at image_size, ready for val_dataloader()."""
    import importlib

    from tcae_ldm.utils.files import load_yaml

    data = (load_yaml(path) or {}).get("data")
    if not isinstance(data, dict) or not str(data.get("class_path", "")).startswith("tcae_ldm.data."):
        raise ValueError(f"{path}: no `data:` section naming a datamodule of tcae_ldm.data (class_path)")
    module, _, name = data["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    args = {**(data.get("init_args") or {}), "image_size": image_size, "global_batch_size": batch_size}
    dm = cls(**{k: v for k, v in args.items() if k not in ("views",)})  # validation needs no training views
    dm.setup("validate")
    return dm


def main(argv: list[str] | None = None) -> dict:
    p = CommandParser(prog=PROG, description=__doc__)
    p.add_argument("--ckpt", required=True, help="AutoencoderModule checkpoint (last.ckpt / best.ckpt)")
    p.add_argument("--out", required=True, help="folder for ae_report.json and ae_report.md")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--images", metavar="DIR", default=None, help="any image folder instead of the demo photos")
    src.add_argument("--data-config", metavar="YAML", default=None,
                     help="a training config whose datamodule's validation split is scored")
    p.add_argument("--val-per-class", type=int, default=64, help="demo validation crops per class")
    p.add_argument("--max-images", type=int, default=None, help="--images: only the first N files (sorted order)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--image-size", type=int, default=None,
                   help="crop size (default: a TC-AE's training size; required for a DC-AE)")
    p.add_argument("--features", default=None,
                   help="an FID network (inception, demo-classifier, ...): adds rfid_<network> to both rows")
    p.add_argument("--weights", default=None, help="the FID network's weight file (demo-classifier: its .pt)")
    args = p.parse_args(argv)
    from tcae_ldm.data.demo import DemoPhotosDataModule
    from tcae_ldm.lit.loading import CheckpointError, load_autoencoder_module
    from tcae_ldm.metrics.features import build_feature_extractor
    from tcae_ldm.metrics.reconstruction import evaluate_against_bicubic
    from tcae_ldm.utils.files import MissingWeightsError

    try:
        module = load_autoencoder_module(args.ckpt, metrics_lpips=None, metrics_fid=None)
    except CheckpointError as e:
        fail(PROG, str(e))
    image_size = args.image_size or getattr(module.net, "image_size", None)
    if image_size is None:
        fail(PROG, f"{module.hparams.net} has no training image size of its own: pass --image-size")
    try:
        if args.images:
            batches, source = FolderBatches(args.images, image_size, args.batch_size, args.max_images,
                                            args.num_workers), os.path.abspath(args.images)
        elif args.data_config:
            batches = config_datamodule(args.data_config, image_size, args.batch_size).val_dataloader()
            source = f"the validation split of {args.data_config}"
        else:
            dm = DemoPhotosDataModule(image_size=image_size, val_per_class=args.val_per_class, train_per_class=1,
                                      global_batch_size=args.batch_size)
            dm.setup()
            batches, source = dm.val_dataloader(), "the demo photos' validation crops"
        extractor = build_feature_extractor(args.features, weights_path=args.weights) if args.features else None
    except (KeyError, FileNotFoundError, MissingWeightsError, ValueError) as e:
        fail(PROG, str(e).strip("'\""))
    report = {"checkpoint": os.path.abspath(args.ckpt), "step": module.step_count, "net": module.hparams.net,
              "images_from": source, **evaluate_against_bicubic(module.eval_net, batches, image_size, extractor)}
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
        f.write(f"# Reconstruction on {report['images']} {image_size}x{image_size} crops of {source}\n\n{md}")
    print(md, flush=True)
    return report
