"""The embedded demo dataset: crops of the RGB photographs that scikit-image and scikit-learn ship.

Class = source photograph (8 classes). Each photo is split along its width: training crops come from
the left part, validation crops from the right part, so validation pixels are never seen in training.
Crops are drawn once from a seeded generator and kept in memory as uint8, so every run sees the same data.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from tcae_ldm.data.images import ImageDataModule
from tcae_ldm.data.sampling import item_generator, key_of
from tcae_ldm.data.transforms import ImageTransform
from tcae_ldm.data.views import train_transform

DEMO_CLASSES = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "stereo_motorcycle", "china",
                "flower")


def load_demo_photos() -> dict[str, np.ndarray]:
    """The eight photographs as uint8 (H, W, 3) arrays, read from the installed packages (no download)."""
    try:
        import skimage.data
        from sklearn.datasets import load_sample_images
    except ImportError as e:
        raise ImportError(f"the demo photos come with scikit-image and scikit-learn ({e}): "
                          f"pip install -e '.[demo]' (make demo does)") from None

    photos = {name: getattr(skimage.data, name)() for name in DEMO_CLASSES[:5]}
    photos["stereo_motorcycle"] = skimage.data.stereo_motorcycle()[0]  # (left, right, disparity)
    sk = load_sample_images()
    for path, img in zip(sk.filenames, sk.images):
        photos["china" if "china" in path else "flower"] = img
    return {name: np.ascontiguousarray(photos[name][..., :3]) for name in DEMO_CLASSES}


def draw_crops(photo: np.ndarray, region: tuple[int, int], count: int, image_size: int,
               scale: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    """`count` random square crops inside columns [region[0], region[1]), resized to image_size."""
    h = photo.shape[0]
    x0, x1 = region
    base = min(photo.shape[:2])
    out = np.empty((count, image_size, image_size, 3), dtype=np.uint8)
    for i in range(count):
        side = int(base * rng.uniform(*scale))
        side = max(8, min(side, h, x1 - x0))
        top = int(rng.integers(0, h - side + 1))
        left = int(rng.integers(x0, x1 - side + 1))
        crop = Image.fromarray(photo[top: top + side, left: left + side])
        out[i] = np.asarray(crop.resize((image_size, image_size), Image.BICUBIC))
    return out


class DemoPhotosDataset(Dataset):
    """In-memory uint8 crops with labels, passed through a transform like any image dataset (random choices
    drawn from (seed, epoch, index), as ImageFolderDataset's)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform, seed: int = 0):
        self.images, self.labels, self.transform, self.seed = images, labels, transform, seed
        self.classes = list(DEMO_CLASSES)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, key):
        epoch, i = key_of(key)
        item = self.transform(Image.fromarray(self.images[i]), item_generator(self.seed, epoch, i))
        return {**item, "label": int(self.labels[i])}


def build_demo_split(image_size: int, train_per_class: int, val_per_class: int, val_fraction: float,
                     scale: tuple[float, float], seed: int):
    """(train images, train labels, val images, val labels) with disjoint source regions."""
    # Separate streams: the validation crops do not change when the number of training crops does.
    rng_train, rng_val = np.random.default_rng([seed, 0]), np.random.default_rng([seed, 1])
    tr_x, tr_y, va_x, va_y = [], [], [], []
    for label, (name, photo) in enumerate(load_demo_photos().items()):
        w = photo.shape[1]
        cut = int(round(w * (1 - val_fraction)))
        tr_x.append(draw_crops(photo, (0, cut), train_per_class, image_size, scale, rng_train))
        va_x.append(draw_crops(photo, (cut, w), val_per_class, image_size, scale, rng_val))
        tr_y += [label] * train_per_class
        va_y += [label] * val_per_class
    return np.concatenate(tr_x), np.array(tr_y), np.concatenate(va_x), np.array(va_y)


class DemoPhotosDataModule(ImageDataModule):
    """The CPU demo's data: crops of 8 bundled photographs, 8 classes, disjoint train/val regions.

    Args:
        train_per_class: training crops per photograph.
        val_per_class: validation crops per photograph.
        val_fraction: right-hand fraction of each photograph's width that only validation crops come from.
        crop_scale: crop side as a fraction of the photograph's shorter side, drawn uniformly in this range.
        image_size: side the crops are resized to.
        global_batch_size: crops per optimizer step across all devices.
        num_workers: DataLoader worker processes (the crops are in memory: 0 is fastest).
    """

    def __init__(self, train_per_class: int = 128, val_per_class: int = 16, val_fraction: float = 0.3,
                 crop_scale: tuple[float, float] = (0.2, 0.5), image_size: int = 64, global_batch_size: int = 32,
                 num_workers: int = 0, **kwargs):
        super().__init__(image_size=image_size, global_batch_size=global_batch_size, num_workers=num_workers,
                         **kwargs)
        self.train_per_class, self.val_per_class = train_per_class, val_per_class
        self.val_fraction, self.crop_scale = val_fraction, tuple(crop_scale)
        self.num_classes = len(DEMO_CLASSES)

    def setup(self, stage: str | None = None):
        if self.train_set is not None:
            return
        tx, ty, vx, vy = build_demo_split(self.image_size, self.train_per_class, self.val_per_class,
                                          self.val_fraction, self.crop_scale, self.seed)
        self.train_set = DemoPhotosDataset(tx, ty, train_transform(self.image_size, self.hflip, self.views,
                                                                   self.fast_decode), self.seed)
        self.val_set = DemoPhotosDataset(vx, vy, ImageTransform(self.image_size, False), self.seed)


def demo_split_tensors(image_size: int = 64, **datamodule_kwargs) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{'train': (uint8 (N, 3, S, S), labels), 'val': ...}: the demo datamodule's crops, unflipped."""
    dm = DemoPhotosDataModule(image_size=image_size, **datamodule_kwargs)
    dm.setup()
    return {split: (torch.from_numpy(ds.images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(ds.labels).long())
            for split, ds in (("train", dm.train_set), ("val", dm.val_set))}
