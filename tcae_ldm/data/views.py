"""Multi-crop views for joint iBOT training: two global crops and some local crops per image, augmented as
bytedance/ibot main_ibot.py DataAugmentationiBOT does (RandomResizedCrop, flip, ColorJitter with p 0.8,
RandomGrayscale 0.2, GaussianBlur with p 1.0 / 0.1 / 0.5 on the first global / second global / local views,
Solarization 0.2 on the second global view). The reconstruction view stays a clean ADM centre crop.

Every random choice is drawn from the sample's own generator, in the order of the reference's transforms with
torchvision's arithmetic, so a view depends only on (seed, epoch, sample index) and the choices can be replayed
on either colour path (tcae_ldm.data.color): in the worker with PIL, or batched on the device.

The batch keeps one layout: ``image`` (3, S, S), ``global`` (2, 3, G, G), ``local`` (n, 3, L, L), all uint8
until the device; with ``color_on_device`` the views travel unaugmented in colour, with their parameters in
``global_color`` / ``local_color`` (tcae_ldm.data.images.ImageDataModule applies them after the transfer).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from PIL import Image

from tcae_ldm.data.color import (
    BLUR,
    BRIGHTNESS,
    GRAY,
    JITTER,
    ORDER,
    SOLARIZE,
    color_batch,
    color_pil,
    identity_params,
)
from tcae_ldm.data.transforms import (
    ImageTransform,
    adm_halvings,
    flip_draw,
    resize_uint8,
    to_unit,
    uint8_tensor,
)


@dataclass
class MultiCropConfig:
    """iBOT's multi-crop recipe (its DataAugmentationiBOT); sizes must be multiples of the patch size that the encoder
    can compress. Every field is a config key under `data.views`.

    Args:
        global_size: side of the 2 global crops (paper scale: 224 of a 256 image).
        local_size: side of the local crops (paper scale: 96).
        num_local: local crops per image (iBOT: 10 at ImageNet scale).
        global_scale: area fraction of the image a global crop covers.
        local_scale: area fraction of the image a local crop covers.
        color_jitter: ColorJitter strength x: brightness = contrast = x, saturation x / 2, hue 0.1; 0 = off.
        jitter_p: probability that a view is colour-jittered (iBOT: 0.8).
        grayscale_p: probability that a view is made grey (iBOT: 0.2).
        blur_p: Gaussian-blur probability of the first global, second global and local views (iBOT: 1.0, 0.1, 0.5).
        blur_radius: PIL GaussianBlur radius range (iBOT: 0.1 - 2.0).
        solarize_p: solarization probability of the first global, second global and local views (iBOT: 0, 0.2, 0).
        color_on_device: colour operations on the batch after its transfer to the device (exactly PIL's pixels),
            not in the loader workers.
    """
    global_size: int = 224
    local_size: int = 96
    num_local: int = 10
    global_scale: tuple[float, float] = (0.25, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.25)
    color_jitter: float = 0.4
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: tuple[float, float, float] = (1.0, 0.1, 0.5)
    blur_radius: tuple[float, float] = (0.1, 2.0)
    solarize_p: tuple[float, float, float] = (0.0, 0.2, 0.0)
    color_on_device: bool = True


torch.serialization.add_safe_globals([MultiCropConfig])

RATIO = (3.0 / 4.0, 4.0 / 3.0)  # RandomResizedCrop's default aspect-ratio range, as iBOT uses it


#################################################################################
#                 Random draws: torchvision's arithmetic, our generator          #
#################################################################################

def _uniform(lo: float, hi: float, rng: torch.Generator | None) -> float:
    return torch.empty(1).uniform_(lo, hi, generator=rng).item()


def resized_crop_box(width: int, height: int, scale: tuple[float, float], rng: torch.Generator | None,
                     ratio: tuple[float, float] = RATIO) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a RandomResizedCrop, drawn exactly as torchvision's make_params draws it."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * _uniform(scale[0], scale[1], rng)
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=rng)).item()
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=rng))
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=rng))
            return top, left, h, w
    in_ratio = width / height  # torchvision's fallback: the largest centred crop within the ratio range
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def draw_color(cfg: MultiCropConfig, blur_p: float, solarize_p: float, rng: torch.Generator | None) -> torch.Tensor:
    """A view's colour parameters, in the reference's order: RandomApply(ColorJitter), RandomGrayscale,
    GaussianBlur, Solarization (these two draw from Python's `random` in iBOT; here from the same generator)."""
    p = identity_params()
    if cfg.color_jitter > 0 and torch.rand(1, generator=rng) < cfg.jitter_p:
        p[JITTER] = 1.0
        p[ORDER: ORDER + 4] = torch.randperm(4, generator=rng).float()
        cj = cfg.color_jitter
        # torchvision's ranges: factors in [max(0, 1 - x), 1 + x], the hue shift in [-0.1, 0.1]
        for k, (lo, hi) in enumerate(((max(0.0, 1 - cj), 1 + cj), (max(0.0, 1 - cj), 1 + cj),
                                      (max(0.0, 1 - cj / 2), 1 + cj / 2), (-0.1, 0.1))):
            p[BRIGHTNESS + k] = _uniform(lo, hi, rng)
    p[GRAY] = float(torch.rand(1, generator=rng) < cfg.grayscale_p)
    # iBOT blurs when random() <= p; `<` makes p = 0 mean never (the two differ only on an exact tie)
    if torch.rand(1, generator=rng) < blur_p:
        p[BLUR] = _uniform(*cfg.blur_radius, rng)
    p[SOLARIZE] = float(torch.rand(1, generator=rng) < solarize_p)
    return p


#################################################################################
#                                 The transform                                  #
#################################################################################

class MultiCropTransform:
    """Image -> {'image': recon view, 'global': (2, 3, G, G), 'local': (n, 3, L, L)} as uint8, plus the views'
    colour parameters when they are applied on the device (see the module docstring)."""

    def __init__(self, image_size: int, hflip: bool, cfg: MultiCropConfig, fast: bool = False):
        self.recon = ImageTransform(image_size, hflip, uint8=True, fast=fast)
        self.cfg, self.fast = cfg, fast
        # (output side, crop scale, blur p, solarize p) of every view, in the reference's order
        self.specs = [(cfg.global_size, cfg.global_scale, cfg.blur_p[g], cfg.solarize_p[g]) for g in range(2)] + \
                     [(cfg.local_size, cfg.local_scale, cfg.blur_p[2], cfg.solarize_p[2])] * cfg.num_local

    @property
    def hflip(self) -> bool:
        return self.recon.hflip

    @hflip.setter
    def hflip(self, value: bool) -> None:
        self.recon.hflip = value

    def draw(self, size: tuple[int, int], rng: torch.Generator | None) -> dict:
        width, height = size
        recon = self.recon.draw(size, rng)
        views = []
        for out, scale, blur_p, solarize_p in self.specs:
            box = resized_crop_box(width, height, scale, rng)
            views.append({"box": box, "flip": flip_draw(rng), "color": draw_color(self.cfg, blur_p, solarize_p, rng)})
        return {"size": tuple(size), "image": recon, "views": views}

    def decode_reduction(self, size: tuple[int, int], params: dict) -> int:
        """The largest power of two (<= 8) that leaves every crop at least as large as its output (so no view is
        upsampled from a reduced decode) and does no more than ADM's own halvings for the reconstruction view."""
        if not self.fast:
            return 1
        k = min(3, adm_halvings(size, self.recon.image_size))
        for (out, *_), v in zip(self.specs, params["views"]):
            _, _, h, w = v["box"]
            k = min(k, int(math.floor(math.log2(max(min(h, w) / out, 1.0)))))
        return 2 ** max(k, 0)

    def _view(self, img: Image.Image, full: torch.Tensor | None, out: int, v: dict,
              scale: tuple[float, float]) -> torch.Tensor:
        top, left, h, w = v["box"]
        if scale != (1.0, 1.0):  # a reduced decode: the same box in its coordinates (fractional: PIL's resize)
            sx, sy = scale
            x = uint8_tensor(img.resize((out, out), Image.BICUBIC, box=(left * sx, top * sy, (left + w) * sx,
                                                                        (top + h) * sy)))
        elif full is not None:  # fast: torch's uint8 resize of the box
            x = resize_uint8(full, (out, out), (top, left, h, w))
        else:  # the reference: torchvision's PIL resized_crop (crop, then resize the crop)
            x = uint8_tensor(img.crop((left, top, left + w, top + h)).resize((out, out), Image.BICUBIC))
        if v["flip"]:
            x = x.flip(-1)
        if not self.cfg.color_on_device:
            x = uint8_tensor(color_pil(Image.fromarray(x.permute(1, 2, 0).numpy()), v["color"]))
        return x

    def apply(self, img: Image.Image, params: dict) -> dict:
        width, height = params["size"]
        scale = (img.width / width, img.height / height)
        full = uint8_tensor(img) if self.fast else None  # one conversion for the recon view and every crop
        out = self.recon.apply(img, params["image"], tensor=full)
        views = [self._view(img, full, size, v, scale) for (size, *_), v in zip(self.specs, params["views"])]
        out["global"] = torch.stack(views[:2])
        n, side = self.cfg.num_local, self.cfg.local_size
        out["local"] = torch.stack(views[2:]) if n else torch.empty(0, 3, side, side, dtype=torch.uint8)
        if self.cfg.color_on_device:
            colors = torch.stack([v["color"] for v in params["views"]])
            out["global_color"], out["local_color"] = colors[:2], colors[2:]
        return out

    def __call__(self, img: Image.Image, rng: torch.Generator | None = None) -> dict:
        return self.apply(img, self.draw(img.size, rng))


def train_transform(image_size: int, hflip: bool, views: MultiCropConfig | None, fast: bool = False):
    """The training transform (uint8 out): plain, or with iBOT views when the run trains jointly."""
    if views is None:
        return ImageTransform(image_size, hflip, uint8=True, fast=fast)
    return MultiCropTransform(image_size, hflip, views, fast=fast)


def views_to_unit(batch: dict) -> dict:
    """On the device: apply the views' colour parameters (if they travelled with the batch) and convert every
    uint8 image of the batch to float in [-1, 1]. Idempotent on float batches."""
    for key in ("global", "local"):
        params = batch.pop(f"{key}_color", None)
        if params is not None and batch[key].numel():
            x = batch[key]
            b, v = x.shape[:2]
            batch[key] = color_batch(x.flatten(0, 1), params.reshape(b * v, -1)).view_as(x)
    for key in ("image", "global", "local"):
        if key in batch and batch[key].dtype == torch.uint8:
            batch[key] = to_unit(batch[key])
    return batch

