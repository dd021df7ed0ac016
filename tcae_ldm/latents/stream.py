"""The latent stream that feeds the DiT: cached latents as an endless, resumable, rank-split stream of batches."""
from __future__ import annotations

import os

import lightning as L
import numpy as np
import torch
from safetensors import safe_open
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from tcae_ldm.data.images import ImageDataModule
from tcae_ldm.latents.cache import LatentNormalizer, read_metadata
from tcae_ldm.latents.checks import (
    ExpectedAutoencoder,
    check_cache,
    check_expected_keys,
    verify_cache,
)
from tcae_ldm.latents.shards import ShardError, check_labels, load_shard, plain_name, verify_shard
from tcae_ldm.utils.seeding import default_seed, seed_of


class LatentDataset(Dataset):
    """Raw cached items {latent, latent_flip, label, index}, each dataset index once, in index order.

    in_memory loads every shard, checking its size and CRC-32 against `infos` (metadata.json's shard_info) as it
    is opened; otherwise items are read from the memory-mapped shards, which the page cache shares between the
    ranks of a machine, and each shard gets the same checks before its first item is served, once per process
    (lazily: start-up reads only the labels). Latents must be finite and labels in [0, num_classes). A damaged
    shard is a ShardError naming it (and the row).
    """

    def __init__(self, cache_dir: str, shards: list[str], in_memory: bool = True, with_flip: bool = True,
                 infos: dict | None = None, num_classes: int | None = None):
        where = f"latent cache metadata {os.path.join(cache_dir, 'metadata.json')}"
        self.paths = [os.path.join(cache_dir, plain_name(s, where)) for s in shards]
        self.keys = {"latent": "latents", "latent_flip": "latents_flip"} if with_flip else {"latent": "latents"}
        self.infos, self.num_classes = [(infos or {}).get(s) for s in shards], num_classes
        loaded = [load_shard(p, i, num_classes) for p, i in zip(self.paths, self.infos)] if in_memory else None
        rows, labels = {}, {}
        for s, path in enumerate(self.paths):
            if loaded is not None:
                indices, ys = loaded[s]["indices"], loaded[s]["labels"]
            else:
                with self._open(path) as f:
                    indices, ys = f.get_tensor("indices"), f.get_tensor("labels")
                check_labels({"labels": ys, "indices": indices}, path, num_classes)
            for r, (i, y) in enumerate(zip(indices.tolist(), ys.tolist())):
                if i not in rows:
                    rows[i], labels[i] = (s, r), y
        self.indices = sorted(rows)
        self.rows = [rows[i] for i in self.indices]
        self.labels = torch.tensor([labels[i] for i in self.indices], dtype=torch.long)
        self.data, self._handles = None, {}
        if in_memory:
            shards = loaded
            offsets = np.cumsum([0] + [len(sh["indices"]) for sh in shards])
            pos = torch.as_tensor([offsets[s] + r for s, r in self.rows], dtype=torch.long)
            self.data = {k: torch.cat([sh[k] for sh in shards])[pos] for k in self.keys.values()}

    def __len__(self):
        return len(self.indices)

    @staticmethod
    def _open(path: str):
        try:
            return safe_open(path, "pt")
        except Exception as e:  # safetensors' own error does not name the file
            raise ShardError(f"cache shard {path} cannot be read ({e})") from None

    def _row(self, key: str, s: int, r: int) -> torch.Tensor:
        if s not in self._handles:  # opened lazily, so that each DataLoader worker has its own mmap
            # checked whole before its first item: a garbled shard is named here, not blamed on the loss later
            verify_shard(self.paths[s], self.infos[s], self.num_classes)
            self._handles[s] = self._open(self.paths[s])
        return self._handles[s].get_slice(key)[r: r + 1][0]

    def __getitem__(self, n):
        s, r = self.rows[n]
        get = (lambda k: self.data[k][n]) if self.data is not None else (lambda k: self._row(k, s, r))
        return {"label": self.labels[n], "index": self.indices[n], **{k: get(v) for k, v in self.keys.items()}}

    def __getstate__(self):
        return {**self.__dict__, "_handles": {}}


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

    Args:
        cache_dir: the latent cache folder (written by a cache_latents config); it also sets the DiT's latent
            shape and number of classes.
        global_batch_size: latents per optimizer step across all devices and accumulation steps.
        num_workers: DataLoader worker processes per device.
        in_memory: load every shard into RAM (else memory-map them, shared by the ranks through the page cache).
        random_flip: each item is the latent of the image or of its mirror image, chosen per pass.
        expect_autoencoder: identity the cache's autoencoder must have ({kind, name, ...}): another is refused.
        expect_image_size: image size the cache must have been made at.
        seed: seed of the order and the flips (default: the run's seed_everything).
        pin_memory: page-locked batches for faster host-to-GPU copies (CUDA only).
        persistent_workers: keep the workers alive between passes.
    """

    per_device_batch_size = ImageDataModule.per_device_batch_size  # the same global -> per-device rule

    def __init__(self, cache_dir: str, global_batch_size: int = 256, num_workers: int = 4, in_memory: bool = True,
                 random_flip: bool = True, expect_autoencoder: ExpectedAutoencoder | None = None,
                 expect_image_size: int | None = None, seed: int | None = None, pin_memory: bool = True,
                 persistent_workers: bool = True):
        super().__init__()
        check_expected_keys(expect_autoencoder)  # a misspelt key would switch the check off
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
            verify_cache(self.cache_dir, meta)  # every shard there, whole, and as metadata.json describes it
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
        self.train_set = LatentDataset(self.cache_dir, shards, self.in_memory, self.random_flip,
                                       self.metadata.get("shard_info"), self.num_classes)

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
