"""The latent cache: its on-disk format, the writer that fills it (the predict side of `tcae-ldm predict`), the
images it is made from, the per-channel normaliser, and the checks that refuse a cache the run did not expect.

A cache is one folder:
  shard-r{rank}-{i:05d}.safetensors  latents, latents_flip (N, c, h, w); labels, indices (N,) int64
  stats.safetensors                  mean, std (c,): per channel, over every latent and its flip
  metadata.json                      autoencoder identity + spec, image size, latent shape, count, classes
metadata.json is written last, so a folder without it is an unfinished cache and is refused.
"""
from __future__ import annotations

import glob
import json
import os
from typing import Literal

import lightning as L
import torch
import torch.distributed as dist
import torch.nn as nn
from lightning.pytorch.callbacks import BasePredictionWriter
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset

from tcae_ldm.data.images import ImageDataModule, collate_skipping
from tcae_ldm.latents.frozen import describe_identity, identity_mismatch

SHARD_GLOB = "shard-r*-*.safetensors"
CACHE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


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

class LatentNormalizer(nn.Module):
    """Per-channel (z - mean) / std and its inverse; the only place that maps cache latents <-> DiT space."""

    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("std", torch.ones(channels))

    @classmethod
    def from_cache(cls, cache_dir: str) -> "LatentNormalizer":
        stats = load_file(os.path.join(cache_dir, "stats.safetensors"))
        norm = cls(stats["mean"].numel())
        norm.mean.copy_(stats["mean"])
        norm.std.copy_(stats["std"])
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


def save_shard(path: str, data: dict, dtype: str) -> torch.Tensor:
    """Write one shard {latents, latents_flip, labels, indices}; returns its per-channel sums (of the stored
    values). Written under a temporary name first, so a crash never leaves a half-written shard."""
    cast = CACHE_DTYPES[dtype]
    shard = {"latents": data["latents"].to(cast).contiguous(), "latents_flip": data["latents_flip"].to(cast).contiguous(),
             "labels": data["labels"].long().contiguous(), "indices": data["indices"].long().contiguous()}
    save_file(shard, path + ".tmp")
    os.replace(path + ".tmp", path)
    return _channel_sums(shard["latents"], shard["latents_flip"])


def finish_cache(output_dir: str, sums: torch.Tensor, count: int, shards: list[str], meta: dict, dtype: str) -> None:
    """Write stats.safetensors from the reduced sums (3, c), then metadata.json, the mark of a complete cache."""
    mean = sums[0] / sums[2]
    std = (sums[1] / sums[2] - mean * mean).clamp_min(1e-12).sqrt()
    save_file({"mean": mean.float(), "std": std.float()}, os.path.join(output_dir, "stats.safetensors"))
    meta = {"format": 1, **meta, "count": int(count), "dtype": dtype, "shards": sorted(shards),
            "stats": "per-channel mean/std over latents and latents_flip"}
    tmp = os.path.join(output_dir, "metadata.json.tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=2)
    os.replace(tmp, os.path.join(output_dir, "metadata.json"))


def write_cache(output_dir: str, latents: torch.Tensor, latents_flip: torch.Tensor, labels: torch.Tensor,
                meta: dict, dtype: str = "fp32") -> str:
    """A complete one-shard cache from tensors in memory (benchmarks, tests); `meta` holds at least
    autoencoder, image_size, latent_shape and num_classes, as a caching run records them."""
    os.makedirs(output_dir, exist_ok=True)
    name = "shard-r0-00000.safetensors"
    data = {"latents": latents, "latents_flip": latents_flip, "labels": labels,
            "indices": torch.arange(len(latents))}
    sums = save_shard(os.path.join(output_dir, name), data, dtype)
    finish_cache(output_dir, sums, len(latents), [name], meta, dtype)
    return output_dir


class LatentCacheWriter(BasePredictionWriter):
    """Writes predict outputs {latents, latents_flip, labels, indices} as per-rank shards of shard_size items.

    At the end, statistics are reduced across ranks and rank 0 writes stats.safetensors and metadata.json
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
        self._buffer, self._buffered, self._seen, self._shards = [], 0, set(), {}  # shards: path -> sums
        old = glob.glob(os.path.join(self.output_dir, SHARD_GLOB)) + [
            p for p in (os.path.join(self.output_dir, n) for n in ("stats.safetensors", "metadata.json"))
            if os.path.exists(p)]
        if old and not self.overwrite:
            raise FileExistsError(f"latent cache folder {self.output_dir} already holds {len(old)} cache files; "
                                  f"choose another output_dir or set overwrite: true to replace them")
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
            data = load_file(path)
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
        sums = sum(self._shards.values(), torch.zeros(3, meta["latent_shape"][0], dtype=torch.float64))
        sums = torch.cat([sums.flatten(), torch.tensor([len(self._seen)], dtype=torch.float64)])
        if dist.is_available() and dist.is_initialized():
            sums = sums.to(pl_module.device)  # NCCL reduces device tensors only
            dist.all_reduce(sums)
        sums, count = sums.cpu()[:-1].view(3, -1), sums.cpu()[-1]
        shards = [os.path.basename(p) for names in _gather(list(self._shards)) for p in names]
        if trainer.is_global_zero:
            finish_cache(self.output_dir, sums, int(count.item()), shards, meta, self.dtype)
        trainer.strategy.barrier()


#################################################################################
#                        Reading: shards -> DiT batches                         #
#################################################################################

def read_metadata(cache_dir: str) -> dict:
    path = os.path.join(cache_dir, "metadata.json")
    if not os.path.isfile(path):
        state = "has shards but no metadata.json (an unfinished caching run)" if glob.glob(
            os.path.join(cache_dir, SHARD_GLOB)) else "does not exist or is empty"
        raise FileNotFoundError(f"latent cache {cache_dir} {state}; write it with "
                                f"`tcae-ldm predict --config configs/cache_latents_<autoencoder>.yaml`")
    with open(path) as f:
        return json.load(f)


def check_cache(metadata: dict, cache_dir: str, expect_autoencoder: dict | None = None,
                expect_image_size: int | None = None) -> None:
    """Refuse a cache made by another autoencoder or at another resolution than the run expects."""
    if expect_autoencoder:
        bad = identity_mismatch(expect_autoencoder, metadata["autoencoder"])
        if bad:
            raise ValueError(f"latent cache {cache_dir} was made by {describe_identity(metadata['autoencoder'])}, "
                             f"but this run expects {describe_identity(expect_autoencoder)} (differs in {bad}); "
                             f"re-cache with the expected autoencoder or point cache_dir at its cache")
    if expect_image_size is not None and metadata["image_size"] != expect_image_size:
        raise ValueError(f"latent cache {cache_dir} holds latents of {metadata['image_size']}x"
                         f"{metadata['image_size']} images, but this run expects {expect_image_size}x"
                         f"{expect_image_size} (made by {describe_identity(metadata['autoencoder'])})")
