"""Multi-crop views: torchvision's draws with our generator, iBOT's per-view augmentations, the clean
reconstruction view, the two colour paths giving the same batch, and the reduced JPEG decode they allow."""
import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image, ImageFilter, ImageOps
from torchvision.transforms import v2

from tcae_ldm.data.color import BLUR, GRAY, JITTER, SOLARIZE
from tcae_ldm.data.demo import load_demo_photos
from tcae_ldm.data.transforms import ImageTransform, to_unit
from tcae_ldm.data.views import (
    MultiCropConfig,
    MultiCropTransform,
    draw_color,
    resized_crop_box,
    train_transform,
    views_to_unit,
)


@pytest.fixture(scope="module")
def photo():
    return Image.fromarray(load_demo_photos()["coffee"][::2, ::2].copy())  # 300x200, colourful


def _rng(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("size,scale", [
    ((300, 200), (0.05, 0.4)), ((64, 64), (0.05, 0.4)), ((3, 4), (0.05, 0.4)),  # tiny: 1-pixel sides
    ((2, 2), (0.01, 0.05)),  # draws of 0-pixel sides, which torchvision rejects
    ((1000, 40), (0.05, 0.4)), ((40, 1000), (0.05, 0.4)),  # no draw fits: centred crop at the widest / tallest ratio
    ((64, 60), (1.0, 1.0)),  # no draw can differ from the whole image: the fallback, in range
    ((60, 100), (0.7, 1.0)),  # few draws fit: some seeds fall back after exactly 10 attempts, some succeed late
])
def test_crop_boxes_are_torchvisions_draws(size, scale):
    reference = v2.RandomResizedCrop(32, scale=scale)
    image = torch.zeros(3, size[1], size[0])
    for seed in range(100):
        torch.manual_seed(seed)
        p = reference.make_params([image])
        assert resized_crop_box(size[0], size[1], scale, _rng(seed)) == (p["top"], p["left"], p["height"], p["width"])


class _GaussianBlur:
    """main_ibot.py's GaussianBlur (PIL filter, radius uniform in [0.1, 2.0], applied when the draw is <= p), drawing
    from torch's global generator instead of Python's `random`: the one stream the project replays."""

    def __init__(self, p):
        self.p = p

    def __call__(self, img):
        if not torch.rand(1) < self.p:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=torch.empty(1).uniform_(0.1, 2.0).item()))


class _Solarization:
    """main_ibot.py's Solarization (ImageOps.solarize with probability p), on torch's global generator."""

    def __init__(self, p):
        self.p = p

    def __call__(self, img):
        return ImageOps.solarize(img) if torch.rand(1) < self.p else img


def _ibot_pipeline(global_size, local_size, global_scale, local_scale):
    """DataAugmentationiBOT's three transforms (first global, second global, local) from torchvision's v1
    transforms on PIL, without the final ToTensor/Normalize (the project converts on the device). The project
    draws a solarization coin for every view (p = 0 where iBOT has no Solarization), so the replay does too: the
    same distribution, one stream."""
    flip_and_color_jitter = T.Compose([
        T.RandomHorizontalFlip(p=0.5),
        T.RandomApply([T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
        T.RandomGrayscale(p=0.2)])
    crop = lambda size, scale: T.RandomResizedCrop(size, scale=scale,  # noqa: E731
                                                    interpolation=T.InterpolationMode.BICUBIC)
    return (T.Compose([crop(global_size, global_scale), flip_and_color_jitter, _GaussianBlur(1.0), _Solarization(0.0)]),
            T.Compose([crop(global_size, global_scale), flip_and_color_jitter, _GaussianBlur(0.1), _Solarization(0.2)]),
            T.Compose([crop(local_size, local_scale), flip_and_color_jitter, _GaussianBlur(0.5), _Solarization(0.0)]))


@pytest.mark.parametrize("color_on_device", [False, True])
def test_the_composed_transform_is_ibots_torchvision_pipeline_pixel_for_pixel(photo, color_on_device):
    """MultiCropTransform as a whole (its draws in its own order) against DataAugmentationiBOT composed from
    torchvision with the same seed: the reconstruction view's flip first, then every view's crop, flip, jitter,
    grey, blur and solarization. Every view of every seed equal, on both colour paths."""
    cfg = _views(color_on_device=color_on_device)
    first, second, local = _ibot_pipeline(48, 24, cfg.global_scale, cfg.local_scale)
    t = MultiCropTransform(64, True, cfg)
    seen = torch.zeros(4)
    for seed in range(24):
        torch.manual_seed(seed)
        torch.rand(1)                                    # the reconstruction view's flip, drawn first
        expected = [first(photo), second(photo)] + [local(photo) for _ in range(cfg.num_local)]
        expected = [torch.from_numpy(np.asarray(x).copy()).permute(2, 0, 1) for x in expected]
        out = t(photo, _rng(seed))
        if color_on_device:
            colors = torch.cat([out["global_color"], out["local_color"]])
            seen += torch.stack([colors[:, k].gt(0).float().mean() for k in (JITTER, GRAY, BLUR, SOLARIZE)])
        batch = views_to_unit({k: v[None] for k, v in out.items()})
        for key, views in (("global", expected[:2]), ("local", expected[2:])):
            assert torch.equal(batch[key][0], to_unit(torch.stack(views))), (seed, key)
    if color_on_device:
        assert (seen > 0).all() and (seen < 24).all()    # every random branch went both ways


def _views(**kw):
    cfg = dict(global_size=48, local_size=24, num_local=3, global_scale=(0.4, 1.0), local_scale=(0.1, 0.4))
    return MultiCropConfig(**{**cfg, **kw})


def test_each_view_gets_the_augmentations_of_its_slot(photo):
    t = MultiCropTransform(64, True, _views(color_jitter=0.0, grayscale_p=0.0))  # iBOT's blur / solarize defaults
    colors = [torch.cat([o["global_color"], o["local_color"]]) for o in (t(photo, _rng(s)) for s in range(40))]
    blurred = torch.stack([c[:, BLUR] > 0 for c in colors]).float().mean(0)
    solarized = torch.stack([c[:, SOLARIZE] > 0 for c in colors]).float().mean(0)
    assert blurred[0] == 1.0 and 0 < blurred[1] <= 0.25 and 0.25 <= blurred[2:].mean() <= 0.75
    assert solarized[0] == 0 and 0 < solarized[1] <= 0.45 and solarized[2:].sum() == 0
    radii = torch.cat([c[:, BLUR] for c in colors])
    assert radii[radii > 0].min() >= 0.1 and radii.max() <= 2.0

    only = MultiCropTransform(64, True, _views(color_jitter=0.0, grayscale_p=0.0, blur_p=(0.0, 1.0, 0.0),
                                               solarize_p=(1.0, 0.0, 0.0)))
    out = only(photo, _rng(0))
    assert out["global_color"][:, BLUR].gt(0).tolist() == [False, True] and out["local_color"][:, BLUR].sum() == 0
    assert out["global_color"][:, SOLARIZE].tolist() == [1.0, 0.0] and out["local_color"][:, SOLARIZE].sum() == 0


def test_grey_views_and_a_clean_reconstruction_view(photo):
    t = MultiCropTransform(64, True, _views(grayscale_p=1.0))
    for seed in range(4):
        out = t(photo, _rng(seed))
        assert out["global_color"][:, GRAY].all() and out["local_color"][:, GRAY].all()
        batch = views_to_unit({k: v[None] for k, v in out.items()})
        for key in ("global", "local"):
            assert torch.equal(batch[key][:, :, 0], batch[key][:, :, 1]) and torch.equal(batch[key][:, :, 0],
                                                                                        batch[key][:, :, 2])
        # the reconstruction view is ImageTransform's: same flip draw (the first), no colour change
        clean = ImageTransform(64, True)(photo, _rng(seed))["image"]
        assert torch.equal(batch["image"][0], clean) and not torch.equal(clean[0], clean[1])


def test_colours_on_the_device_give_the_batch_the_worker_path_gives(photo):
    on_device, in_worker = (MultiCropTransform(64, True, _views(color_on_device=flag)) for flag in (True, False))
    a = [on_device(photo, _rng(s)) for s in range(8)]
    b = [in_worker(photo, _rng(s)) for s in range(8)]
    assert "global_color" in a[0] and "global_color" not in b[0]
    stack = lambda items: {k: torch.stack([it[k] for it in items]) for k in items[0]}  # noqa: E731
    a, b = views_to_unit(stack(a)), views_to_unit(stack(b))
    assert a.keys() == b.keys()
    for key in ("image", "global", "local"):
        assert a[key].dtype == torch.float32 and torch.equal(a[key], b[key]), key


def test_the_decode_reduction_never_upsamples_a_view():
    t = MultiCropTransform(256, True, MultiCropConfig(), fast=True)
    big = t.draw((2048, 1536), _rng(0))
    r = t.decode_reduction((2048, 1536), big)
    assert r in (1, 2, 4)
    for (out, *_), v in zip(t.specs, big["views"]):
        assert min(v["box"][2:]) / r >= out  # every crop still covers at least its output size
    assert t.decode_reduction((500, 375), t.draw((500, 375), _rng(0))) == 1  # ImageNet's usual size: full decode
    assert ImageTransform(256, False, fast=True).decode_reduction((2048, 1536), {}) == 4  # 1536 -> 768 -> 384
    assert MultiCropTransform(256, True, MultiCropConfig()).decode_reduction((2048, 1536), big) == 1  # reference


def test_train_transform_is_plain_or_multi_crop_with_its_arguments(photo):
    plain = train_transform(64, True, None, fast=True)
    assert type(plain) is ImageTransform and (plain.image_size, plain.hflip, plain.fast) == (64, True, True)
    assert plain(photo)["image"].dtype == torch.uint8 and plain.uint8  # uint8 until the device
    cfg = MultiCropConfig(global_size=32, local_size=16, num_local=0)
    multi = train_transform(64, False, cfg, fast=True)
    assert type(multi) is MultiCropTransform and multi.cfg is cfg and multi.fast
    assert (multi.recon.image_size, multi.recon.hflip, multi.recon.fast) == (64, False, True)
    assert not train_transform(64, False, cfg).fast and not train_transform(64, False, None).fast  # the reference


def test_no_local_crops_give_an_empty_uint8_stack_of_their_side(photo):
    out = MultiCropTransform(64, False, MultiCropConfig(global_size=32, local_size=16, num_local=0))(photo)
    assert out["global"].shape == (2, 3, 32, 32) and out["image"].dtype == torch.uint8
    assert out["local"].shape == (0, 3, 16, 16) and out["local"].dtype == torch.uint8


@pytest.mark.parametrize("boxes,expected", [
    ((8192, 8192), 8),  # every crop 36x its output or more: capped at PIL's largest draft reduction, 1/8
    ((900, 8192), 4),   # a 900-pixel global crop for a 224 output: 900 / 4 = 225 >= 224, 900 / 8 < 224
    ((300, 8192), 1),   # a crop under twice its output: no reduction
])
def test_the_decode_reduction_is_the_largest_power_of_two_every_crop_allows(boxes, expected):
    t = MultiCropTransform(256, False, MultiCropConfig(num_local=2), fast=True)
    params = t.draw((8192, 8192), _rng(0))
    for i, v in enumerate(params["views"]):
        side = boxes[0] if i == 0 else boxes[1]
        v["box"] = (0, 0, side, side)
    assert t.decode_reduction((8192, 8192), params) == expected


def test_no_colour_jitter_draws_no_jitter():
    """color_jitter: 0 turns the jitter off whatever jitter_p says: no flag, and none of its draws."""
    off = MultiCropConfig(color_jitter=0.0, jitter_p=1.0, grayscale_p=0.5)
    g = _rng(3)
    params = [draw_color(off, 0.5, 0.5, g) for _ in range(50)]
    assert all(p[JITTER] == 0 for p in params) and any(p[GRAY] == 1 for p in params)
