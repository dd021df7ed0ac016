"""`tcae-ldm fid-stats`: reference FID statistics (mu, sigma .npz) of an image folder, an ADM batch or the demo data.

    tcae-ldm fid-stats --images /data/imagenet/train --image-size 256 --features inception --out ref.npz
    tcae-ldm fid-stats --images VIRTUAL_imagenet256_labeled.npz --features demo-classifier --out ref.npz
    tcae-ldm fid-stats --images /data/imagenet/val --image-size 256 --max-images 10000 --out ref.npz \
        --adm-batch VIRTUAL_val256.npz
    tcae-ldm fid-stats --demo --split train --features demo-classifier --out runs/demo/fid_ref.npz

Folder images are found recursively (any layout) and centre-cropped as ADM does, so the statistics match the crops
that the autoencoder and the DiT were trained on. Without --image-size the size comes from the data: a folder whose
images all have one size is cropped to its shorter side, one of mixed sizes is refused (name the crop); an ADM
batch (.npz with arr_0, uint8 N x H x W x 3: a reference batch or `tcae-ldm sample`'s output) is read as it is.
The file records the feature network and the image size; FIDMetric and `tcae-ldm fid` refuse to score against
statistics made with another network, and `fid` samples of another size. It also keeps the features of a seeded
random subset of the images (`activations`, 10000 by default, ADM's reference-batch size) for precision / recall.

--adm-batch also writes the images as a reference batch for guided-diffusion's evaluations/evaluator.py: `arr_0`,
uint8 (N, H, W, 3), the same crops. It holds no `mu` / `sigma`: that evaluator reads them only together with
`mu_s` / `sigma_s` (the sFID features of its TensorFlow Inception's mixed_6/conv layer), which no feature network
here computes; from arr_0 alone it computes all of its statistics (FID, sFID, IS, precision / recall) itself.
"""
from __future__ import annotations

import contextlib
import os

from tcae_ldm.commands import FEATURE_NETWORKS, CommandParser, fail

PROG = "tcae-ldm fid-stats"


def folder_image_size(paths: list[str]) -> int:
    """The shorter side of the images, when they all have one size (read from the headers); else a ValueError
    naming two files of different sizes."""
    from PIL import Image

    first = None
    for path in paths:
        with Image.open(path) as img:
            size = img.size
        if first is None:
            first = (path, size)
        elif size != first[1]:
            raise ValueError(f"the images have several sizes ({first[0]} is {first[1][0]}x{first[1][1]}, {path} is "
                             f"{size[0]}x{size[1]}): give --image-size, the side of the centre crops (ADM: 256)")
    return min(first[1])


def image_source(args):
    """(batches of uint8 (B, 3, S, S) or float [-1, 1] images, count, S, description) of the chosen images."""
    from torch.utils.data import DataLoader

    from tcae_ldm.commands.fid import NpzImages
    from tcae_ldm.data.demo import demo_split_tensors
    from tcae_ldm.data.images import CroppedImageFiles, find_images

    if args.demo:
        size = args.image_size or 64
        images = demo_split_tensors(size)[args.split][0][: args.max_images]
        return images.split(args.batch_size), len(images), size, f"demo:{args.split}"
    if os.path.isfile(args.images):  # an ADM batch: its images as they are
        images = NpzImages(args.images, args.batch_size)
        n, h, w, _ = images.shape
        if h != w or (args.image_size and args.image_size != h):
            raise ValueError(f"{args.images} holds {h}x{w} images" + (f", not {args.image_size}x{args.image_size}"
                                                                      if args.image_size else ", not square"))
        if args.max_images is not None and args.max_images < n:
            raise ValueError(f"--max-images applies to folders; {args.images} is read whole ({n} images)")
        return images, n, h, os.path.abspath(args.images)
    paths = find_images(args.images)[: args.max_images]
    size = args.image_size or folder_image_size(paths)
    loader = DataLoader(CroppedImageFiles(paths, size), batch_size=args.batch_size, num_workers=args.num_workers)
    return loader, len(paths), size, os.path.abspath(args.images)


def teed(batches, writer: NpzStreamWriter):
    """The batches, each also appended to the writer's image array as uint8 (B, H, W, 3)."""
    import torch

    from tcae_ldm.data.transforms import to_uint8

    for x in batches:
        writer.write((x if x.dtype == torch.uint8 else to_uint8(x.float())).permute(0, 2, 3, 1).numpy())
        yield x


def main(argv: list[str] | None = None) -> None:
    p = CommandParser(prog=PROG, description=__doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", metavar="DIR_OR_NPZ",
                     help="image folder, searched recursively, or an ADM batch .npz (arr_0)")
    src.add_argument("--demo", action="store_true", help="the embedded demo photos (DemoPhotosDataModule)")
    p.add_argument("--split", choices=["train", "val"], default="train", help="demo split (default: train)")
    p.add_argument("--image-size", type=int, default=None,
                   help="centre-crop size (default: from the data: a folder's one size, an .npz's; demo: 64)")
    p.add_argument("--features", default="inception", help=f"feature network: {', '.join(FEATURE_NETWORKS)}")
    p.add_argument("--weights", default=None, help="weight file of the feature network (default: its cache)")
    p.add_argument("--out", required=True, help="output .npz (mu, sigma, features, count)")
    p.add_argument("--adm-batch", metavar="NPZ", default=None,
                   help="also write the images as an ADM reference batch (arr_0) for guided-diffusion's evaluator")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--max-images", type=int, default=None, help="use only the first N images (sorted order)")
    p.add_argument("--prc-images", type=int, default=10000,
                   help="keep the features of this many images (a seeded random subset) for precision/recall; 0: none")
    p.add_argument("--device", default=None)
    args = p.parse_args(argv)
    import numpy as np
    import torch

    from tcae_ldm.data.images import CorruptImageError
    from tcae_ldm.metrics.features import build_feature_extractor
    from tcae_ldm.metrics.fid import extract_features
    from tcae_ldm.utils.npz import NpzStreamWriter

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.batch_size < 1:
        fail(PROG, f"--batch-size must be at least 1, got {args.batch_size}")

    try:  # missing weights or images, or sizes that cannot be decided, fail here, before any work, with one message
        extractor = build_feature_extractor(args.features, args.weights)
        batches, count, size, source = image_source(args)
    except (FileNotFoundError, KeyError, ValueError) as e:
        fail(PROG, str(e.args[0]) if isinstance(e, KeyError) else str(e))  # KeyError's str() adds quotes
    keep = min(max(args.prc_images, 0), count)
    subset = set(np.random.default_rng(0).choice(count, keep, replace=False).tolist()) if keep else False
    for path in (args.out, args.adm_batch):
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    try:
        with NpzStreamWriter(args.adm_batch) if args.adm_batch else contextlib.nullcontext() as adm:
            total = len(batches)
            if adm is not None:
                adm.begin("arr_0", (count, size, size, 3))
                batches = teed(batches, adm)
            found = extract_features(batches, extractor, args.device, keep=subset, total=total,
                                     desc=f"{extractor.name} features")
    except CorruptImageError as e:  # from a loader worker the message ends with the original one
        fail(PROG, str(e).strip().splitlines()[-1])
    extra = {"activations": found.features.numpy()} if keep else {}
    found.stats.save(args.out, features=extractor.name, source=source, image_size=size, **extra)
    print(f"wrote {args.out}: {extractor.name} statistics ({extractor.dim}-d) of {found.stats.count} images "
          f"from {source} at {size}x{size}, features of {keep} of them for precision/recall", flush=True)
    if args.adm_batch:
        print(f"wrote {args.adm_batch}: ADM reference batch, arr_0 uint8 ({count}, {size}, {size}, 3); no mu / sigma "
              f"(ADM's evaluator computes them, and sFID's mu_s / sigma_s, from the images)", flush=True)


if __name__ == "__main__":
    main()
