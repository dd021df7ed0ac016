"""Frechet distance (FID) from running feature statistics, DDP-aware, with ADM-compatible reference files.

Statistics are kept as float64 running sums (count, sum x, sum x x^T), so any number of batches, ranks
and evaluation rounds add up exactly to the one-shot mean / unbiased covariance (np.cov, ddof=1) that
pytorch-fid and the ADM evaluator compute. Reference files are .npz with `mu` and `sigma`, the format
of ADM's VIRTUAL_imagenet256_labeled.npz; ours also record the feature network, so stats made with one
network are never scored against another.
"""
from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn


def metric_name(kind: str, features_name: str) -> str:
    """'gfid' + 'inception' -> 'gfid_inception': the feature network is always part of the name."""
    return f"{kind}_{features_name}"


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2), the trace of the square root taken from eigenvalues.

    S1 S2 has the eigenvalues of the symmetric positive semi-definite S1^1/2 S2 S1^1/2 (S1^1/2 from eigh), so
    Tr((S1 S2)^1/2) is the sum of their square roots, with those that round-off pushes below zero clipped to 0.
    The value is the one scipy's sqrtm gives (pytorch-fid, the ADM evaluator) on well-conditioned statistics and
    torch-fidelity's eigenvalue form gives in general (both tested), and it stays finite and real where sqrtm
    needs an epsilon nudge or returns complex parts: singular covariances (fewer samples than dimensions)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics of different feature sizes: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    if not all(np.isfinite(a).all() for a in (mu1, mu2, sigma1, sigma2)):
        raise ValueError("FID of statistics that hold NaN or infinite values")
    diff = mu1 - mu2
    w, v = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T  # S1^1/2
    inner = root1 @ sigma2 @ root1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum()
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


@dataclass
class ReferenceStats:
    """Mean and covariance of a reference set; `features` is None for files that do not say (ADM's), and
    `image_size` the side of the images they were computed on (ours record it, ADM's holds the images)."""

    mu: np.ndarray
    sigma: np.ndarray
    features: str | None = None
    count: int | None = None
    image_size: int | None = None


def _npy_header(z: zipfile.ZipFile, member: str) -> tuple:
    """(shape, fortran_order, dtype) of an .npy member of a zip, read from its header alone."""
    with z.open(member) as f:
        major, _ = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        return read(f)


def save_stats(path: str, mu: np.ndarray, sigma: np.ndarray, features: str | None = None,
               count: int | None = None, **meta) -> None:
    """Write an ADM-compatible .npz (mu, sigma) plus our metadata (feature network, sample count, source)."""
    extra = {k: np.asarray(v) for k, v in meta.items()}
    if features is not None:
        extra["features"] = np.asarray(features)
    if count is not None:
        extra["count"] = np.asarray(count, dtype=np.int64)
    with open(path, "wb") as f:  # a file handle keeps np.savez from appending '.npz' to the name
        np.savez(f, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64), **extra)


def load_stats(path: str, expect_features: str | None = None) -> ReferenceStats:
    """Read mu / sigma from our files or ADM's reference batches; refuse stats of another feature network."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"reference statistics {path} do not exist (make them with `tcae-ldm fid-stats`, "
                                f"or use ADM's VIRTUAL_imagenet256_labeled.npz)")
    try:
        f = np.load(path, allow_pickle=False)
    except Exception as e:  # noqa: BLE001  (numpy raises several types for what is not an .npz)
        raise ValueError(f"reference statistics {path} are not an .npz file numpy can read ({type(e).__name__})") from None
    with f:
        # every array's header, read without the data (ADM's reference batch holds 1.9 GB of images in arr_0)
        headers = {m[:-4]: _npy_header(f.zip, m) for m in f.zip.namelist() if m.endswith(".npy")}
        pickled = [k for k, (_, _, dtype) in headers.items() if dtype.hasobject]
        if pickled:  # allow_pickle=False refuses an object array only when it is read: name them all up front
            raise ValueError(f"reference statistics {path} hold pickled objects ({', '.join(pickled)}) that "
                             f"loading would have to run code to build; statistics are plain arrays")
        if "mu" not in f or "sigma" not in f:
            raise ValueError(f"{path} has no 'mu'/'sigma' arrays (keys: {sorted(f.keys())}); make reference "
                             f"statistics with `tcae-ldm fid-stats`")
        size = int(f["image_size"]) if "image_size" in f else None
        stats = ReferenceStats(f["mu"].astype(np.float64), f["sigma"].astype(np.float64),
                               str(f["features"]) if "features" in f else None,
                               int(f["count"]) if "count" in f else None, size)
    if stats.image_size is None and "arr_0" in headers:  # ADM's reference batch: (N, H, W, 3) images
        shape = headers["arr_0"][0]
        stats.image_size = int(shape[1]) if len(shape) == 4 and shape[1] == shape[2] else None
    if expect_features is not None and stats.features is not None and stats.features != expect_features:
        raise ValueError(f"reference statistics {path} were computed with the '{stats.features}' network, "
                         f"not '{expect_features}'; make matching ones with `tcae-ldm fid-stats --features "
                         f"{expect_features}`")
    return stats


class FrechetStats:
    """Running float64 sums of features; exact mean / covariance over batches, rounds and ranks."""

    def __init__(self, dim: int, device: torch.device | str | None = None):
        self.dim = dim
        self.count = 0
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def reset(self) -> None:
        self.count = 0
        self.sum.zero_()
        self.outer.zero_()

    @torch.no_grad()
    def update(self, features: torch.Tensor | np.ndarray) -> None:
        """features: (B, dim)."""
        f = torch.as_tensor(features)
        if f.dim() != 2 or f.shape[1] != self.dim:
            raise ValueError(f"expected features of shape (B, {self.dim}), got {tuple(f.shape)}")
        if self.sum.device != f.device:  # accumulate where the features are (GPU in a run)
            self.sum, self.outer = self.sum.to(f.device), self.outer.to(f.device)
        f = f.to(torch.float64)
        self.count += f.shape[0]
        self.sum += f.sum(0)
        self.outer += f.T @ f

    def merge(self, other: "FrechetStats") -> "FrechetStats":
        """Add another accumulator's samples to this one (in place); returns self."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge statistics of {other.dim}-d features into {self.dim}-d ones")
        self.count += other.count
        self.sum += other.sum.to(self.sum.device)
        self.outer += other.outer.to(self.outer.device)
        return self

    def reduced(self) -> "FrechetStats":
        """A copy summed over all ranks when torch.distributed is initialised (every rank must call it),
        else a plain copy; the copy keeps repeated compute() calls from double-counting."""
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        device = self.sum.device
        if distributed and dist.get_backend() == "nccl":  # a rank that scored nothing still holds CPU sums
            device = torch.device("cuda", torch.cuda.current_device())
        out = FrechetStats(self.dim, device)
        out.merge(self)
        if distributed:
            count = torch.tensor([float(out.count)], dtype=torch.float64, device=device)
            for t in (count, out.sum, out.outer):
                dist.all_reduce(t)
            out.count = int(count.item())
        return out

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu (dim,), sigma (dim, dim)) of this accumulator's samples; covariance with ddof=1, as np.cov."""
        if self.count < 2:
            raise ValueError(f"need at least 2 samples for a covariance, have {self.count}")
        n, s, ss = self.count, self.sum.cpu().numpy(), self.outer.cpu().numpy()
        mu = s / n
        sigma = (ss - n * np.outer(mu, mu)) / (n - 1)
        return mu, (sigma + sigma.T) / 2  # exact symmetry for sqrtm

    def save(self, path: str, features: str | None = None, **meta) -> None:
        mu, sigma = self.mean_cov()
        save_stats(path, mu, sigma, features=features, count=self.count, **meta)


class FIDMetric(nn.Module):
    """A feature network + reference statistics + running statistics of the images scored so far.

    update(images) on every rank, compute() on every rank (it all-reduces), reset() between rounds.
    The feature network is held outside the module tree: it is a fixed measuring instrument that must
    not enter checkpoints, optimizers or DDP; it follows its inputs to their device instead.
    """

    def __init__(self, extractor, reference: ReferenceStats | str, kind: str = "gfid"):
        super().__init__()
        self._extractor = [extractor]  # a list hides it from nn.Module registration
        ref = load_stats(reference, expect_features=extractor.name) if isinstance(reference, str) else reference
        if ref.features is not None and ref.features != extractor.name:
            raise ValueError(f"reference statistics of the '{ref.features}' network cannot score "
                             f"'{extractor.name}' features")
        if ref.mu.shape != (extractor.dim,):
            raise ValueError(f"reference statistics have {ref.mu.shape[0]}-d features but the "
                             f"'{extractor.name}' network gives {extractor.dim}-d ones")
        self.reference = ref
        self.name = metric_name(kind, extractor.name)
        self.stats = FrechetStats(extractor.dim)

    @property
    def extractor(self):
        return self._extractor[0]

    @torch.no_grad()
    def update(self, images: torch.Tensor) -> None:
        """images: uint8 (B, 3, H, W) or float in [-1, 1], of the reference's size when it records one."""
        size = self.reference.image_size
        if size is not None and tuple(images.shape[-2:]) != (size, size):
            raise ValueError(f"{self.name}: the images are {images.shape[-2]}x{images.shape[-1]} but the reference "
                             f"statistics were computed on {size}x{size} images")
        ext = self.extractor
        params = next(ext.parameters(), None)
        if params is not None and params.device != images.device:
            ext.to(images.device)
        self.stats.update(ext(images))

    def compute(self) -> float:
        mu, sigma = self.stats.reduced().mean_cov()
        return frechet_distance(mu, sigma, self.reference.mu, self.reference.sigma)

    def reset(self) -> None:
        self.stats.reset()


class ReconstructionFID(nn.Module):
    """rFID: Frechet distance between the features of the images and of their reconstructions, both
    accumulated over the whole evaluation (and all ranks), as autoencoder papers report it."""

    def __init__(self, extractor):
        super().__init__()
        self._extractor = [extractor]  # a measuring instrument: outside the module tree, as in FIDMetric
        self.name = metric_name("rfid", extractor.name)
        self.real, self.fake = FrechetStats(extractor.dim), FrechetStats(extractor.dim)
        self.num_images = 0  # images (all ranks) behind the last compute(): a partial split shows here

    @torch.no_grad()
    def update(self, x: torch.Tensor, x_rec: torch.Tensor) -> None:
        """x, x_rec: (B, 3, H, W) in [-1, 1] (reconstructions are quantised to 8 bits like saved images)."""
        ext = self._extractor[0]
        params = next(ext.parameters(), None)
        if params is not None and params.device != x.device:
            ext.to(x.device)
        self.real.update(ext(x))
        self.fake.update(ext(x_rec.clamp(-1, 1)))

    def compute(self) -> float:
        real, fake = self.real.reduced(), self.fake.reduced()
        self.num_images = real.count
        return frechet_distance(*fake.mean_cov(), *real.mean_cov())

    def reset(self) -> None:
        self.real.reset()
        self.fake.reset()


@dataclass
class ExtractedFeatures:
    """What a pass over a set of images gives: running statistics of every image, and the features / logits of
    the images that were kept (for precision / recall and the Inception Score)."""

    stats: FrechetStats
    features: torch.Tensor | None = None  # (n_kept, dim) float32, on the CPU
    logits: torch.Tensor | None = None  # (n_kept, K) float32, on the CPU


@torch.no_grad()
def extract_features(batches: Iterable[torch.Tensor], extractor, device: str | torch.device = "cpu",
                     keep: bool | set[int] = False, logits: bool = False, total: int | None = None,
                     desc: str | None = None) -> ExtractedFeatures:
    """Feed image batches (uint8 or [-1, 1] float) through the extractor into running statistics; keep the
    features (and logits) of every image (keep=True) or of those whose running index is in `keep`. A progress
    bar named `desc` counts the batches (total: their number, when the iterable has no len)."""
    from tcae_ldm.utils.progress import progress

    extractor.to(device)
    out = ExtractedFeatures(FrechetStats(extractor.dim, device))
    kept_f, kept_l, seen = [], [], 0
    for x in progress(batches, desc, total=total):
        f, lg = extractor(x.to(device), logits=True) if logits else (extractor(x.to(device)), None)
        out.stats.update(f)
        if keep:
            rows = (torch.arange(len(f)) if keep is True else
                    torch.tensor([i for i in range(len(f)) if seen + i in keep], dtype=torch.long))
            kept_f.append(f[rows.to(f.device)].float().cpu())
            if lg is not None:
                kept_l.append(lg[rows.to(lg.device)].float().cpu())
        seen += len(f)
    if keep:
        out.features = torch.cat(kept_f) if kept_f else torch.zeros(0, extractor.dim)
        out.logits = torch.cat(kept_l) if kept_l else None
    return out
