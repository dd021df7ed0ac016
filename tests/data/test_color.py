"""The SSL views' colour augmentations: the batched tensor path reproduces the reference's PIL operations."""
import numpy as np
import pytest
import torch
from PIL import Image

from tcae_ldm.data.color import (
    BLUR,
    BRIGHTNESS,
    GRAY,
    HUE,
    JITTER,
    ORDER,
    SOLARIZE,
    color_batch,
    color_pil,
    identity_params,
)
from tcae_ldm.data.demo import load_demo_photos


@pytest.fixture(scope="module")
def crops():
    """Crops of the bundled photos at the views' sizes, some with flat or saturated areas."""
    rng = np.random.default_rng(0)
    out = []
    for k, photo in enumerate(load_demo_photos().values()):
        side = (16, 33, 48)[k % 3]
        top, left = rng.integers(0, photo.shape[0] - side), rng.integers(0, photo.shape[1] - side)
        out.append(photo[top: top + side, left: left + side].copy())
    return out


def _params(g, jitter=True, gray=False, blur=False, solarize=False):
    p = identity_params()
    if jitter:
        p[JITTER] = 1.0
        p[ORDER: ORDER + 4] = torch.randperm(4, generator=g).float()
        for k, (lo, hi) in enumerate(((0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1))):
            p[BRIGHTNESS + k] = torch.empty(1).uniform_(lo, hi, generator=g).item()
    p[GRAY], p[SOLARIZE] = float(gray), float(solarize)
    if blur:
        p[BLUR] = torch.empty(1).uniform_(0.1, 2.0, generator=g).item()
    return p


@pytest.mark.parametrize("what", ["jitter", "gray", "blur", "solarize", "all"])
def test_batched_colour_ops_equal_the_pil_reference(crops, what):
    g = torch.Generator().manual_seed(0)
    flags = {"jitter": what in ("jitter", "all"), "gray": what in ("gray", "all"), "blur": what in ("blur", "all"),
             "solarize": what in ("solarize", "all")}
    for side in (16, 33, 48):
        same = [c for c in crops if c.shape[0] == side]
        params = torch.stack([_params(g, **flags) for _ in same])
        if what == "all":
            params[::2, GRAY] = 0.0  # mixed batch: each view takes its own branch
        got = color_batch(torch.from_numpy(np.stack(same)).permute(0, 3, 1, 2).contiguous(), params)
        for crop, p, out in zip(same, params, got):
            expected = np.asarray(color_pil(Image.fromarray(crop), p))
            assert np.array_equal(out.permute(1, 2, 0).numpy(), expected), (what, side, p.tolist())


def test_hue_shifts_wrap_like_torchvision_and_identity_changes_nothing(crops):
    crop = crops[2]  # 48 x 48
    x = torch.from_numpy(crop).permute(2, 0, 1)[None].contiguous()
    assert torch.equal(color_batch(x, identity_params()[None]), x)
    for hue in (-0.1, -0.003, 0.05, 0.1):  # negative shifts wrap around the uint8 hue circle
        p = identity_params()
        p[JITTER], p[HUE] = 1.0, hue
        got = color_batch(x, p[None])[0].permute(1, 2, 0).numpy()
        assert np.array_equal(got, np.asarray(color_pil(Image.fromarray(crop), p))), hue
