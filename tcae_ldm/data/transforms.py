"""Image transforms: ADM-style centre crop, the [-1, 1] tensor convention, and the reconstruction view.

A transform is split in two so that every random draw is a function of the sample alone and a JPEG can be
decoded at the size the transform needs:
  params = t.draw((width, height), rng)        # random choices from the sample's own torch.Generator
  factor = t.decode_reduction((w, h), params)  # power of two the decoder may shrink the image by (draft mode)
  out = t.apply(image, params)                 # the image as decoded (full size, or reduced by that factor)
`t(image, rng)` does the three on an image already in memory.
"""
from __future__ import annotations

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
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


def adm_halvings(size: tuple[int, int], image_size: int) -> int:
    """How many times ADM's centre crop box-downsamples an image of this size by 2 before its bicubic resize."""
    k, side = 0, min(size)
    while side >= 2 * image_size:
        side, k = side // 2, k + 1
    return k


def uint8_tensor(img: Image.Image | np.ndarray) -> torch.Tensor:
    """uint8 HWC image -> uint8 (3, H, W) tensor (what the loaders carry to the device).

    The result is a view of the HWC array (channels-last memory), which torch's uint8 resampling kernels read
    fastest; stacking and collation make contiguous copies anyway."""
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 (..., 3, H, W) -> float in [-1, 1]; the same arithmetic on any device."""
    return x.float().div(127.5).sub(1.0)


def to_tensor(img: Image.Image | np.ndarray) -> torch.Tensor:
    """uint8 HWC image -> float (3, H, W) in [-1, 1]."""
    return to_unit(uint8_tensor(img))


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float (..., 3, H, W) in [-1, 1] -> uint8, the inverse of to_tensor up to rounding."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def resize_uint8(x: torch.Tensor, size: tuple[int, int], box: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """Bicubic, antialiased resize of uint8 (3, H, W) (of the (top, left, h, w) box, when given) to size (h, w):
    torch's uint8 kernel, which follows PIL's filter (within one level of PIL's resize) at a fraction of its cost."""
    mode = TF.InterpolationMode.BICUBIC
    if box is None:
        return TF.resize(x, list(size), interpolation=mode, antialias=True)
    return TF.resized_crop(x, *box, list(size), interpolation=mode, antialias=True)


def adm_center_crop(img: Image.Image, image_size: int, fast: bool, tensor: torch.Tensor | None = None) -> torch.Tensor:
    """ADM's centre crop as uint8 (3, S, S). fast: the bicubic resize by torch's uint8 kernel (`tensor`, if given, is
    img already converted); otherwise center_crop_arr's PIL steps, the reference pixels."""
    if not fast:
        return uint8_tensor(center_crop_arr(img, image_size))
    while min(*img.size) >= 2 * image_size:  # the halvings a draft-mode decode has not already done
        img, tensor = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX), None
    x = uint8_tensor(img) if tensor is None else tensor
    scale = image_size / min(*img.size)
    w, h = (round(v * scale) for v in img.size)
    if (w, h) != img.size:
        x = resize_uint8(x, (h, w))
    top, left = (h - image_size) // 2, (w - image_size) // 2
    return x[:, top: top + image_size, left: left + image_size]


def flip_draw(rng: torch.Generator | None) -> bool:
    """A fair coin from the sample's generator (torchvision's RandomHorizontalFlip(0.5) test)."""
    return bool(torch.rand(1, generator=rng) < 0.5)


class ImageTransform:
    """Centre crop (ADM) + optional horizontal flip -> {'image': (3, S, S)}, uint8 or float in [-1, 1].

    uint8 output is for loaders whose batches reach the device as uint8 (ImageDataModule converts them there);
    the float output is for code that iterates a loader itself (evaluation, reports). fast: JPEGs decoded at the
    reduced size ADM's halvings allow (draft mode) and the bicubic resize by torch's uint8 kernel; otherwise the
    reference pixels of ADM's PIL steps.
    """

    def __init__(self, image_size: int, hflip: bool, uint8: bool = False, fast: bool = False):
        self.image_size, self.hflip, self.uint8, self.fast = image_size, hflip, uint8, fast

    def draw(self, size: tuple[int, int], rng: torch.Generator | None) -> dict:
        return {"flip": self.hflip and flip_draw(rng)}

    def decode_reduction(self, size: tuple[int, int], params: dict) -> int:
        # ADM halves the image while its short side is >= 2S; a JPEG decoder can do (up to 3 of) those halvings
        # itself, in the DCT domain, for a fraction of the decoding cost.
        return 2 ** min(adm_halvings(size, self.image_size), 3) if self.fast else 1

    def apply(self, img: Image.Image, params: dict, tensor: torch.Tensor | None = None) -> dict:
        if img.size == (self.image_size, self.image_size):
            x = uint8_tensor(img) if tensor is None else tensor
        else:
            x = adm_center_crop(img, self.image_size, self.fast, tensor)
        if params["flip"]:
            x = x.flip(-1)
        return {"image": x if self.uint8 else to_unit(x)}

    def __call__(self, img: Image.Image, rng: torch.Generator | None = None) -> dict:
        return self.apply(img, self.draw(img.size, rng))
