"""The latent cache: its on-disk format, the writer that fills it (the predict side of `tcae-ldm predict`), the
images it is made from and the per-channel normaliser.

A cache is one folder, laid out so that LightningDiT's latent loader (datasets/img_latent_dataset.py, which reads
every *.safetensors file of the folder and latents_stats.pt) reads it unchanged:
  shard-r{rank}-{i:05d}.safetensors  latents, latents_flip (N, c, h, w); labels, indices (N,) int64
  latents_stats.pt                   {mean, std}: (1, c, 1, 1) per channel, over every latent and its flip
  metadata.json                      autoencoder identity + spec, image size, latent shape, count, classes, and
                                     each shard's rows, size and CRC-32
Every file is written atomically (group-readable) and metadata.json last, so a folder without it is an unfinished
cache and is refused. Format 1 caches (stats.safetensors, no shard sizes) are still read;
tcae_ldm.latents.checks.upgrade_cache() converts one in place (LightningDiT's loader would take
stats.safetensors for a shard). The checks that refuse a damaged or foreign cache are in tcae_ldm.latents.checks.
"""
from __future__ import annotations

import glob
import hashlib
import io
import json
import logging
import os
from typing import Literal

import lightning as L
import torch
import torch.distributed as dist
import torch.nn as nn
from lightning.pytorch.callbacks import BasePredictionWriter
from safetensors.torch import load_file
from torch.utils.data import DataLoader, Dataset

from tcae_ldm.data.images import ImageDataModule, collate_skipping
from tcae_ldm.latents.frozen import describe_identity
from tcae_ldm.latents.layouts import foreign_layout
from tcae_ldm.latents.shards import CACHE_DTYPES, ShardError, load_shard, plain_name, write_shard
from tcae_ldm.utils.atomic import write_bytes_atomic
from tcae_ldm.utils.checkpoints import UntrustedFileError, load_torch_file

SHARD_GLOB = "shard-r*-*.safetensors"
CACHE_FORMAT = 2
STATS_FILE = "latents_stats.pt"         # LightningDiT's name and layout: {"mean", "std"} of shape (1, c, 1, 1)
OLD_STATS_FILE = "stats.safetensors"    # format 1
METADATA_FILE = "metadata.json"
_UNCHECKED_STATS: set[str] = set()  # statistics files already warned about in this process

log = logging.getLogger(__name__)


#################################################################################
#                           Source: images -> batches                           #
#################################################################################

class IndexedDataset(Dataset):
    """Adds the dataset index to every item, so that shards say which image each latent came from."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        item = self.dataset[i]
        return None if item is None else {**item, "index": i}  # None: a skipped corrupt file


class CacheSourceDataModule(L.LightningDataModule):
    """The images a cache is made from: a split of an image datamodule, without flips or shuffling.

    Args:
        images: the image datamodule (its image_size must be the autoencoder's training size).
        batch_size: images per predict step and device (each is encoded with its mirror image).
        num_workers: DataLoader worker processes (default: the image datamodule's).
        split: which split to encode.
    """

    def __init__(self, images: ImageDataModule, batch_size: int = 64, num_workers: int | None = None,
                 split: Literal["train", "val"] = "train"):
        super().__init__()
        self.images, self.batch_size, self.split = images, batch_size, split
        self.num_workers = images.num_workers if num_workers is None else num_workers
        self.dataset = None

    @property
    def image_size(self) -> int:
        return self.images.image_size

    def setup(self, stage: str | None = None):
        if self.dataset is not None:
            return
        self.images.hflip = False  # the flip is encoded explicitly, as latents_flip
        self.images.setup("predict")
        base = getattr(self.images, f"{self.split}_set")
        if hasattr(getattr(base, "transform", None), "hflip"):
            base.transform.hflip = False
        self.dataset = IndexedDataset(base)

    def on_after_batch_transfer(self, batch, dataloader_idx):
        return self.images.on_after_batch_transfer(batch, dataloader_idx)  # uint8 -> [-1, 1] on the device

    def predict_dataloader(self):
        # Lightning swaps in an unrepeated distributed sampler under DDP: each index goes to one rank.
        return DataLoader(self.dataset, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers,
                          collate_fn=collate_skipping, pin_memory=torch.cuda.is_available())

    def cache_metadata(self) -> dict:
        base = self.dataset.dataset
        return {"image_size": self.image_size, "num_classes": int(self.images.num_classes),
                "classes": list(getattr(base, "classes", [])),
                "dataset": {"datamodule": f"{type(self.images).__module__}.{type(self.images).__qualname__}",
                            "root": getattr(self.images, "root", None), "split": self.split, "size": len(base)}}


#################################################################################
#                               Normalisation                                   #
#################################################################################

def read_stats(cache_dir: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (mean, std), each (c,), of a cache (latents_stats.pt, or a format-1 stats.safetensors)."""
    path = os.path.join(cache_dir, STATS_FILE)
    if os.path.isfile(path):
        check_stats_checksum(cache_dir, path)
        try:
            stats = load_torch_file(path, what="latent statistics")
        except (UntrustedFileError, FileNotFoundError):
            raise
        except Exception as e:
            raise ShardError(f"latent statistics {path} cannot be read ({e}); re-cache") from None
    elif os.path.isfile(os.path.join(cache_dir, OLD_STATS_FILE)):
        stats = load_file(os.path.join(cache_dir, OLD_STATS_FILE))
    else:
        raise FileNotFoundError(f"latent cache {cache_dir} has no {STATS_FILE}; re-cache")
    return stats["mean"].float().flatten(), stats["std"].float().flatten()


def check_stats_checksum(cache_dir: str, path: str) -> None:
    """latents_stats.pt against the sha256 metadata.json recorded when the cache was written (ShardError when it
    differs); a cache written before checksums were recorded is read with a one-line warning, once per process."""
    try:
        with open(os.path.join(cache_dir, METADATA_FILE)) as f:
            recorded = json.load(f).get("stats_sha256")
    except (OSError, ValueError, AttributeError):
        recorded = None  # no readable metadata: the reader of the metadata names that problem
    if recorded is None:
        if path not in _UNCHECKED_STATS:
            _UNCHECKED_STATS.add(path)
            log.warning("latent statistics %s are read unchecked: metadata.json records no checksum of them "
                        "(a cache written before checksums were recorded; re-cache to have them checked)", path)
        return
    with open(path, "rb") as f:
        actual = hashlib.sha256(f.read()).hexdigest()
    if actual != recorded:
        raise ShardError(f"latent statistics {path} differ from the checksum metadata.json recorded when the cache "
                         f"was written (sha256 {actual[:12]}, recorded {recorded[:12]}): they were rewritten or "
                         f"damaged; re-cache")


class LatentNormalizer(nn.Module):
    """Per-channel (z - mean) / std and its inverse; the only place that maps cache latents <-> DiT space."""

    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("std", torch.ones(channels))

    @classmethod
    def from_cache(cls, cache_dir: str) -> "LatentNormalizer":
        mean, std = read_stats(cache_dir)
        norm = cls(mean.numel())
        norm.mean.copy_(mean)
        norm.std.copy_(std)
        return norm

    def _view(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return t.to(like.device, like.dtype).view(1, -1, 1, 1)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:  # (B, c, h, w)
        return (z - self._view(self.mean, z)) / self._view(self.std, z)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:  # (B, c, h, w), before decoding
        return z * self._view(self.std, z) + self._view(self.mean, z)


#################################################################################
#                       Writing: images -> shards + stats                        #
#################################################################################

def _gather(obj) -> list:
    if dist.is_available() and dist.is_initialized():
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def _channel_sums(*zs: torch.Tensor) -> torch.Tensor:
    """(3, c) float64: per-channel sum, sum of squares and count over (N, c, h, w) tensors."""
    z = torch.cat([t.double().transpose(0, 1).reshape(t.shape[1], -1) for t in zs], dim=1)  # (c, M)
    return torch.stack([z.sum(1), (z * z).sum(1), torch.full_like(z[:, 0], z.shape[1])])


def save_shard(path: str, data: dict, dtype: str) -> tuple[torch.Tensor, dict]:
    """Write one shard {latents, latents_flip, labels, indices} atomically; returns the per-channel sums of the
    stored values and the shard's {rows, bytes, crc32} for metadata.json."""
    shard, info = write_shard(path, data, dtype)
    return _channel_sums(shard["latents"], shard["latents_flip"]), info


def write_json(path: str, obj: dict) -> None:
    write_bytes_atomic(path, json.dumps(obj, indent=2).encode(), group_readable=True)


def write_stats(output_dir: str, mean: torch.Tensor, std: torch.Tensor) -> str:
    """Write latents_stats.pt; returns its sha256, which metadata.json records."""
    buf = io.BytesIO()
    torch.save({"mean": mean.float().view(1, -1, 1, 1), "std": std.float().view(1, -1, 1, 1)}, buf)
    write_bytes_atomic(os.path.join(output_dir, STATS_FILE), buf.getvalue(), group_readable=True)
    return hashlib.sha256(buf.getvalue()).hexdigest()


def finish_cache(output_dir: str, sums: torch.Tensor, count: int, shards: dict[str, dict], meta: dict,
                 dtype: str) -> None:
    """Write latents_stats.pt from the reduced sums (3, c), then metadata.json (shards: name -> {rows, bytes,
    crc32}), the mark of a complete cache."""
    mean = sums[0] / sums[2]
    std = (sums[1] / sums[2] - mean * mean).clamp_min(1e-12).sqrt()
    digest = write_stats(output_dir, mean, std)
    meta = {"format": CACHE_FORMAT, **meta, "count": int(count), "dtype": dtype, "shards": sorted(shards),
            "shard_info": {k: shards[k] for k in sorted(shards)}, "stats_file": STATS_FILE, "stats_sha256": digest,
            "stats": "per-channel mean/std over latents and latents_flip"}
    write_json(os.path.join(output_dir, METADATA_FILE), meta)


def write_cache(output_dir: str, latents: torch.Tensor, latents_flip: torch.Tensor, labels: torch.Tensor,
                meta: dict, dtype: str = "fp32") -> str:
    """A complete one-shard cache from tensors in memory (benchmarks, tests); `meta` holds at least
    autoencoder, image_size, latent_shape and num_classes, as a caching run records them."""
    os.makedirs(output_dir, exist_ok=True)
    name = "shard-r0-00000.safetensors"
    data = {"latents": latents, "latents_flip": latents_flip, "labels": labels,
            "indices": torch.arange(len(latents))}
    sums, info = save_shard(os.path.join(output_dir, name), data, dtype)
    finish_cache(output_dir, sums, len(latents), {name: info}, meta, dtype)
    return output_dir


def cache_files(cache_dir: str) -> list[str]:
    """Every file a caching run writes that is in the folder (shards of any run, statistics, metadata)."""
    names = (STATS_FILE, OLD_STATS_FILE, METADATA_FILE)
    return sorted(glob.glob(os.path.join(cache_dir, SHARD_GLOB)) + [
        p for p in (os.path.join(cache_dir, n) for n in names) if os.path.exists(p)])


class LatentCacheWriter(BasePredictionWriter):
    """Writes predict outputs {latents, latents_flip, labels, indices} as per-rank shards of shard_size items.

    At the end, statistics are reduced across ranks and rank 0 writes latents_stats.pt and metadata.json
    from the module's cache_metadata(image_size) and the datamodule's cache_metadata().

    Args:
        output_dir: the cache folder (on storage that every node sees).
        dtype: storage dtype of the latents, 'fp32' or 'bf16' (half the disk).
        shard_size: items per shard file.
        overwrite: replace an existing cache in output_dir (otherwise it is refused).
    """

    def __init__(self, output_dir: str, dtype: str = "fp32", shard_size: int = 4096, overwrite: bool = False):
        super().__init__(write_interval="batch")
        if dtype not in CACHE_DTYPES:
            raise ValueError(f"cache dtype must be one of {sorted(CACHE_DTYPES)}, got {dtype!r}")
        self.output_dir, self.dtype, self.shard_size, self.overwrite = output_dir, dtype, shard_size, overwrite

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "predict":
            return
        self._buffer, self._buffered, self._seen, self._shards = [], 0, set(), {}  # shards: path -> (sums, info)
        old = cache_files(self.output_dir)
        foreign = sorted(set(glob.glob(os.path.join(self.output_dir, "*.safetensors"))) - set(old))
        if foreign:  # never deleted, and LightningDiT's loader would read them as shards
            raise FileExistsError(f"latent cache folder {self.output_dir} holds other .safetensors files "
                                  f"({os.path.basename(foreign[0])}, ...); choose an empty output_dir")
        if old and not self.overwrite:
            if os.path.isfile(os.path.join(self.output_dir, METADATA_FILE)):
                meta = read_metadata(self.output_dir)
                state = (f"already holds a complete cache ({meta.get('count')} latents made by "
                         f"{describe_identity(meta.get('autoencoder', {}))}), left unchanged")
            else:
                state = f"holds {len(old)} files of an unfinished caching run"
            raise FileExistsError(f"latent cache folder {self.output_dir} {state}; choose another output_dir or set "
                                  f"overwrite: true to replace it")
        if trainer.is_global_zero:
            os.makedirs(self.output_dir, exist_ok=True)
            for path in old:
                os.remove(path)
        trainer.strategy.barrier()

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        if prediction is None:  # a batch whose every image was skipped
            return
        out = {k: v.detach().cpu() for k, v in prediction.items()}
        keep = []
        for j, i in enumerate(out["indices"].tolist()):
            if i not in self._seen:  # a sampler that pads would repeat indices: each is written once
                self._seen.add(i)
                keep.append(j)
        if keep:
            self._buffer.append({k: v[keep] for k, v in out.items()})
            self._buffered += len(keep)
        while self._buffered >= self.shard_size:
            self._flush(trainer.global_rank, self.shard_size)

    def _flush(self, rank: int, size: int | None = None) -> None:
        """Write the first `size` buffered items (all when None) as the next shard of this rank."""
        if not self._buffered:
            return
        data = {k: torch.cat([b[k] for b in self._buffer]) for k in self._buffer[0]}
        size = self._buffered if size is None else size
        rest = {k: v[size:] for k, v in data.items()}
        self._buffer, self._buffered = ([rest] if len(rest["indices"]) else []), len(rest["indices"])
        path = os.path.join(self.output_dir, f"shard-r{rank}-{len(self._shards):05d}.safetensors")
        self._shards[path] = save_shard(path, {k: v[:size] for k, v in data.items()}, self.dtype)

    def _drop_cross_rank_duplicates(self, rank: int) -> None:
        """Exact counts even under a padding sampler: an index already written by a lower rank is removed."""
        earlier = set().union(*[set(s) for s in _gather(sorted(self._seen))[:rank]])
        dup = self._seen & earlier
        if not dup:
            return
        for path in list(self._shards):
            data = load_shard(path, self._shards[path][1])
            keep = torch.tensor([i not in dup for i in data["indices"].tolist()])
            if not keep.all():
                self._shards[path] = save_shard(path, {k: v[keep] for k, v in data.items()}, self.dtype)
        self._seen -= dup

    def on_predict_end(self, trainer, pl_module) -> None:
        rank = trainer.global_rank
        self._flush(rank)
        self._drop_cross_rank_duplicates(rank)
        data_meta = trainer.datamodule.cache_metadata()
        meta = {**pl_module.cache_metadata(data_meta["image_size"]), **data_meta}
        sums = sum((s for s, _ in self._shards.values()), torch.zeros(3, meta["latent_shape"][0], dtype=torch.float64))
        sums = torch.cat([sums.flatten(), torch.tensor([len(self._seen)], dtype=torch.float64)])
        if dist.is_available() and dist.is_initialized():
            sums = sums.to(pl_module.device)  # NCCL reduces device tensors only
            dist.all_reduce(sums)
        sums, count = sums.cpu()[:-1].view(3, -1), sums.cpu()[-1]
        shards = {os.path.basename(p): info for rank_shards in _gather({p: i for p, (_, i) in self._shards.items()})
                  for p, info in rank_shards.items()}
        if trainer.is_global_zero:
            finish_cache(self.output_dir, sums, int(count.item()), shards, meta, self.dtype)
        trainer.strategy.barrier()


#################################################################################
#                 Reading: metadata (its checks: tcae_ldm.latents.checks)       #
#################################################################################

def read_metadata(cache_dir: str) -> dict:
    path = os.path.join(cache_dir, METADATA_FILE)
    if not os.path.isfile(path):
        foreign = foreign_layout(cache_dir)
        if foreign:
            raise FileNotFoundError(foreign)
        state = "has shards but no metadata.json (an unfinished caching run)" if glob.glob(
            os.path.join(cache_dir, SHARD_GLOB)) else "does not exist or is empty"
        raise FileNotFoundError(f"latent cache {cache_dir} {state}; write it with "
                                f"`tcae-ldm predict --config configs/cache_latents_<autoencoder>.yaml`")
    try:
        with open(path) as f:
            meta = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"latent cache metadata {path} is unreadable ({e}); re-cache") from None
    if meta.get("format", 1) > CACHE_FORMAT:
        raise ValueError(f"latent cache {cache_dir} has format {meta['format']}; this code reads up to "
                         f"{CACHE_FORMAT}: update tcae-ldm")
    for name in [*meta.get("shards", []), *(meta.get("shard_info") or {})]:
        plain_name(name, f"latent cache metadata {path}")
    return meta
