"""`tcae-ldm fid-stats`: reference FID statistics (mu, sigma .npz) of an image folder or the demo data.

    tcae-ldm fid-stats --images /data/imagenet/train --image-size 256 --features inception --out ref.npz
    tcae-ldm fid-stats --demo --split train --features demo-classifier --out runs/demo/fid_ref.npz

Folder images are found recursively (any layout) and centre-cropped as ADM does, so the statistics match
the crops that the autoencoder and the DiT were trained on. The file records the feature network and the image
size; FIDMetric and `tcae-ldm fid` refuse to score against statistics made with another network, and `fid`
samples of another size. It also keeps the features of a seeded random subset of the images (`activations`,
10000 by default, ADM's reference-batch size) for precision / recall.
"""
from __future__ import annotations

import os

import numpy as np
import torch
from torch.utils.data import DataLoader

from tcae_ldm.commands import CommandParser, fail
from tcae_ldm.data.demo import demo_split_tensors
from tcae_ldm.data.images import CorruptImageError, CroppedImageFiles, find_images
from tcae_ldm.metrics.features import FEATURE_EXTRACTORS, build_feature_extractor
from tcae_ldm.metrics.fid import extract_features

PROG = "tcae-ldm fid-stats"


def main(argv: list[str] | None = None) -> None:
    p = CommandParser(prog=PROG, description=__doc__)
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
    p.add_argument("--prc-images", type=int, default=10000,
                   help="keep the features of this many images (a seeded random subset) for precision/recall; 0: none")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)

    try:  # missing weights or images fail here, before any work, with one message
        extractor = build_feature_extractor(args.features, args.weights)
        paths = None if args.demo else find_images(args.images)[: args.max_images]
    except (FileNotFoundError, KeyError) as e:
        fail(PROG, str(e.args[0]) if isinstance(e, KeyError) else str(e))  # KeyError's str() adds quotes
    if args.batch_size < 1:
        fail(PROG, f"--batch-size must be at least 1, got {args.batch_size}")
    if args.demo:
        size = args.image_size or 64
        images = demo_split_tensors(size)[args.split][0][: args.max_images]
        batches, count = images.split(args.batch_size), len(images)
        source = f"demo:{args.split}"
    else:
        size = args.image_size or 256
        batches = DataLoader(CroppedImageFiles(paths, size), batch_size=args.batch_size, num_workers=args.num_workers)
        source, count = os.path.abspath(args.images), len(paths)
    keep = min(max(args.prc_images, 0), count)
    subset = set(np.random.default_rng(0).choice(count, keep, replace=False).tolist()) if keep else False
    try:
        found = extract_features(batches, extractor, args.device, keep=subset, total=len(batches),
                                 desc=f"{extractor.name} features")
    except CorruptImageError as e:  # from a loader worker the message ends with the original one
        fail(PROG, str(e).strip().splitlines()[-1])
    extra = {"activations": found.features.numpy()} if keep else {}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)) or ".", exist_ok=True)
    found.stats.save(args.out, features=extractor.name, source=source, image_size=size, **extra)
    print(f"wrote {args.out}: {extractor.name} statistics ({extractor.dim}-d) of {found.stats.count} images "
          f"from {source} at {size}x{size}, features of {keep} of them for precision/recall")


if __name__ == "__main__":
    main()
