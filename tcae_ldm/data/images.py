"""Image datasets and the datamodule base: ImageNet-style folders, per-device batches, bad-file policy, and the
training loader's exact resume.

A batch is a dict: ``image`` (B, 3, H, W), ``label`` (B,) int64, ``skipped`` (unusable files dropped from this
batch; always 0 unless ``skip_corrupt`` is on), plus the iBOT views when the run trains jointly. Training
batches travel as uint8 and become float in [-1, 1] on the device (ImageDataModule.on_after_batch_transfer).

Every random draw of an item (flip, crops, colours) comes from a generator seeded by (seed, epoch, index): the
training sampler hands the dataset (epoch, index) keys, so a worker, a rank or a resumed run draws the same.
"""
from __future__ import annotations

import os
from typing import Callable, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS

from tcae_ldm.data.folders import (
    find_images,  # noqa: F401  (the commands import it from here)
    has_transparency,
    read_class_list,
    scan_image_folder,
    transparent_images,
)
from tcae_ldm.data.sampling import (
    EpochSampler,
    ResumableImageLoader,
    item_generator,
    key_of,
)
from tcae_ldm.data.transforms import ImageTransform, center_crop_arr
from tcae_ldm.data.views import MultiCropConfig, train_transform, views_to_unit


ORIENTATION_TAG = 0x0112  # EXIF Orientation
TRANSPARENT_BACKGROUND = (255, 255, 255)  # white, what browsers, torchvision-style RGB converts and most pipelines
                                          # show behind a transparent image


class UnusableImageError(RuntimeError):
    """An image file the pipeline cannot use; `skip_corrupt` skips (and counts) these."""


class CorruptImageError(UnusableImageError):
    """An image file that PIL cannot decode."""


class ImageTooSmallError(UnusableImageError):
    """An image whose short side is below the datamodule's minimum."""


#################################################################################
#                                 Decoding files                                 #
#################################################################################

def exif_orientation(img: Image.Image) -> int:
    """The EXIF orientation tag of an opened image (1: upright, 2-8: mirrored and/or rotated; 1 when absent)."""
    if img.format not in ("JPEG", "MPO", "TIFF", "WEBP"):  # PIL would decode a PNG whole to look for EXIF
        return 1
    value = img.getexif().get(ORIENTATION_TAG, 1)
    return value if value in range(1, 9) else 1


def upright(img: Image.Image, orientation: int) -> Image.Image:
    """The image as a viewer shows it: its EXIF orientation applied (a portrait photo stays portrait)."""
    return ImageOps.exif_transpose(img) if orientation > 1 else img


def _to_rgb8(img: Image.Image, path: str) -> Image.Image:
    """An 8-bit RGB image. Transparency is composited onto white (TRANSPARENT_BACKGROUND). 16-bit and 32-bit
    integer images are scaled (65535 -> 255), float images in [0, 1] likewise; PIL's own convert() clips them
    instead, which turns a mid-grey 16-bit PNG almost white."""
    if has_transparency(img):
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, TRANSPARENT_BACKGROUND + (255,)), rgba).convert("RGB")
    if img.mode == "RGB":
        img.load()
        return img
    if img.mode.startswith("I") or img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        top = 1.0 if img.mode == "F" else 65535.0
        if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > top:
            raise UnusableImageError(f"cannot use image {path}: mode {img.mode} with values in [{arr.min():g}, "
                                     f"{arr.max():g}], outside [0, {top:g}]; convert it to 8-bit RGB")
        img = Image.fromarray(np.round(arr * (255.0 / top)).astype(np.uint8), "L")
    return img.convert("RGB")


def load_item(path: str, transform, rng: torch.Generator | None, min_side: int = 0) -> dict:
    """transform's output for the image in `path`: its random choices are drawn from the file's header size,
    then the file is decoded (a JPEG at the reduced size the transform allows: PIL's draft mode, a scaled IDCT)
    and transformed. Unusable files raise an UnusableImageError that names them."""
    try:
        with Image.open(path) as f:
            orientation = exif_orientation(f)
            size = f.size[::-1] if orientation >= 5 else f.size  # 5-8 turn the image a quarter: as displayed
            if min(size) < min_side:
                raise ImageTooSmallError(f"image {path} is {size[0]}x{size[1]}, below data.min_image_side="
                                         f"{min_side} (lower it, or set data.skip_corrupt: true to skip such files)")
            params = transform.draw(size, rng)
            reduction = transform.decode_reduction(size, params)
            if reduction > 1 and f.format == "JPEG":  # the draft is of the stored (not yet turned) image
                f.draft(f.mode, (f.size[0] // reduction, f.size[1] // reduction))
            img = _to_rgb8(upright(f, orientation), path)
    except UnusableImageError:
        raise
    except Exception as e:  # PIL raises several types for truncated or non-image files
        raise CorruptImageError(f"cannot read image {path}: {e}") from e
    return transform.apply(img, params)


def read_image(path: str) -> Image.Image:
    """The 8-bit RGB image in a file (at full size), or an UnusableImageError naming the file."""
    try:
        with Image.open(path) as f:
            return _to_rgb8(upright(f, exif_orientation(f)), path)
    except UnusableImageError:
        raise
    except Exception as e:
        raise CorruptImageError(f"cannot read image {path}: {e}") from e


#################################################################################
#                                  Folders                                       #
#################################################################################

class ImageFolderDataset(Dataset):
    """ImageNet-style tree root/<class>/<image>; an unusable file raises naming it, or yields None if skipped."""

    def __init__(self, root: str, transform: Callable, skip_corrupt: bool = False, classes: list[str] | None = None,
                 min_side: int = 0, seed: int = 0):
        self.root = root
        self.samples, self.classes, self.empty_classes, self.ignored = scan_image_folder(root, classes)
        self.transparent = transparent_images([p for p, _ in self.samples])  # composited onto white when decoded
        self.transform, self.skip_corrupt, self.min_side, self.seed = transform, skip_corrupt, min_side, seed

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, key):
        epoch, i = key_of(key)
        path, label = self.samples[i]
        try:
            item = load_item(path, self.transform, item_generator(self.seed, epoch, i), self.min_side)
        except UnusableImageError as e:
            if self.skip_corrupt:
                return None
            if isinstance(e, ImageTooSmallError):
                raise
            raise type(e)(f"{e} (set data.skip_corrupt: true to skip such files)") from e.__cause__
        return {**item, "label": label}


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


#################################################################################
#                                 Datamodules                                    #
#################################################################################

def check_batch_size(key: str, value) -> None:
    """A batch size must be a positive integer: one line naming the config key otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"data.{key} must be a positive integer, got {value!r}")


class ImageDataModule(L.LightningDataModule):
    """Shared loader logic: global -> per-device batch size, workers, pinned memory, exact resume, and the
    device side of the batches (uint8 -> [-1, 1], the SSL views' colour augmentations).

    Args:
        image_size: side of the square training images (ADM centre crop); the autoencoder's image_size is linked
            to it.
        global_batch_size: images per optimizer step across all devices and accumulation steps.
        num_workers: DataLoader worker processes per device (0: load in the main process).
        hflip: random horizontal flips of the training images.
        pin_memory: page-locked batches for faster host-to-GPU copies (CUDA only).
        persistent_workers: keep the workers alive between epochs.
        val_batch_size: validation images per device (default: the per-device training batch).
        seed: seed of the shuffling and of every random draw of an item (with the epoch and the item's index).
        views: iBOT's multi-crop views of each training image (null: none; needed when the model trains with ssl).
        fast_decode: the training transforms decode JPEGs at the reduced size their crops allow (PIL's draft mode)
            and resample with torch's uint8 kernels (within a level of PIL's pixels; tests/data/test_transforms.py);
            false gives the reference pixels of PIL's full decode and resampling. Evaluation always uses the
            reference.
    """

    skip_corrupt = False

    def __init__(self, image_size: int = 256, global_batch_size: int = 256, num_workers: int = 8,
                 hflip: bool = True, pin_memory: bool = True, persistent_workers: bool = True,
                 val_batch_size: int | None = None, seed: int = 0, views: MultiCropConfig | None = None,
                 fast_decode: bool = True):
        super().__init__()
        check_batch_size("global_batch_size", global_batch_size)
        if val_batch_size is not None:
            check_batch_size("val_batch_size", val_batch_size)
        self.seed, self.views = seed, views
        self.image_size, self.global_batch_size, self.num_workers = image_size, global_batch_size, num_workers
        self.hflip, self.pin_memory, self.persistent_workers = hflip, pin_memory, persistent_workers
        self.val_batch_size, self.fast_decode = val_batch_size, fast_decode
        self.train_set = self.val_set = None
        self.num_classes = 0
        self._train_loader, self._colors, self._empty_run = None, {}, {True: 0, False: 0}
        self.skipped_batches = 0

    @property
    def per_device_batch_size(self) -> int:
        check_batch_size("global_batch_size", self.global_batch_size)  # also for subclasses and the latent stream
        world = self.trainer.world_size if self.trainer is not None else 1
        accum = self.trainer.accumulate_grad_batches if self.trainer is not None else 1
        if self.global_batch_size % (world * accum):
            raise ValueError(f"global_batch_size={self.global_batch_size} is not divisible by "
                             f"{world} devices x {accum} accumulation steps")
        return self.global_batch_size // (world * accum)

    def _loader(self, dataset, batch_size, shuffle, drop_last):
        workers = self.num_workers
        kwargs = dict(batch_size=batch_size, drop_last=drop_last, num_workers=workers,
                      pin_memory=self.pin_memory and torch.cuda.is_available(),
                      persistent_workers=self.persistent_workers and workers > 0, collate_fn=collate_skipping)
        if not shuffle:
            return DataLoader(dataset, **kwargs)
        # An epoch-seeded sampler even on one device: Lightning calls set_epoch, so the order of every epoch
        # depends only on (seed, epoch) and a resumed run sees the batches the uninterrupted one saw.
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
        sampler = EpochSampler(dataset, batch_size, num_replicas=world, rank=rank, shuffle=True, seed=self.seed,
                               drop_last=drop_last)
        return ResumableImageLoader(dataset, sampler=sampler, **kwargs)

    def train_dataloader(self):
        bs = self.per_device_batch_size
        self._train_loader = self._loader(self.train_set, bs, shuffle=True, drop_last=len(self.train_set) >= bs)
        return self._train_loader

    def val_dataloader(self):
        return self._loader(self.val_set, self.val_batch_size or self.per_device_batch_size, False, False)

    def test_dataloader(self):
        return self.val_dataloader()

    # ------------------------------------------------------------------ batches
    def on_before_batch_transfer(self, batch, dataloader_idx):
        trainer = self.trainer
        training = trainer is not None and trainer.training
        if training and self._train_loader is not None:
            self._train_loader.consumed += 1  # counted where the loop takes a batch, after any prefetching
        # the views' colour parameters stay on the host: color_batch plans its work from them
        self._colors = {k: batch.pop(k) for k in ("global_color", "local_color") if k in batch}
        empty = "image" not in batch
        if training and self.skip_corrupt and trainer.world_size > 1:
            # DDP needs the same number of backward passes on every rank: all skip when one has nothing
            empty = trainer.strategy.reduce_boolean_decision(empty, all=False)
        if not empty:
            self._empty_run[training] = 0
            return batch
        return self._skip_empty(batch, training)

    def _skip_empty(self, batch, training: bool):
        """A batch whose every file was unusable is skipped (the step sees None) and counted; as many in a row
        as a whole pass has batches means nothing in the split is readable."""
        trainer = self.trainer
        self.skipped_batches += 1
        self._empty_run[training] += 1
        split = "training" if training else "validation"
        if training:
            per_pass = trainer.num_training_batches
        else:
            per_pass = (trainer.num_sanity_val_batches if trainer.sanity_checking else
                        trainer.num_test_batches if trainer.testing else trainer.num_val_batches)
            per_pass = sum(per_pass) if isinstance(per_pass, list) else per_pass
        if self._empty_run[training] >= per_pass:
            raise UnusableImageError(f"every file of a whole {split} epoch ({per_pass} batches) was unusable and "
                                     f"skipped: check the data under {getattr(self, 'root', '?')}")
        why = (f"its {batch['skipped']} files were all unusable" if "image" not in batch else
               "another rank's files were all unusable")
        rank_zero_warn(f"skipping a {split} batch: {why} ({self.skipped_batches} skipped batches so far)")
        return None

    def on_after_batch_transfer(self, batch, dataloader_idx):
        if batch is None:
            return None
        batch.update(self._colors)
        self._colors = {}
        return views_to_unit(batch)


class ImageFolderDataModule(ImageDataModule):
    """ImageNet-style data: root/train/<class>/* and root/val/<class>/*, one class index for both splits.

    Args:
        root: folder holding the train and val folders.
        train_dir: training split's folder under root.
        val_dir: validation split's folder under root.
        skip_corrupt: skip unusable files (counted as data/skipped) instead of stopping with their name.
        class_list: a file of class names, one per line, that fixes the class index (default: train/'s class
            folders that hold images, sorted).
        min_image_side: images whose short side is smaller are unusable (an error, or skipped with
            skip_corrupt); null = half the image size, so the centre crop upsamples by at most 2x.
        transparency: images with an alpha channel or a transparent colour: 'white' composites them onto white
            (with a warning that counts them), 'refuse' stops setup naming them.

    Names starting with a dot are ignored, symlinked folders are followed once, a symlink loop is refused
    (tcae_ldm.data.folders); EXIF orientation is applied. The log's summary line says what was left out.
    """

    def __init__(self, root: str, train_dir: str = "train", val_dir: str = "val", skip_corrupt: bool = False,
                 class_list: str | None = None, min_image_side: int | None = None,
                 transparency: Literal["white", "refuse"] = "white", **kwargs):
        super().__init__(**kwargs)
        if transparency not in ("white", "refuse"):
            raise ValueError(f"data.transparency must be 'white' or 'refuse', got {transparency!r}")
        self.transparency = transparency
        self.root, self.train_dir, self.val_dir, self.skip_corrupt = root, train_dir, val_dir, skip_corrupt
        self.class_list = class_list
        self.min_image_side = (self.image_size + 1) // 2 if min_image_side is None else min_image_side
        self.classes: list[str] = []

    def setup(self, stage: str | None = None):
        if self.train_set is not None:
            return
        classes = read_class_list(self.class_list) if self.class_list else None
        common = dict(skip_corrupt=self.skip_corrupt, min_side=self.min_image_side, seed=self.seed)
        train_root, val_root = (os.path.join(self.root, d) for d in (self.train_dir, self.val_dir))
        self.train_set = ImageFolderDataset(
            train_root, train_transform(self.image_size, self.hflip, self.views, self.fast_decode), classes=classes,
            **common)
        self.classes = self.train_set.classes
        self.val_set = ImageFolderDataset(val_root, ImageTransform(self.image_size, False), classes=self.classes,
                                          **common)
        self.num_classes = len(self.classes)
        if self.train_set.empty_classes:
            rank_zero_warn(f"{len(self.train_set.empty_classes)} class folders of {train_root} hold no image and "
                           f"are not classes: {self.train_set.empty_classes[:10]}")
        missing = sorted(set(self.classes) - {self.classes[y] for _, y in self.train_set.samples})
        if missing:
            rank_zero_warn(f"{len(missing)} classes of {self.class_list} have no training image: {missing[:10]}")
        for name, ds in (("train", self.train_set), ("val", self.val_set)):
            self._check_transparency(ds)
            rank_zero_info(f"{name}: {len({y for _, y in ds.samples})} of {self.num_classes} classes, "
                           f"{len(ds)} images ({ds.root}){ds.ignored.summary()}")

    def _check_transparency(self, ds: ImageFolderDataset) -> None:
        if not ds.transparent:
            return
        what = f"{len(ds.transparent)} images under {ds.root} have transparency (e.g. {ds.transparent[0]})"
        if self.transparency == "refuse":
            raise ValueError(f"{what}; data.transparency: refuse stops here (convert them to RGB, or set "
                             f"data.transparency: white to composite them onto white)")
        rank_zero_warn(f"{what}: they are composited onto white (data.transparency: white; 'refuse' stops instead)")
