"""`tcae-ldm fid`: the FID of a set of generated images against reference statistics, the final evaluation.

    tcae-ldm sample --ckpt runs/imagenet/dit_tcae/checkpoints/last.ckpt --out samples --num 50000 --steps 250
    tcae-ldm fid samples/samples_50000x256x256x3.npz --ref VIRTUAL_imagenet256_labeled.npz --out samples/fid.json

Samples are an ADM-style .npz (`arr_0`, uint8 N x H x W x 3, what `tcae-ldm sample` writes and what the ADM
evaluator reads) or an image folder. References are ADM's npz (mu / sigma) or `tcae-ldm fid-stats` output. The
score is named after its network (gfid_inception, gfid_demo-classifier), as everywhere in the project.
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch
from torch.utils.data import DataLoader

from tcae_ldm.commands import CommandParser
from tcae_ldm.data.images import CroppedImageFiles, find_images
from tcae_ldm.metrics.features import FEATURE_EXTRACTORS, build_feature_extractor
from tcae_ldm.metrics.fid import (
    accumulate_stats,
    frechet_distance,
    load_stats,
    metric_name,
)


def sample_batches(path: str, batch_size: int, image_size: int | None = None, num_workers: int = 0):
    """(uint8 (B, 3, H, W) batches, count) of an ADM .npz (arr_0) or an image folder."""
    if os.path.isdir(path):
        paths = find_images(path)
        size = image_size or _image_side(paths[0])  # samples are square: their own side, no resize
        return DataLoader(CroppedImageFiles(paths, size), batch_size=batch_size, num_workers=num_workers), len(paths)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"samples {path!r} do not exist (an ADM .npz from `tcae-ldm sample`, or a folder)")
    with np.load(path) as f:
        if "arr_0" not in f:
            raise ValueError(f"{path} has no 'arr_0' array (keys: {sorted(f.keys())}): not an ADM-style sample batch")
        arr = f["arr_0"]
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"{path}: arr_0 must be uint8 (N, H, W, 3), got {arr.dtype} {arr.shape}")
    images = torch.from_numpy(arr).permute(0, 3, 1, 2)
    return images.split(batch_size), len(images)


def _image_side(path: str) -> int:
    from PIL import Image

    with Image.open(path) as img:
        return min(img.size)


def main(argv: list[str] | None = None) -> dict:
    p = CommandParser(prog="tcae-ldm fid", description=__doc__)
    p.add_argument("samples", help="ADM-style .npz (arr_0: uint8 N x H x W x 3) or an image folder")
    p.add_argument("--ref", required=True, help="reference statistics .npz (ADM's or from `tcae-ldm fid-stats`)")
    p.add_argument("--features", default="inception", help=f"feature network: {', '.join(FEATURE_EXTRACTORS)}")
    p.add_argument("--weights", default=None, help="weight file of the feature network (default: its cache)")
    p.add_argument("--image-size", type=int, default=None, help="centre-crop size for a folder (default: as found)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="also write the result as JSON here")
    args = p.parse_args(argv)
    try:  # missing files, weights or a reference of another network fail before any work
        extractor = build_feature_extractor(args.features, args.weights)
        ref = load_stats(args.ref, expect_features=extractor.name)
        batches, count = sample_batches(args.samples, args.batch_size, args.image_size, args.num_workers)
    except (FileNotFoundError, ValueError, KeyError) as e:
        p.error(str(e.args[0]) if isinstance(e, KeyError) else str(e))
    if ref.mu.shape != (extractor.dim,):
        p.error(f"{args.ref} holds {ref.mu.shape[0]}-d statistics but {extractor.name} features are {extractor.dim}-d")
    mu, sigma = accumulate_stats(batches, extractor, args.device).mean_cov()
    name = metric_name("gfid", extractor.name)
    result = {name: frechet_distance(mu, sigma, ref.mu, ref.sigma), "num_samples": count,
              "samples": os.path.abspath(args.samples), "reference": os.path.abspath(args.ref)}
    print(f"{name} = {result[name]:.4f} ({count} samples against {args.ref})")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
