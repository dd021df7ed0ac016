"""`tcae-ldm fid-stats`: reference FID statistics (mu, sigma .npz) of an image folder or the demo data.

    tcae-ldm fid-stats --images /data/imagenet/train --image-size 256 --features inception --out ref.npz
    tcae-ldm fid-stats --demo --split train --features demo-classifier --out runs/demo/fid_ref.npz

Folder images are found recursively (any layout) and centre-cropped as ADM does, so the statistics match
the crops that the autoencoder and the DiT were trained on. The file records the feature network;
FIDMetric refuses to score against statistics made with another one.
"""
from __future__ import annotations

import argparse
import os
from typing import Iterable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS

from tcae_ldm.data.images import CorruptImageError
from tcae_ldm.data.transforms import center_crop_arr
from tcae_ldm.metrics.features import FEATURE_EXTRACTORS, build_feature_extractor, demo_split_tensors
from tcae_ldm.metrics.fid import FrechetStats


def find_images(root: str) -> list[str]:
    """Every image file under root, recursively, in a stable order."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder {root!r} does not exist")
    paths = [os.path.join(d, f) for d, _, files in os.walk(root, followlinks=True) for f in files
             if f.lower().endswith(IMG_EXTENSIONS)]
    if not paths:
        raise FileNotFoundError(f"no image files ({', '.join(IMG_EXTENSIONS)}) under {root!r}")
    return sorted(paths)


class CroppedImages(Dataset):
    """Image files -> uint8 (3, S, S) ADM centre crops; an unreadable file raises naming it."""

    def __init__(self, paths: list[str], image_size: int):
        self.paths, self.image_size = paths, image_size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            with Image.open(self.paths[i]) as f:
                img = f.convert("RGB")
        except Exception as e:  # PIL raises several types for truncated or non-image files
            raise CorruptImageError(f"cannot read image {self.paths[i]}: {e}") from e
        arr = np.asarray(center_crop_arr(img, self.image_size), dtype=np.uint8)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1)


@torch.no_grad()
def accumulate_stats(batches: Iterable[torch.Tensor], extractor, device: str | torch.device = "cpu",
                     stats: FrechetStats | None = None) -> FrechetStats:
    """Feed image batches (uint8 or [-1, 1] float) through the extractor into running statistics."""
    extractor.to(device)
    stats = stats or FrechetStats(extractor.dim, device)
    for x in batches:
        stats.update(extractor(x.to(device)))
    return stats


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="tcae-ldm fid-stats", description=__doc__.split("\n\n")[0])
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
        batches = DataLoader(CroppedImages(paths, size), batch_size=args.batch_size, num_workers=args.num_workers)
        source = os.path.abspath(args.images)
    stats = accumulate_stats(batches, extractor, args.device)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)) or ".", exist_ok=True)
    stats.save(args.out, features=extractor.name, source=source, image_size=size)
    print(f"wrote {args.out}: {extractor.name} statistics ({extractor.dim}-d) of {stats.count} images "
          f"from {source} at {size}x{size}")


if __name__ == "__main__":
    main()
