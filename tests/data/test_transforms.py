"""ADM's centre crop, the [-1, 1] tensor convention, and what draft-mode JPEG decoding changes."""
import numpy as np
import torch
from PIL import Image

from tcae_ldm.data.transforms import center_crop_arr, to_tensor, to_uint8


def test_center_crop_and_tensor_convention():
    img = Image.fromarray(np.zeros((90, 200, 3), dtype=np.uint8))
    assert center_crop_arr(img, 32).size == (32, 32)
    x = to_tensor(np.full((4, 4, 3), 255, dtype=np.uint8))
    assert x.shape == (3, 4, 4) and x.max() == 1.0
    assert torch.equal(to_uint8(to_tensor(np.arange(48, dtype=np.uint8).reshape(4, 4, 3))).permute(1, 2, 0),
                       torch.arange(48, dtype=torch.uint8).reshape(4, 4, 3))



def _jpeg(tmp_path, name, size):
    from tcae_ldm.data.demo import load_demo_photos

    src = Image.fromarray(load_demo_photos()[name]).resize(size, Image.BICUBIC)
    path = str(tmp_path / f"{name}.jpg")
    src.save(path, quality=90)
    return src, path


def test_fast_resampling_stays_within_a_level_of_pils(tmp_path):
    """Without a reduced decode (500x375 JPEG, 256 crop), the fast path differs from PIL's pixels only by torch's
    uint8 bicubic kernel: a few hundredths of a level on average, more than one level on under 0.1% of the pixels
    (measured over the 8 photos at 3 sizes: mean 0.03, worst view 0.11, max 8 levels on 4e-5 of the pixels)."""
    from tcae_ldm.data.images import load_item
    from tcae_ldm.data.sampling import item_generator
    from tcae_ldm.data.transforms import ImageTransform
    from tcae_ldm.data.views import MultiCropConfig, MultiCropTransform

    _, path = _jpeg(tmp_path, "astronaut", (500, 375))
    ref, fast = ImageTransform(256, True, uint8=True), ImageTransform(256, True, uint8=True, fast=True)
    assert fast.decode_reduction((500, 375), {}) == 1
    a, b = load_item(path, ref, item_generator(0, 0, 0)), load_item(path, fast, item_generator(0, 0, 0))
    d = (a["image"].int() - b["image"].int()).abs()
    assert d.max() <= 2 and d.float().mean() < 0.05
    cfg = MultiCropConfig(num_local=4)  # colours applied later, identically on both paths (tests/data/test_color.py)
    ref, fast = MultiCropTransform(256, True, cfg), MultiCropTransform(256, True, cfg, fast=True)
    for i in range(3):
        a, b = load_item(path, ref, item_generator(0, 0, i)), load_item(path, fast, item_generator(0, 0, i))
        for key in ("image", "global", "local"):
            d = (a[key].int() - b[key].int()).abs()
            assert d.float().mean() < 0.15 and (d > 1).float().mean() < 1e-3 and d.max() <= 16, (i, key, d.max())


def test_draft_decode_changes_pixels_less_than_the_jpeg_compression_did(tmp_path):
    """A JPEG twice the crop size: ADM box-halves it after a full decode; the fast path decodes it at half size
    (draft mode: a scaled IDCT). The two differ by well under a level on average, less than q90 compression."""
    from tcae_ldm.data.images import load_item, read_image
    from tcae_ldm.data.transforms import ImageTransform

    ref, fast = ImageTransform(128, False, uint8=True), ImageTransform(128, False, uint8=True, fast=True)
    for name in ("astronaut", "coffee"):
        src, path = _jpeg(tmp_path, name, (512, 384))
        assert fast.decode_reduction((512, 384), {}) == 2 and ref.decode_reduction((512, 384), {}) == 1
        full = load_item(path, ref, None)["image"].double()
        assert torch.equal(full, ref(read_image(path))["image"].double())  # the reference is ADM's own steps
        draft = load_item(path, fast, None)["image"].double()
        diff = (draft - full).abs().mean().item()
        compression = (full - ref(src)["image"].double()).abs().mean().item()
        psnr = 10 * np.log10(255 ** 2 / ((draft - full) ** 2).mean().item())
        assert 0 < diff < 1.5 and psnr > 40 and diff < compression, (name, diff, psnr, compression)


def test_multi_crop_views_of_a_draft_decode_stay_close(tmp_path):
    from tcae_ldm.data.images import load_item
    from tcae_ldm.data.sampling import item_generator
    from tcae_ldm.data.views import MultiCropConfig, MultiCropTransform

    cfg = MultiCropConfig(global_size=32, local_size=16, num_local=2)
    ref, fast = MultiCropTransform(64, True, cfg), MultiCropTransform(64, True, cfg, fast=True)
    _, path = _jpeg(tmp_path, "chelsea", (600, 400))
    reduced = 0
    for i in range(6):
        reduced += fast.decode_reduction((600, 400), fast.draw((600, 400), item_generator(0, 0, i))) > 1
        a, b = load_item(path, fast, item_generator(0, 0, i)), load_item(path, ref, item_generator(0, 0, i))
        for key in ("image", "global", "local"):
            d = (a[key].double() - b[key].double()).abs().mean().item()
            assert d < 1.5, (i, key, d)
        assert torch.equal(a["global_color"], b["global_color"])  # the same draws on both paths
    assert reduced >= 3
