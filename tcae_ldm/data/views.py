"""Multi-crop views for joint iBOT training: two global crops and some local crops per image.

The reconstruction view (the model's image size, centre-cropped as usual) stays under ``image``; the SSL
views are added as ``global`` (2, 3, G, G) and ``local`` (n, 3, L, L), so the batch keeps one layout.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image
from torchvision.transforms import v2

from tcae_ldm.data.transforms import ImageTransform, to_tensor


@dataclass
class MultiCropConfig:
    """iBOT's multi-crop recipe; sizes must be multiples of the patch size that the encoder can compress.

    Args:
        global_size: side of the 2 global crops (paper scale: 224 of a 256 image).
        local_size: side of the local crops.
        num_local: local crops per image (iBOT: 10 at ImageNet scale).
        global_scale: area fraction of the image a global crop covers.
        local_scale: area fraction of the image a local crop covers.
        color_jitter: brightness / contrast / saturation strength on the SSL views, 0 = off.
    """
    global_size: int = 224                          # side of the 2 global crops (paper-scale: 224 of a 256 image)
    local_size: int = 96                            # side of the local crops
    num_local: int = 10                             # iBOT uses 10 local crops at ImageNet scale
    global_scale: tuple[float, float] = (0.25, 1.0)  # area fraction of the image a global crop covers
    local_scale: tuple[float, float] = (0.05, 0.25)  # ... and a local crop
    color_jitter: float = 0.4                       # brightness / contrast / saturation strength, 0 = off


torch.serialization.add_safe_globals([MultiCropConfig])


class MultiCropTransform:
    """PIL image -> {'image': recon view, 'global': (2, 3, G, G), 'local': (n, 3, L, L)} in [-1, 1]."""

    def __init__(self, image_size: int, hflip: bool, cfg: MultiCropConfig):
        self.recon = ImageTransform(image_size, hflip)
        self.cfg = cfg
        jitter = [v2.RandomApply([v2.ColorJitter(cfg.color_jitter, cfg.color_jitter, cfg.color_jitter / 2, 0.1)],
                                 p=0.8)] if cfg.color_jitter > 0 else []
        self.global_crop = v2.Compose([v2.RandomResizedCrop(cfg.global_size, scale=cfg.global_scale,
                                                            interpolation=v2.InterpolationMode.BICUBIC),
                                       v2.RandomHorizontalFlip(), *jitter])
        self.local_crop = v2.Compose([v2.RandomResizedCrop(cfg.local_size, scale=cfg.local_scale,
                                                           interpolation=v2.InterpolationMode.BICUBIC),
                                      v2.RandomHorizontalFlip(), *jitter])

    def __call__(self, img: Image.Image) -> dict:
        out = self.recon(img)
        out["global"] = torch.stack([to_tensor(self.global_crop(img)) for _ in range(2)])
        out["local"] = torch.stack([to_tensor(self.local_crop(img)) for _ in range(self.cfg.num_local)]) \
            if self.cfg.num_local else torch.empty(0, 3, self.cfg.local_size, self.cfg.local_size)
        return out


def train_transform(image_size: int, hflip: bool, views: MultiCropConfig | None):
    """The training transform: plain, or with iBOT views when the run trains jointly."""
    return MultiCropTransform(image_size, hflip, views) if views is not None else ImageTransform(image_size, hflip)
