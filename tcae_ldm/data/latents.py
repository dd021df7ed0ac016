"""Latent cache: its writer (predict side, see tcae_ldm.lit.caching) and the LatentDataModule that feeds the DiT.

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

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from lightning.pytorch.callbacks import BasePredictionWriter
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from tcae_ldm.data.images import ImageDataModule
from tcae_ldm.models.autoencoders import describe_identity, identity_mismatch

SHARD_GLOB = "shard-r*-*.safetensors"
CACHE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def default_seed(seed: int | None) -> int:
    """An explicit seed, else the one seed_everything exported (so one config key seeds every process)."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0)) if seed is None else seed


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


class LatentCacheWriter(BasePredictionWriter):
    """Writes predict outputs {latents, latents_flip, labels, indices} as per-rank shards of shard_size items.

    At the end, statistics are reduced across ranks and rank 0 writes stats.safetensors and metadata.json
    from the module's cache_metadata(image_size) and the datamodule's cache_metadata().
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
        self._save_shard(path, {k: v[:size] for k, v in data.items()})

    def _save_shard(self, path: str, data: dict) -> None:
        dtype = CACHE_DTYPES[self.dtype]
        shard = {"latents": data["latents"].to(dtype).contiguous(),
                 "latents_flip": data["latents_flip"].to(dtype).contiguous(),
                 "labels": data["labels"].long().contiguous(), "indices": data["indices"].long().contiguous()}
        save_file(shard, path + ".tmp")
        os.replace(path + ".tmp", path)  # a crash never leaves a half-written shard under a shard name
        self._shards[path] = _channel_sums(shard["latents"], shard["latents_flip"])  # of the stored values

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
                self._save_shard(path, {k: v[keep] for k, v in data.items()})
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
        shards = sorted(os.path.basename(p) for names in _gather(list(self._shards)) for p in names)
        if trainer.is_global_zero:
            mean = sums[0] / sums[2]
            std = (sums[1] / sums[2] - mean * mean).clamp_min(1e-12).sqrt()
            save_file({"mean": mean.float(), "std": std.float()}, os.path.join(self.output_dir, "stats.safetensors"))
            meta = {"format": 1, **meta, "count": int(count.item()), "dtype": self.dtype, "shards": shards,
                    "stats": "per-channel mean/std over latents and latents_flip"}
            tmp = os.path.join(self.output_dir, "metadata.json.tmp")
            with open(tmp, "w") as f:
                json.dump(meta, f, indent=2)
            os.replace(tmp, os.path.join(self.output_dir, "metadata.json"))
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


class LatentDataset(Dataset):
    """Raw cached items {latent, latent_flip, label, index}, each dataset index once, in index order.

    in_memory loads every shard; otherwise items are read from the memory-mapped shards, which the page
    cache shares between the ranks of a machine.
    """

    def __init__(self, cache_dir: str, shards: list[str], in_memory: bool = True, with_flip: bool = True):
        self.paths = [os.path.join(cache_dir, s) for s in shards]
        self.keys = {"latent": "latents", "latent_flip": "latents_flip"} if with_flip else {"latent": "latents"}
        rows, labels = {}, {}
        for s, path in enumerate(self.paths):
            with safe_open(path, "pt") as f:
                for r, (i, y) in enumerate(zip(f.get_tensor("indices").tolist(), f.get_tensor("labels").tolist())):
                    if i not in rows:
                        rows[i], labels[i] = (s, r), y
        self.indices = sorted(rows)
        self.rows = [rows[i] for i in self.indices]
        self.labels = torch.tensor([labels[i] for i in self.indices], dtype=torch.long)
        self.data, self._handles = None, {}
        if in_memory:
            shards = [load_file(p) for p in self.paths]
            offsets = np.cumsum([0] + [len(sh["indices"]) for sh in shards])
            pos = torch.as_tensor([offsets[s] + r for s, r in self.rows], dtype=torch.long)
            self.data = {k: torch.cat([sh[k] for sh in shards])[pos] for k in self.keys.values()}

    def __len__(self):
        return len(self.indices)

    def _row(self, key: str, s: int, r: int) -> torch.Tensor:
        if s not in self._handles:  # opened lazily, so that each DataLoader worker has its own mmap
            self._handles[s] = safe_open(self.paths[s], "pt")
        return self._handles[s].get_slice(key)[r: r + 1][0]

    def __getitem__(self, n):
        s, r = self.rows[n]
        get = (lambda k: self.data[k][n]) if self.data is not None else (lambda k: self._row(k, s, r))
        return {"label": self.labels[n], "index": self.indices[n], **{k: get(v) for k, v in self.keys.items()}}

    def __getstate__(self):
        return {**self.__dict__, "_handles": {}}


def seed_of(*parts: int) -> int:
    """A well-mixed 32-bit seed from integers (seed, step, rank, ...): no two tuples share a stream."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def flip_choice(index: int, epoch: int, seed: int) -> bool:
    """Whether pass `epoch` uses the flipped latent of item `index`: fixed by (seed, epoch, index) alone."""
    return bool(seed_of(seed, epoch, index) & 1)


class LatentStream(IterableDataset):
    """Endless, resumable stream of one rank's training items {latent (normalised), label, index}.

    Pass p visits a (seed, p) permutation of the cache, split across ranks; item q of a rank's stream
    depends only on (seed, rank, world size, q), and each item's flip variant on (seed, p, index). Batch b of
    size B holds items [bB, (b + 1)B); starting at batch `start` resumes a run exactly, in any epoch phase.
    DataLoader worker w of W makes batches start + w, start + w + W, ..., which the loader's round-robin
    returns in order.
    """

    def __init__(self, data: LatentDataset, normalizer: LatentNormalizer, batch_size: int, seed: int,
                 rank: int = 0, world: int = 1):
        self.data, self.normalizer, self.batch_size, self.seed = data, normalizer, batch_size, seed
        self.rank, self.world, self.start = rank, world, 0
        self.per_rank = len(data) // world  # the tail of each pass that does not split evenly is skipped
        if self.per_rank == 0:
            raise ValueError(f"a cache of {len(data)} latents cannot feed {world} ranks")
        self._perm = (None, None)

    def item(self, q: int) -> dict:
        p, o = divmod(q, self.per_rank)
        if self._perm[0] != p:
            self._perm = (p, torch.randperm(len(self.data), generator=torch.Generator().manual_seed(
                seed_of(self.seed, p))))
        n = int(self._perm[1][self.rank + o * self.world])
        item = self.data[n]
        z = item["latent"]
        if "latent_flip" in item and flip_choice(item["index"], p, self.seed):
            z = item["latent_flip"]
        return {"latent": self.normalizer.normalize(z.float()[None])[0], "label": item["label"],
                "index": item["index"]}

    def __iter__(self):
        info = get_worker_info()
        w, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        b = self.start + w
        while True:
            for q in range(b * self.batch_size, (b + 1) * self.batch_size):
                yield self.item(q)
            b += workers


class ResumableLoader(DataLoader):
    """A DataLoader that Lightning saves in checkpoints (state_dict / load_state_dict): batches consumed."""

    consumed = 0

    def state_dict(self) -> dict:
        return {"batches": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.consumed = self.dataset.start = int(state["batches"])


class LatentDataModule(L.LightningDataModule):
    """Cached latents for DiT training: an endless stream of batches {latent (normalised), label, index}.

    There are no epochs (set trainer.max_steps); the stream position is checkpointed, so resuming from any
    step replays exactly what an uninterrupted run sees next.
    """

    per_device_batch_size = ImageDataModule.per_device_batch_size  # the same global -> per-device rule

    def __init__(self, cache_dir: str, global_batch_size: int = 256, num_workers: int = 4, in_memory: bool = True,
                 random_flip: bool = True, expect_autoencoder: dict | None = None,
                 expect_image_size: int | None = None, seed: int | None = None, pin_memory: bool = True,
                 persistent_workers: bool = True):
        super().__init__()
        self.cache_dir, self.global_batch_size, self.num_workers = cache_dir, global_batch_size, num_workers
        self.in_memory, self.random_flip, self.seed = in_memory, random_flip, default_seed(seed)
        self.expect_autoencoder, self.expect_image_size = expect_autoencoder, expect_image_size
        self.pin_memory, self.persistent_workers = pin_memory, persistent_workers
        self._metadata, self.train_set, self.normalizer, self._loader = None, None, None, None

    @property
    def metadata(self) -> dict:
        if self._metadata is None:
            meta = read_metadata(self.cache_dir)
            check_cache(meta, self.cache_dir, self.expect_autoencoder, self.expect_image_size)
            self._metadata = meta
        return self._metadata

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return tuple(self.metadata["latent_shape"])

    @property
    def num_classes(self) -> int:
        return int(self.metadata["num_classes"])

    def setup(self, stage: str | None = None):
        if self.train_set is not None:
            return
        shards = self.metadata["shards"]  # reads and checks metadata.json first
        self.normalizer = LatentNormalizer.from_cache(self.cache_dir)
        self.train_set = LatentDataset(self.cache_dir, shards, self.in_memory, self.random_flip)

    def train_dataloader(self) -> ResumableLoader:
        trainer = self.trainer
        if trainer is not None and trainer.max_steps in (-1, None):
            raise ValueError("LatentDataModule streams the cache without epochs: set trainer.max_steps")
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        stream = LatentStream(self.train_set, self.normalizer, self.per_device_batch_size, self.seed, rank, world)
        self._loader = ResumableLoader(stream, batch_size=stream.batch_size, num_workers=self.num_workers,
                                       pin_memory=self.pin_memory and torch.cuda.is_available(),
                                       persistent_workers=self.persistent_workers and self.num_workers > 0)
        return self._loader

    def on_before_batch_transfer(self, batch, dataloader_idx):
        if self._loader is not None and self.trainer is not None and self.trainer.training:
            self._loader.consumed += 1  # counted where the loop takes a batch, after any prefetching
        return batch
