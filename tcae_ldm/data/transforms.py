"""Image transforms: ADM-style centre crop and the [-1, 1] tensor convention."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def center_crop_arr(pil_image: Image.Image, image_size: int) -> Image.Image:
    """ADM's centre crop: box-downsample by 2 while possible, bicubic resize the short side, crop the centre."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.asarray(pil_image)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[top: top + image_size, left: left + image_size])


def to_tensor(img: Image.Image | np.ndarray) -> torch.Tensor:
    """uint8 HWC image -> float (3, H, W) in [-1, 1]."""
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float (..., 3, H, W) in [-1, 1] -> uint8, the inverse of to_tensor up to rounding."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


class ImageTransform:
    """Centre crop (ADM) + optional horizontal flip -> {'image': (3, S, S) in [-1, 1]}."""

    def __init__(self, image_size: int, hflip: bool):
        self.image_size, self.hflip = image_size, hflip

    def __call__(self, img: Image.Image) -> dict:
        if img.size != (self.image_size, self.image_size):
            img = center_crop_arr(img, self.image_size)
        x = to_tensor(img)
        if self.hflip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return {"image": x}
