"""`tcae-ldm fid-stats`: reference FID statistics (mu, sigma .npz) of an image folder or the demo data.

    tcae-ldm fid-stats --images /data/imagenet/train --image-size 256 --features inception --out ref.npz
    tcae-ldm fid-stats --demo --split train --features demo-classifier --out runs/demo/fid_ref.npz

Folder images are found recursively (any layout) and centre-cropped as ADM does, so the statistics match
the crops that the autoencoder and the DiT were trained on. The file records the feature network;
FIDMetric refuses to score against statistics made with another one.
"""
from __future__ import annotations

import os

import torch
from torch.utils.data import DataLoader

from tcae_ldm.commands import CommandParser
from tcae_ldm.data.demo import demo_split_tensors
from tcae_ldm.data.images import CroppedImageFiles, find_images
from tcae_ldm.metrics.features import FEATURE_EXTRACTORS, build_feature_extractor
from tcae_ldm.metrics.fid import accumulate_stats


def main(argv: list[str] | None = None) -> None:
    p = CommandParser(prog="tcae-ldm fid-stats", description=__doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", metavar="DIR", help="image folder, searched recursively")
    src.add_argument("--demo", action="store_true", help="the embedded demo photos (DemoPhotosDataModule)")
    p.add_argument("--split", choices=["train", "val"], default="train", help="demo split (default: train)")
    p.add_argument("--image-size", type=int, default=None, help="centre-crop size (default: 256; demo: 64)")
    p.add_argument("--features", default="inception", help=f"feature network: {', '.join(FEATURE_EXTRACTORS)}")
    p.add_argument("--weights", default=None, help="weight file of the feature network (default: its cache)")
    p.add_argument("--out", required=True, help="output .npz (mu, sigma, features, count)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--max-images", type=int, default=None, help="use only the first N images (sorted order)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)

    try:  # missing weights or images fail here, before any work, with one message
        extractor = build_feature_extractor(args.features, args.weights)
        paths = None if args.demo else find_images(args.images)[: args.max_images]
    except (FileNotFoundError, KeyError) as e:
        p.error(str(e.args[0]) if isinstance(e, KeyError) else str(e))  # KeyError's str() adds quotes
    if args.demo:
        size = args.image_size or 64
        images = demo_split_tensors(size)[args.split][0][: args.max_images]
        batches = images.split(args.batch_size)
        source = f"demo:{args.split}"
    else:
        size = args.image_size or 256
        batches = DataLoader(CroppedImageFiles(paths, size), batch_size=args.batch_size, num_workers=args.num_workers)
        source = os.path.abspath(args.images)
    stats = accumulate_stats(batches, extractor, args.device)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)) or ".", exist_ok=True)
    stats.save(args.out, features=extractor.name, source=source, image_size=size)
    print(f"wrote {args.out}: {extractor.name} statistics ({extractor.dim}-d) of {stats.count} images "
          f"from {source} at {size}x{size}")


if __name__ == "__main__":
    main()
