"""Image datasets and the datamodule base: ImageNet-style folders, per-device batches, corrupt-file policy.

A batch is a dict: ``image`` (B, 3, H, W) in [-1, 1], ``label`` (B,) int64, ``skipped`` (number of
unreadable files dropped from this batch; always 0 unless ``skip_corrupt`` is on).
"""
from __future__ import annotations

import logging
import os
from typing import Callable

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.datasets.folder import IMG_EXTENSIONS

from tcae_ldm.data.transforms import ImageTransform, center_crop_arr
from tcae_ldm.data.views import MultiCropConfig, train_transform

log = logging.getLogger(__name__)


class CorruptImageError(RuntimeError):
    """An image file that PIL cannot decode."""


def read_image(path: str) -> Image.Image:
    """The RGB image in a file, or a CorruptImageError naming the file."""
    try:
        with Image.open(path) as f:
            return f.convert("RGB")
    except Exception as e:  # PIL raises several types for truncated or non-image files
        raise CorruptImageError(f"cannot read image {path}: {e}") from e


def find_images(root: str) -> list[str]:
    """Every image file under root, recursively, in a stable order."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder {root!r} does not exist")
    paths = [os.path.join(d, f) for d, _, files in os.walk(root, followlinks=True) for f in files
             if f.lower().endswith(IMG_EXTENSIONS)]
    if not paths:
        raise FileNotFoundError(f"no image files ({', '.join(IMG_EXTENSIONS)}) under {root!r}")
    return sorted(paths)


def scan_image_folder(root: str) -> tuple[list[tuple[str, int]], list[str]]:
    """(path, class index) for every image under root/<class>/..., and the sorted class names."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder {root!r} does not exist")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not classes:
        raise FileNotFoundError(f"image folder {root!r} has no class sub-folders (expected {root}/<class>/<image>)")
    samples = []
    for idx, name in enumerate(classes):
        for dirpath, _, files in sorted(os.walk(os.path.join(root, name), followlinks=True)):
            samples += [(os.path.join(dirpath, f), idx) for f in sorted(files) if f.lower().endswith(IMG_EXTENSIONS)]
    if not samples:
        raise FileNotFoundError(f"image folder {root!r} has class folders {classes[:5]} but no image files "
                                f"({', '.join(IMG_EXTENSIONS)})")
    return samples, classes


class ImageFolderDataset(Dataset):
    """ImageNet-style tree root/<class>/<image>; a corrupt file raises naming it, or yields None if skipped."""

    def __init__(self, root: str, transform: Callable[[Image.Image], dict], skip_corrupt: bool = False):
        self.samples, self.classes = scan_image_folder(root)
        self.transform, self.skip_corrupt = transform, skip_corrupt

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        try:
            img = read_image(path)
        except CorruptImageError as e:
            if self.skip_corrupt:
                log.warning("skipping an unreadable image: %s", e)
                return None
            raise CorruptImageError(f"{e} (set data.skip_corrupt: true to skip such files)") from e.__cause__
        return {**self.transform(img), "label": label}


class CroppedImageFiles(Dataset):
    """Image files -> uint8 (3, S, S) ADM centre crops (FID statistics of folders and sample folders)."""

    def __init__(self, paths: list[str], image_size: int):
        self.paths, self.image_size = paths, image_size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        arr = np.asarray(center_crop_arr(read_image(self.paths[i]), self.image_size), dtype=np.uint8)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def collate_skipping(items: list) -> dict:
    """Default collation that drops skipped (None) items and counts them."""
    kept = [it for it in items if it is not None]
    batch = torch.utils.data.default_collate(kept) if kept else {}
    batch["skipped"] = len(items) - len(kept)
    return batch


class ImageDataModule(L.LightningDataModule):
    """Shared loader logic: global -> per-device batch size, workers, pinned memory.

    Args:
        image_size: side of the square training images (ADM centre crop); the autoencoder's image_size is linked
            to it.
        global_batch_size: images per optimizer step across all devices and accumulation steps.
        num_workers: DataLoader worker processes per device (0: load in the main process).
        hflip: random horizontal flips of the training images.
        pin_memory: page-locked batches for faster host-to-GPU copies (CUDA only).
        persistent_workers: keep the workers alive between epochs.
        val_batch_size: validation images per device (default: the per-device training batch).
        seed: seed of the shuffling (and of the demo's crops).
        views: iBOT's multi-crop views of each training image (null: none; needed when the model trains with ssl).
    """

    def __init__(self, image_size: int = 256, global_batch_size: int = 256, num_workers: int = 8,
                 hflip: bool = True, pin_memory: bool = True, persistent_workers: bool = True,
                 val_batch_size: int | None = None, seed: int = 0, views: MultiCropConfig | None = None):
        super().__init__()
        self.seed, self.views = seed, views
        self.image_size, self.global_batch_size, self.num_workers = image_size, global_batch_size, num_workers
        self.hflip, self.pin_memory, self.persistent_workers = hflip, pin_memory, persistent_workers
        self.val_batch_size = val_batch_size
        self.train_set = self.val_set = None
        self.num_classes = 0

    @property
    def per_device_batch_size(self) -> int:
        world = self.trainer.world_size if self.trainer is not None else 1
        accum = self.trainer.accumulate_grad_batches if self.trainer is not None else 1
        if self.global_batch_size % (world * accum):
            raise ValueError(f"global_batch_size={self.global_batch_size} is not divisible by "
                             f"{world} devices x {accum} accumulation steps")
        return self.global_batch_size // (world * accum)

    def _loader(self, dataset, batch_size, shuffle, drop_last):
        workers = self.num_workers
        sampler = None
        if shuffle:
            # An epoch-seeded sampler even on one device: Lightning calls set_epoch, so the order of every
            # epoch depends only on (seed, epoch) and a resumed run sees the batches the uninterrupted one saw.
            world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
            sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=self.seed,
                                         drop_last=drop_last)
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                          num_workers=workers, pin_memory=self.pin_memory and torch.cuda.is_available(),
                          persistent_workers=self.persistent_workers and workers > 0,
                          collate_fn=collate_skipping)

    def train_dataloader(self):
        bs = self.per_device_batch_size
        return self._loader(self.train_set, bs, shuffle=True, drop_last=len(self.train_set) >= bs)

    def val_dataloader(self):
        return self._loader(self.val_set, self.val_batch_size or self.per_device_batch_size, False, False)

    def test_dataloader(self):
        return self.val_dataloader()


class ImageFolderDataModule(ImageDataModule):
    """ImageNet-style data: root/train/<class>/* and root/val/<class>/*.

    Args:
        root: folder holding the train and val folders.
        train_dir: training split's folder under root.
        val_dir: validation split's folder under root.
        skip_corrupt: skip unreadable files (counted as data/skipped) instead of stopping with their name.
    """

    def __init__(self, root: str, train_dir: str = "train", val_dir: str = "val", skip_corrupt: bool = False,
                 **kwargs):
        super().__init__(**kwargs)
        self.root, self.train_dir, self.val_dir, self.skip_corrupt = root, train_dir, val_dir, skip_corrupt

    def setup(self, stage: str | None = None):
        if self.train_set is not None:
            return
        self.train_set = ImageFolderDataset(os.path.join(self.root, self.train_dir),
                                            train_transform(self.image_size, self.hflip, self.views),
                                            self.skip_corrupt)
        self.val_set = ImageFolderDataset(os.path.join(self.root, self.val_dir),
                                          ImageTransform(self.image_size, False), self.skip_corrupt)
        self.num_classes = len(self.train_set.classes)
