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


def test_draft_decode_changes_pixels_less_than_the_jpeg_compression_did(tmp_path):
    """A JPEG twice the crop size: ADM box-halves it after a full decode; draft mode decodes it at half size
    (a scaled IDCT). The two differ by well under a level on average, less than q90 compression itself."""
    from tcae_ldm.data.images import load_item, read_image
    from tcae_ldm.data.transforms import ImageTransform

    t = ImageTransform(128, False, uint8=True)
    for name in ("astronaut", "coffee"):
        src, path = _jpeg(tmp_path, name, (512, 384))
        assert t.decode_reduction((512, 384), {}) == 2
        full = t(read_image(path))["image"].double()
        draft = load_item(path, t, None, draft=True)["image"].double()
        assert draft.shape == full.shape == (3, 128, 128)
        diff = (draft - full).abs().mean().item()
        compression = (full - ImageTransform(128, False, uint8=True)(src)["image"].double()).abs().mean().item()
        psnr = 10 * np.log10(255 ** 2 / ((draft - full) ** 2).mean().item())
        assert 0 < diff < 1.5 and psnr > 40 and diff < compression, (name, diff, psnr, compression)
        assert torch.equal(load_item(path, t, None, draft=False)["image"].double(), full)


def test_multi_crop_views_of_a_draft_decode_stay_close(tmp_path):
    from tcae_ldm.data.images import load_item, read_image
    from tcae_ldm.data.sampling import item_generator
    from tcae_ldm.data.views import MultiCropConfig, MultiCropTransform

    t = MultiCropTransform(64, True, MultiCropConfig(global_size=32, local_size=16, num_local=2))
    _, path = _jpeg(tmp_path, "chelsea", (600, 400))
    reduced = 0
    for i in range(6):
        reduced += t.decode_reduction((600, 400), t.draw((600, 400), item_generator(0, 0, i))) > 1
        fast, slow = load_item(path, t, item_generator(0, 0, i)), t(read_image(path), item_generator(0, 0, i))
        for key in ("image", "global", "local"):
            d = (fast[key].double() - slow[key].double()).abs().mean().item()
            assert d < 1.5, (i, key, d)
        assert torch.equal(fast["global_color"], slow["global_color"])  # the same draws on both paths
    assert reduced >= 3
