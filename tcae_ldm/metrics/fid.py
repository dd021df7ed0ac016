"""Frechet distance (FID) from running feature statistics, DDP-aware, with ADM-compatible reference files.

Statistics are kept as float64 running sums (count, sum x, sum x x^T), so any number of batches, ranks
and evaluation rounds add up exactly to the one-shot mean / unbiased covariance (np.cov, ddof=1) that
pytorch-fid and the ADM evaluator compute. Reference files are .npz with `mu` and `sigma`, the format
of ADM's VIRTUAL_imagenet256_labeled.npz; ours also record the feature network, so stats made with one
network are never scored against another.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from scipy import linalg


def metric_name(kind: str, features_name: str) -> str:
    """'gfid' + 'inception' -> 'gfid_inception': the feature network is always part of the name."""
    return f"{kind}_{features_name}"


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2), computed as pytorch-fid and the ADM evaluator do."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics of different feature sizes: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        # a singular product (fewer samples than feature dims) has no stable square root: nudge both
        warnings.warn(f"FID: singular covariance product; adding {eps} to the diagonals")
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        # round-off leaves a tiny imaginary part; a large one means the statistics are broken
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"FID: imaginary component {np.max(np.abs(covmean.imag))} in sqrt(S1 S2)")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


@dataclass
class ReferenceStats:
    """Mean and covariance of a reference set; `features` is None for files that do not say (ADM's)."""

    mu: np.ndarray
    sigma: np.ndarray
    features: str | None = None
    count: int | None = None


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
    with np.load(path, allow_pickle=False) as f:
        if "mu" not in f or "sigma" not in f:
            raise ValueError(f"{path} has no 'mu'/'sigma' arrays (keys: {sorted(f.keys())}); make reference "
                           f"statistics with `tcae-ldm fid-stats`")
        stats = ReferenceStats(f["mu"].astype(np.float64), f["sigma"].astype(np.float64),
                               str(f["features"]) if "features" in f else None,
                               int(f["count"]) if "count" in f else None)
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
        """images: uint8 (B, 3, H, W) or float in [-1, 1]."""
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
        return frechet_distance(*fake.mean_cov(), *real.mean_cov())

    def reset(self) -> None:
        self.real.reset()
        self.fake.reset()


@torch.no_grad()
def accumulate_stats(batches: Iterable[torch.Tensor], extractor, device: str | torch.device = "cpu",
                     stats: FrechetStats | None = None) -> FrechetStats:
    """Feed image batches (uint8 or [-1, 1] float) through the extractor into running statistics."""
    extractor.to(device)
    stats = stats or FrechetStats(extractor.dim, device)
    for x in batches:
        stats.update(extractor(x.to(device)))
    return stats
