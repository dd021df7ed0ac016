"""`tcae-ldm fid`: FID, Inception Score and precision / recall of generated images, the final evaluation.

    tcae-ldm sample --ckpt runs/imagenet/dit_tcae/checkpoints/last.ckpt --out samples --num 50000 --steps 250
    tcae-ldm fid samples/samples_50000x256x256x3.npz --ref VIRTUAL_imagenet256_labeled.npz --out samples/fid.json

Samples are an ADM-style .npz (`arr_0`, uint8 N x H x W x 3, what `tcae-ldm sample` writes and what the ADM
evaluator reads; streamed, never loaded whole) or an image folder (a folder written by `sample` is read from its
images/, so grid.png is not scored). References are ADM's reference batch (mu / sigma and its images) or
`tcae-ldm fid-stats` output (mu / sigma, and the features of a 10k subset); statistics of another feature network
or another image size are refused. One network scores everything, and every score is named after it:
gfid_<network> (float64 statistics, eigenvalue Frechet distance), is_<network> (Inception Score, 10 splits),
precision_<network> / recall_<network> (k = 3), the last two through torch-fidelity's own functions.
"""
from __future__ import annotations

import json
import math
import os
import zipfile

import numpy as np

from tcae_ldm.commands import FEATURE_NETWORKS, CommandParser, fail

PROG = "tcae-ldm fid"
METRICS = ("fid", "is", "pr")
SAMPLE_GRID, SAMPLE_IMAGES = "grid.png", "images"  # what `tcae-ldm sample` writes beside the PNGs


class NpzImages:
    """uint8 (B, 3, H, W) batches of an .npz's image array (N, H, W, 3), read from the archive batch by batch."""

    def __init__(self, path: str, batch_size: int, key: str = "arr_0"):
        self.path, self.key, self.batch_size = path, key, batch_size
        try:
            with zipfile.ZipFile(path) as z:
                names = [n.removesuffix(".npy") for n in z.namelist()]
                if key not in names:
                    raise ValueError(f"{path} has no '{key}' array (keys: {sorted(names)}): not an ADM-style batch "
                                     f"of images")
                with z.open(f"{key}.npy") as f:
                    shape, fortran, dtype = self._header(f)
        except (zipfile.BadZipFile, OSError) as e:
            raise ValueError(f"{path} is not an .npz file numpy wrote ({type(e).__name__}: {e})") from None
        if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3 or fortran:
            raise ValueError(f"{path}: {key} must be uint8 (N, H, W, 3) in C order, got {dtype} {shape}")
        self.shape = shape

    @staticmethod
    def _header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
        major, _ = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        return read(f)

    def __len__(self) -> int:
        return math.ceil(self.shape[0] / self.batch_size)

    def __iter__(self):
        n, h, w, c = self.shape
        with zipfile.ZipFile(self.path) as z, z.open(f"{self.key}.npy") as f:
            self._header(f)
            import torch

            for start in range(0, n, self.batch_size):
                b = min(self.batch_size, n - start)
                buf = f.read(b * h * w * c)
                if len(buf) != b * h * w * c:
                    raise ValueError(f"{self.path}: {self.key} ends after {start + len(buf) // (h * w * c)} of {n} images")
                yield torch.from_numpy(np.frombuffer(buf, np.uint8).reshape(b, h, w, c).copy()).permute(0, 3, 1, 2)


def open_samples(path: str, batch_size: int, image_size: int | None = None, num_workers: int = 0):
    """(batches of uint8 (B, 3, S, S), count, "HxW" of the images) of an ADM .npz or an image folder."""
    if os.path.isdir(path):
        from torch.utils.data import DataLoader

        from tcae_ldm.data.images import CroppedImageFiles, find_images

        if os.path.isdir(os.path.join(path, SAMPLE_IMAGES)) and os.path.isfile(os.path.join(path, SAMPLE_GRID)):
            path = os.path.join(path, SAMPLE_IMAGES)  # a `tcae-ldm sample` folder: its samples, not its grid
        paths = find_images(path)
        size = image_size or _image_side(paths[0])  # samples are square: their own side, no resize
        loader = DataLoader(CroppedImageFiles(paths, size), batch_size=batch_size, num_workers=num_workers)
        return loader, len(paths), f"{size}x{size}"
    if not os.path.isfile(path):
        raise FileNotFoundError(f"samples {path} do not exist (an ADM .npz from `tcae-ldm sample`, or a folder)")
    images = NpzImages(path, batch_size)
    return images, images.shape[0], f"{images.shape[1]}x{images.shape[2]}"


def _image_side(path: str) -> int:
    from PIL import Image

    with Image.open(path) as img:
        return min(img.size)


def reference_features(path: str, extractor, device: str, batch_size: int):
    """Reference features for precision / recall: stored ones (`fid-stats`), or those of the reference batch's
    images (ADM's arr_0), or None when the file has neither."""
    import torch

    from tcae_ldm.metrics.fid import extract_features

    with np.load(path, allow_pickle=False) as f:
        if "activations" in f:
            return torch.from_numpy(f["activations"].astype(np.float32))
        if "arr_0" not in f:
            return None
    images = NpzImages(path, batch_size)
    return extract_features(images, extractor, device, keep=True, total=len(images),
                            desc="reference features").features


def build_parser() -> CommandParser:
    p = CommandParser(prog=PROG, description=__doc__)
    p.add_argument("samples", help="ADM-style .npz (arr_0: uint8 N x H x W x 3) or an image folder")
    p.add_argument("--ref", required=True, help="reference .npz (ADM's reference batch or `tcae-ldm fid-stats` output)")
    p.add_argument("--features", default="inception", help=f"feature network: {', '.join(FEATURE_NETWORKS)}")
    p.add_argument("--weights", default=None, help="weight file of the feature network (default: its cache)")
    p.add_argument("--metrics", default=None,
                   help="comma-separated subset of fid,is,pr (default: fid, plus IS and precision/recall where the "
                        "samples and the reference allow them)")
    p.add_argument("--image-size", type=int, default=None, help="centre-crop size for a folder (default: as found)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=None, help="also write the result as JSON here")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    import torch

    from tcae_ldm.data.images import CorruptImageError
    from tcae_ldm.metrics.features import build_feature_extractor
    from tcae_ldm.metrics.fid import extract_features, frechet_distance, load_stats, metric_name
    from tcae_ldm.metrics.fidelity import IS_SPLITS, PRC_NEIGHBOURS, inception_score, precision_recall

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    asked = None if args.metrics is None else {m.strip() for m in args.metrics.split(",") if m.strip()}
    if asked is not None and (not asked or asked - set(METRICS)):
        fail(PROG, f"--metrics takes a comma-separated subset of {','.join(METRICS)}, got {args.metrics!r}")
    if args.batch_size < 1:
        fail(PROG, f"--batch-size must be at least 1, got {args.batch_size}")
    try:  # every input is checked before any work: files, weights, networks, sizes
        extractor = build_feature_extractor(args.features, args.weights)
        ref = load_stats(args.ref, expect_features=extractor.name)
        if ref.mu.shape != (extractor.dim,):
            raise ValueError(f"{args.ref} holds {ref.mu.shape[0]}-d statistics but {extractor.name} features are "
                             f"{extractor.dim}-d")
        batches, count, size = open_samples(args.samples, args.batch_size, args.image_size, args.num_workers)
        if count < 2:
            raise ValueError(f"{args.samples} holds {count} image(s): a covariance needs at least 2")
        if ref.image_size is not None and size != f"{ref.image_size}x{ref.image_size}":
            raise ValueError(f"the samples are {size} images but the reference statistics {args.ref} were computed on "
                             f"{ref.image_size}x{ref.image_size} images: score them against statistics of their own "
                             f"size (`tcae-ldm fid-stats --image-size`)")
    except (FileNotFoundError, ValueError, KeyError) as e:
        fail(PROG, str(e.args[0]) if isinstance(e, KeyError) else str(e))

    wanted = asked or set(METRICS)
    explicit = asked or set()
    if "is" in wanted and count < IS_SPLITS:
        if "is" in explicit:
            fail(PROG, f"the Inception Score over {IS_SPLITS} splits needs at least {IS_SPLITS} samples, got {count}")
        wanted.discard("is")
    ref_features = None
    if "pr" in wanted:
        ref_features = reference_features(args.ref, extractor, args.device, args.batch_size)
        if ref_features is None or min(count, len(ref_features)) <= PRC_NEIGHBOURS:
            if "pr" in explicit:
                fail(PROG, f"precision/recall needs more than {PRC_NEIGHBOURS} samples and reference features "
                           f"({args.ref} has {'none' if ref_features is None else len(ref_features)}: make it with "
                           f"`tcae-ldm fid-stats`, which keeps them, or use ADM's reference batch)")
            wanted.discard("pr")
    try:
        found = extract_features(batches, extractor, args.device, keep=bool(wanted & {"is", "pr"}),
                                 logits="is" in wanted, total=len(batches), desc="sample features")
    except CorruptImageError as e:
        fail(PROG, str(e).strip().splitlines()[-1])

    name = metric_name("gfid", extractor.name)
    result = {name: frechet_distance(*found.stats.mean_cov(), ref.mu, ref.sigma), "num_samples": count,
              "image_size": size, "samples": os.path.abspath(args.samples), "reference": os.path.abspath(args.ref)}
    lines = [f"{name} = {result[name]:.4f} ({count} samples at {size} against {args.ref})"]
    if "is" in wanted:
        is_name = metric_name("is", extractor.name)
        result[is_name], result[f"{is_name}_std"] = inception_score(found.logits)
        lines.append(f"{is_name} = {result[is_name]:.3f} +- {result[f'{is_name}_std']:.3f} ({IS_SPLITS} splits)")
    if "pr" in wanted:
        pr = precision_recall(found.features.to(args.device), ref_features.to(args.device))
        for kind, value in zip(("precision", "recall"), pr):
            result[metric_name(kind, extractor.name)] = value
        result["num_reference_features"] = len(ref_features)
        lines.append(f"precision_{extractor.name} = {pr[0]:.4f}, recall_{extractor.name} = {pr[1]:.4f} "
                     f"(k={PRC_NEIGHBOURS}, {len(ref_features)} reference images)")
    print("\n".join(lines), flush=True)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
