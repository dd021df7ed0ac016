"""iBOT's colour augmentations of the SSL views (bytedance/ibot main_ibot.py DataAugmentationiBOT: ColorJitter
applied with p 0.8 in a random order, RandomGrayscale, GaussianBlur, Solarization), given by one parameter
vector per view and computed two ways:

- `color_pil`: the reference's own operations on a PIL image (torchvision's PIL kernels, ImageFilter, ImageOps);
- `color_batch`: the same arithmetic on a batch of uint8 views as tensors, on any device, one call per batch.
  It reproduces Pillow's integer and float32 steps (blend truncation, the fixed-point luma, the box blur that
  Pillow's GaussianBlur is made of) and uses Pillow's own RGB <-> HSV tables for the hue shift, so the two paths
  give the same pixels (tests/data/test_color.py).

The parameters are drawn in the data workers (tcae_ldm.data.views); applying them on the device keeps the
colour work, most of the multi-crop cost, off the loader's CPUs.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter, ImageOps

# Layout of a view's colour parameters (float32): whether ColorJitter runs, its random order of the four
# adjustments (0 brightness, 1 contrast, 2 saturation, 3 hue) and their factors, grayscale, blur radius (0 = no
# blur), solarize.
JITTER, ORDER, BRIGHTNESS, CONTRAST, SATURATION, HUE, GRAY, BLUR, SOLARIZE = 0, 1, 5, 6, 7, 8, 9, 10, 11
NUM_COLOR_PARAMS = 12


def identity_params() -> torch.Tensor:
    """A view that keeps its colours."""
    p = torch.zeros(NUM_COLOR_PARAMS)
    p[ORDER: ORDER + 4] = torch.arange(4)
    p[BRIGHTNESS: HUE] = 1.0
    return p


#################################################################################
#                         The reference: PIL, one image                          #
#################################################################################

def color_pil(img: Image.Image, p: torch.Tensor) -> Image.Image:
    """A view's colour augmentations with the reference's PIL operations."""
    if p[JITTER]:
        adjust = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
        for op in p[ORDER: ORDER + 4].long().tolist():
            img = adjust[op](img, float(p[BRIGHTNESS + op]))
    if p[GRAY]:
        img = TF.rgb_to_grayscale(img, num_output_channels=3)
    if p[BLUR] > 0:
        img = img.filter(ImageFilter.GaussianBlur(radius=float(p[BLUR])))
    if p[SOLARIZE]:
        img = ImageOps.solarize(img)
    return img


#################################################################################
#                    The same arithmetic on batches of tensors                   #
#################################################################################

def _luma(x: torch.Tensor) -> torch.Tensor:
    """Pillow's RGB -> L: (19595 R + 38470 G + 7471 B + 2^15) >> 16, on integer-valued (N, 3, H, W)."""
    r, g, b = x.to(torch.int32).unbind(1)
    return ((r * 19595 + g * 38470 + b * 7471 + 32768) >> 16).unsqueeze(1).to(x.dtype)


def _blend(a: torch.Tensor, b: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Pillow's Image.blend(a, b, f) = a + f (b - a) in float32, clipped and truncated to an integer."""
    return (a + f * (b - a)).clamp(0, 255).floor()


def _brightness(x, f):
    return _blend(torch.zeros_like(x), x, f)


def _contrast(x, f):
    mean = (_luma(x).double().mean(dim=(1, 2, 3), keepdim=True) + 0.5).floor().to(x.dtype)
    return _blend(mean.expand_as(x), x, f)


def _saturation(x, f):
    return _blend(_luma(x).expand_as(x), x, f)


_HSV_TABLES: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _hsv_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Pillow's RGB -> HSV and HSV -> RGB conversions of every 24-bit colour, computed by Pillow itself:
    two (2^24, 3) uint8 tables (48 MiB each), made once per device."""
    if device not in _HSV_TABLES:
        every = np.arange(1 << 24, dtype=np.uint32)
        planes = np.stack([every >> 16, (every >> 8) & 255, every & 255], -1).astype(np.uint8).reshape(4096, 4096, 3)
        to_hsv = np.asarray(Image.fromarray(planes, "RGB").convert("HSV")).reshape(-1, 3)
        to_rgb = np.asarray(Image.fromarray(planes, "HSV").convert("RGB")).reshape(-1, 3)
        _HSV_TABLES[device] = (torch.from_numpy(to_hsv.copy()).to(device), torch.from_numpy(to_rgb.copy()).to(device))
    return _HSV_TABLES[device]


def _code(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) integer-valued channels -> (N, H, W) 24-bit index a * 2^16 + b * 2^8 + c."""
    a, b, c = x.to(torch.int64).unbind(1)
    return (a << 16) | (b << 8) | c


def _hue(x, shift):
    """torchvision's PIL adjust_hue: RGB -> HSV (Pillow, uint8), H += shift = int(factor * 255) mod 256, HSV -> RGB,
    through Pillow's own conversion tables."""
    to_hsv, to_rgb = _hsv_tables(x.device)
    hsv = to_hsv[_code(x)].permute(0, 3, 1, 2).to(torch.int64)  # (N, 3, H, W)
    hsv[:, 0] = (hsv[:, 0] + shift.to(torch.int64).view(-1, 1, 1)) % 256
    return to_rgb[_code(hsv)].permute(0, 3, 1, 2).to(x.dtype)


def _box_radius(radius: np.ndarray, passes: int = 3) -> np.ndarray:
    """Pillow's _gaussian_blur_radius in its float32 / double steps: the extended box radius of each pass."""
    sigma2 = (radius * radius / np.float32(passes)).astype(np.float32)
    big_l = np.sqrt(12.0 * sigma2.astype(np.float64) + 1.0).astype(np.float32)
    small_l = np.floor((big_l.astype(np.float64) - 1.0) / 2.0).astype(np.float32)
    a = (np.float32(2) * small_l + np.float32(1)) * (small_l * (small_l + np.float32(1)) - np.float32(3) * sigma2)
    a = a / (np.float32(6) * (sigma2 - (small_l + np.float32(1)) * (small_l + np.float32(1))))
    return (small_l + a).astype(np.float32)


def _box_blur(x: torch.Tensor, radius: np.ndarray, passes: int = 3) -> torch.Tensor:
    """Pillow's ImagingBoxBlur with a per-image fractional radius: `passes` horizontal then vertical passes of a
    fixed-point kernel [fw, ww x (2r + 1), fw] / 2^24 over edge-replicated lines, each rounded to an integer
    (computed in float64, where these integers are exact)."""
    r = radius.astype(np.int64)
    ww = ((np.float32(1 << 24) / (radius * np.float32(2) + np.float32(1))).astype(np.float32)).astype(np.int64)
    fw = ((1 << 24) - (r * 2 + 1) * ww) // 2
    rmax = int(r.max()) + 1
    taps = np.zeros((len(r), 2 * rmax + 1), dtype=np.float64)  # (N, K): each image's kernel, centred
    for n, (rn, wn, fn) in enumerate(zip(r, ww, fw)):
        taps[n, rmax - rn: rmax + rn + 1] = wn
        taps[n, rmax - rn - 1] = taps[n, rmax + rn + 1] = fn
    taps = torch.from_numpy(taps).to(x.device)
    y = x.double()
    for dim in (-1, -2):
        for _ in range(passes):
            padded = F.pad(y, (rmax, rmax, 0, 0) if dim == -1 else (0, 0, rmax, rmax), mode="replicate")
            acc = torch.zeros_like(y)
            for k in range(taps.shape[1]):
                acc.addcmul_(taps[:, k].view(-1, 1, 1, 1), padded.narrow(dim, k, y.shape[dim]))
            y = torch.floor((acc + (1 << 23)) / (1 << 24))
    return y.to(x.dtype)


def color_batch(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """uint8 views (N, 3, H, W) and their parameters (N, NUM_COLOR_PARAMS) -> augmented uint8 views, on x's device.

    `params` may live on the CPU (no device synchronisation); each adjustment runs once, on the views that use it.
    """
    p = params.detach().cpu()
    y = x.float()

    def on(sel: torch.Tensor, fn, factor_col: int | None = None):
        idx = sel.nonzero().flatten()
        if len(idx):
            dev = idx.to(y.device)
            if factor_col is None:
                args = ()
            elif fn is _hue:  # torchvision: np.int32(factor * 255) in float64, wrapped to uint8
                args = (torch.trunc(p[idx, factor_col].double() * 255).remainder(256).float().to(y.device),)
            else:
                args = (p[idx, factor_col].to(y.device).view(-1, 1, 1, 1),)
            y[dev] = fn(y[dev], *args)

    jitter = p[:, JITTER] > 0
    for slot in range(4):
        for op, fn in enumerate((_brightness, _contrast, _saturation, _hue)):
            on(jitter & (p[:, ORDER + slot] == op), fn, BRIGHTNESS + op)
    on(p[:, GRAY] > 0, lambda v: _luma(v).expand_as(v).clone())
    blur = (p[:, BLUR] > 0).nonzero().flatten()
    if len(blur):
        dev = blur.to(y.device)
        y[dev] = _box_blur(y[dev], _box_radius(p[blur, BLUR].numpy().astype(np.float32)))
    on(p[:, SOLARIZE] > 0, lambda v: torch.where(v >= 128, 255 - v, v))
    return y.to(torch.uint8)
