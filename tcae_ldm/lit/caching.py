"""Making a latent cache: `tcae-ldm predict` with a frozen autoencoder turns a split of images into latents.

CacheSourceDataModule serves the images (no flips, no shuffling, with their dataset indices),
LatentCacheModule encodes each image and its mirror image, and LatentCacheWriter (tcae_ldm.data.latents)
writes the shards, the statistics and the metadata. cache_latents() runs the same thing from Python.
"""
from __future__ import annotations

from typing import Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from tcae_ldm.data.images import ImageDataModule, collate_skipping
from tcae_ldm.data.latents import LatentCacheWriter
from tcae_ldm.models.autoencoders import AutoencoderSpec, FrozenAutoencoder, load_autoencoder


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
    """The images a cache is made from: a split of an image datamodule, without flips or shuffling."""

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


class LatentCacheModule(L.LightningModule):
    """predict_step: images (B, 3, H, W) -> latents of the images and of their horizontal flips."""

    def __init__(self, autoencoder: AutoencoderSpec):
        super().__init__()
        self.autoencoder: FrozenAutoencoder = load_autoencoder(**autoencoder)
        self.spec = self.autoencoder.spec()  # absolute paths, so a cache can be decoded from anywhere

    def predict_step(self, batch, batch_idx):
        if "image" not in batch:
            return None  # every file of this batch was unreadable and skipped
        x = batch["image"]
        n = x.shape[0]
        z = self.autoencoder.encode(torch.cat([x, x.flip(-1)]))  # (2B, c, h, w): one pass for both variants
        return {"latents": z[:n], "latents_flip": z[n:], "labels": batch["label"], "indices": batch["index"]}

    def cache_metadata(self, image_size: int) -> dict:
        return {"autoencoder": self.autoencoder.identity(), "autoencoder_spec": self.spec,
                "latent_shape": list(self.autoencoder.latent_shape(image_size)),
                "autoencoder_gmacs": round(self.autoencoder.gmacs(image_size), 4)}


def cache_latents(autoencoder: AutoencoderSpec, images: ImageDataModule, output_dir: str, batch_size: int = 64,
                  dtype: str = "fp32", shard_size: int = 4096, overwrite: bool = False, split: str = "train",
                  **trainer_kwargs) -> str:
    """Encode a split of an image datamodule into a latent cache at output_dir (what the predict configs do)."""
    trainer_kwargs = {"accelerator": "auto", "devices": 1, "logger": False, "enable_progress_bar": False,
                      "enable_model_summary": False, **trainer_kwargs}
    writer = LatentCacheWriter(output_dir, dtype=dtype, shard_size=shard_size, overwrite=overwrite)
    trainer = L.Trainer(callbacks=[writer], **trainer_kwargs)
    trainer.predict(LatentCacheModule(autoencoder), CacheSourceDataModule(images, batch_size, split=split),
                    return_predictions=False)
    return output_dir
