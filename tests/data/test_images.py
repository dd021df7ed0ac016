"""Image folders: batches, per-device batch sizes, one class index for both splits, the pixels of 16-bit and float
files, and the exact errors for unreadable, too small or missing data."""
import logging
import types

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from tcae_ldm.data.images import (
    CorruptImageError,
    ImageFolderDataModule,
    ImageTooSmallError,
    UnusableImageError,
    load_item,
    read_image,
)
from tcae_ldm.data.transforms import ImageTransform


def _tree(root, sizes=((40, 30), (64, 64), (90, 50)), classes=("cat", "dog"), val_classes=None):
    for split, names in (("train", classes), ("val", val_classes or classes)):
        for c in names:
            (root / split / c).mkdir(parents=True)
            for i, size in enumerate(sizes):
                arr = np.random.default_rng(i).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(arr).save(root / split / c / f"{i}.png")
    return root


def _dm(root, **kw):
    kw = {"image_size": 32, "global_batch_size": 4, "num_workers": 0, **kw}
    dm = ImageFolderDataModule(root=str(root), **kw)
    dm.setup("fit")
    return dm


def _device_batch(dm, batch):
    """What the module receives: the datamodule's hooks around the transfer (here, to the CPU)."""
    return dm.on_after_batch_transfer(dm.on_before_batch_transfer(batch, 0), 0)


def test_image_folder_batches_travel_as_uint8_and_reach_the_module_in_unit_range(tmp_path):
    dm = _dm(_tree(tmp_path))
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["image"].dtype == torch.uint8
    x = _device_batch(dm, dict(batch))["image"]
    assert x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1
    torch.testing.assert_close(x, batch["image"].float() / 127.5 - 1, rtol=0, atol=0)
    assert set(batch["label"].tolist()) <= {0, 1} and batch["skipped"] == 0
    assert dm.num_classes == 2 and len(dm.val_set) == 6
    assert next(iter(dm.val_dataloader()))["image"].dtype == torch.float32  # evaluation code reads it directly


def test_per_device_batch_comes_from_the_global_batch(tmp_path):
    dm = _dm(_tree(tmp_path))
    dm.trainer = types.SimpleNamespace(world_size=2, accumulate_grad_batches=1)
    assert dm.per_device_batch_size == 2
    dm.trainer = types.SimpleNamespace(world_size=3, accumulate_grad_batches=1)
    with pytest.raises(ValueError, match="global_batch_size=4 is not divisible by 3 devices"):
        dm.per_device_batch_size


@pytest.mark.parametrize("key,value", [("global_batch_size", -4), ("global_batch_size", 0),
                                       ("val_batch_size", -1), ("global_batch_size", 2.5)])
def test_a_batch_size_that_is_not_a_positive_integer_is_refused_naming_the_key(tmp_path, key, value):
    with pytest.raises(ValueError, match=rf"data\.{key} must be a positive integer, got {value}"):
        ImageFolderDataModule(root=str(tmp_path), **{key: value})
    if key == "global_batch_size":  # the latent stream shares the rule, checked when its loader is made
        from tcae_ldm.latents.stream import LatentDataModule

        with pytest.raises(ValueError, match=rf"data\.{key} must be a positive integer, got {value}"):
            LatentDataModule(str(tmp_path), global_batch_size=value).per_device_batch_size


def test_corrupt_image_is_named_or_skipped_and_counted(tmp_path):
    root = _tree(tmp_path)
    bad = root / "train" / "dog" / "broken.png"
    bad.write_bytes(b"not a png at all")
    dm = _dm(root, global_batch_size=7)  # the whole training set in one batch
    with pytest.raises(CorruptImageError, match="broken.png"):
        next(iter(dm.train_dataloader()))
    dm = _dm(root, skip_corrupt=True, global_batch_size=7)
    batch = next(iter(dm.train_dataloader()))
    assert batch["skipped"] == 1 and batch["image"].shape[0] == 6


def test_empty_or_missing_folders_say_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _dm(tmp_path / "nothing")
    (tmp_path / "train").mkdir()
    with pytest.raises(FileNotFoundError, match="no class sub-folders"):
        _dm(tmp_path)
    (tmp_path / "train" / "cat").mkdir()
    with pytest.raises(FileNotFoundError, match="no image files"):
        _dm(tmp_path)


# ---------------------------------------------------------------- one class index
def test_val_labels_come_from_the_training_class_index(tmp_path):
    root = _tree(tmp_path, classes=("a", "b", "c"), val_classes=("b", "c"))  # a val split may lack classes
    dm = _dm(root)
    assert dm.classes == ["a", "b", "c"] and dm.num_classes == 3
    assert sorted({y for _, y in dm.val_set.samples}) == [1, 2]  # 'b' means the same in both splits


def test_a_val_class_that_training_does_not_know_is_refused_naming_it(tmp_path):
    root = _tree(tmp_path, classes=("a", "b"), val_classes=("a", "z"))
    with pytest.raises(ValueError, match=r"val' has classes that training does not know: \['z'\]"):
        _dm(root)


def test_a_class_list_file_fixes_the_index(tmp_path):
    root = _tree(tmp_path / "data", classes=("a", "b"), val_classes=("b",))
    names = tmp_path / "classes.txt"
    names.write_text("# index order\nb\nc\na\n")
    with pytest.warns(UserWarning, match=r"1 classes of .*classes.txt have no training image: \['c'\]"):
        dm = _dm(root, class_list=str(names))
    assert dm.classes == ["b", "c", "a"] and dm.num_classes == 3
    assert sorted({y for _, y in dm.train_set.samples}) == [0, 2] and {y for _, y in dm.val_set.samples} == {0}
    names.write_text("a\n")
    with pytest.raises(ValueError, match=r"train' has classes that training does not know: \['b'\]"):
        _dm(root, class_list=str(names))


def test_an_empty_class_folder_is_no_class_and_is_named_once(tmp_path, caplog):
    root = _tree(tmp_path, classes=("a", "c"))
    (root / "train" / "b").mkdir()
    with caplog.at_level(logging.INFO), \
            pytest.warns(UserWarning, match=r"1 class folders of .*train hold no image and are not classes: \['b'\]"):
        dm = _dm(root)
    assert dm.classes == ["a", "c"] and dm.num_classes == 2
    assert "train: 2 of 2 classes, 6 images" in caplog.text and "val: 2 of 2 classes, 6 images" in caplog.text


# ---------------------------------------------------------------- pixels
def test_a_mid_grey_16_bit_png_comes_out_mid_grey(tmp_path):
    path = tmp_path / "grey16.png"
    Image.fromarray(np.full((40, 40), 32768, dtype=np.uint16)).save(path)
    assert Image.open(path).mode == "I;16"  # PIL's own convert('RGB') would clip this to 255
    assert np.asarray(read_image(str(path))).max() == 128
    Image.fromarray(np.full((8, 8), 32768, dtype=np.int32)).save(tmp_path / "grey32.tiff")
    assert Image.open(tmp_path / "grey32.tiff").mode == "I"
    assert np.asarray(read_image(str(tmp_path / "grey32.tiff"))).max() == 128
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "val" / "a").mkdir(parents=True)
    for split in ("train", "val"):
        Image.fromarray(np.full((40, 40), 32768, dtype=np.uint16)).save(tmp_path / split / "a" / "g.png")
    x = _dm(tmp_path, image_size=32).val_set[0]["image"]
    assert x.abs().max() < 0.01  # 128 / 127.5 - 1


def test_float_images_are_scaled_or_refused_naming_the_file(tmp_path):
    Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32)).save(tmp_path / "half.tiff")
    assert np.asarray(read_image(str(tmp_path / "half.tiff"))).max() == 128
    Image.fromarray(np.full((8, 8), 3.0, dtype=np.float32)).save(tmp_path / "hot.tiff")
    with pytest.raises(UnusableImageError, match=r"hot.tiff: mode F with values in \[3, 3\], outside \[0, 1\]"):
        read_image(str(tmp_path / "hot.tiff"))


@pytest.mark.parametrize("size", [(1, 1), (20, 30)])
def test_an_image_far_smaller_than_the_crop_is_refused_or_skipped(tmp_path, size):
    root = _tree(tmp_path, sizes=((64, 64), (90, 50), (70, 80)))
    Image.fromarray(np.zeros((size[1], size[0], 3), dtype=np.uint8)).save(root / "train" / "dog" / "tiny.png")
    common = dict(image_size=64, global_batch_size=7)  # min_image_side defaults to half the 64 crop: 32
    with pytest.raises(ImageTooSmallError, match=rf"tiny.png is {size[0]}x{size[1]}, below data.min_image_side=32"):
        next(iter(_dm(root, **common).train_dataloader()))
    batch = next(iter(_dm(root, skip_corrupt=True, **common).train_dataloader()))
    assert batch["skipped"] == 1 and batch["image"].shape[0] == 6
    assert _dm(root, min_image_side=1, **common).train_set[6]["image"].shape == (3, 64, 64)


# ---------------------------------------------------------------- whole batches unusable
def test_a_batch_with_nothing_readable_is_skipped_and_counted(tmp_path):
    dm = _dm(_tree(tmp_path), skip_corrupt=True)
    dm.trainer = types.SimpleNamespace(training=True, world_size=1, num_training_batches=3, sanity_checking=False,
                                       testing=False)
    with pytest.warns(UserWarning, match=r"skipping a training batch: its 4 files were all unusable \(1 skipped"):
        assert dm.on_before_batch_transfer({"skipped": 4}, 0) is None
    assert dm.on_after_batch_transfer(None, 0) is None
    dm.on_before_batch_transfer({"image": torch.zeros(1, 3, 32, 32, dtype=torch.uint8), "skipped": 3}, 0)
    with pytest.warns(UserWarning):  # the run of empty batches restarted at the readable one
        dm.on_before_batch_transfer({"skipped": 4}, 0)
        dm.on_before_batch_transfer({"skipped": 4}, 0)
    with pytest.raises(UnusableImageError, match="every file of a whole training epoch .3 batches. was unusable"):
        dm.on_before_batch_transfer({"skipped": 4}, 0)
    assert dm.skipped_batches == 4


def test_under_ddp_every_rank_skips_a_step_that_one_rank_cannot_fill(tmp_path):
    dm = _dm(_tree(tmp_path), skip_corrupt=True)
    strategy = types.SimpleNamespace(reduce_boolean_decision=lambda decision, all: True)  # another rank is empty
    dm.trainer = types.SimpleNamespace(training=True, world_size=2, num_training_batches=3, strategy=strategy)
    with pytest.warns(UserWarning, match="skipping a training batch: another rank's files were all unusable"):
        assert dm.on_before_batch_transfer({"image": torch.zeros(1, 3, 32, 32, dtype=torch.uint8), "skipped": 0},
                                           0) is None


# ---------------------------------------------------------------- random draws and exact resume
def _views_dm(**kw):
    from tcae_ldm.data.demo import DemoPhotosDataModule
    from tcae_ldm.data.views import MultiCropConfig

    views = MultiCropConfig(global_size=16, local_size=8, num_local=2, global_scale=(0.4, 1.0), local_scale=(0.1, 0.4))
    dm = DemoPhotosDataModule(image_size=32, train_per_class=3, val_per_class=1, global_batch_size=4, views=views, **kw)
    dm.setup("fit")
    return dm


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])) for k in a)


def test_an_item_is_a_function_of_seed_epoch_and_index():
    ds = _views_dm().train_set
    assert _same(ds[(3, 5)], ds[(3, 5)]) and _same(ds[5], ds[(0, 5)])
    assert not _same(ds[(3, 5)], ds[(4, 5)]) and not _same(ds[(3, 5)], ds[(3, 6)])
    assert not _same(ds[(3, 5)], _views_dm(seed=1).train_set[(3, 5)])


def _epoch(loader, epoch):
    loader.sampler.set_epoch(epoch)
    return [b for b in loader]


def test_workers_and_ranks_draw_what_one_process_draws():
    one, two = _views_dm().train_dataloader(), _views_dm(num_workers=2, persistent_workers=False).train_dataloader()
    for epoch in (0, 1):
        assert all(_same(a, b) for a, b in zip(_epoch(one, epoch), _epoch(two, epoch), strict=True))
    dm = _views_dm()
    dm.trainer = types.SimpleNamespace(world_size=2, global_rank=0, accumulate_grad_batches=1)
    keys = []
    for rank in (0, 1):
        dm.trainer.global_rank = rank
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(1)
        keys.append(list(loader.sampler))
    assert not set(keys[0]) & set(keys[1]) and {i for _, i in keys[0] + keys[1]} == set(range(24))
    assert {e for e, _ in keys[0] + keys[1]} == {1}


def test_the_training_loader_resumes_mid_epoch_at_the_next_batch():
    straight = _views_dm().train_dataloader()
    epoch1, epoch2 = _epoch(straight, 1), _epoch(straight, 2)
    assert len(epoch1) == 6

    first = _views_dm().train_dataloader()
    first.sampler.set_epoch(1)
    it = iter(first)
    for _ in range(2):
        next(it)
        first.consumed += 1  # what ImageDataModule.on_before_batch_transfer counts during training
    state = first.state_dict()
    assert state == {"epoch": 1, "batches": 2}

    resumed = _views_dm().train_dataloader()
    resumed.load_state_dict(state)
    assert all(_same(a, b) for a, b in zip(list(resumed), epoch1[2:], strict=True))
    assert all(_same(a, b) for a, b in zip(_epoch(resumed, 2), epoch2, strict=True))  # then whole epochs again

    at_end = _views_dm().train_dataloader()
    at_end.load_state_dict({"epoch": 1, "batches": 6})  # a checkpoint written at the end of epoch 1
    assert at_end.sampler.epoch == 2 and all(_same(a, b) for a, b in zip(list(at_end), epoch2, strict=True))


def test_training_and_validation_run_past_batches_with_nothing_readable(tmp_path):
    """Through Lightning with the module: batches of one file, one unreadable file per split; then a training
    split with no readable file at all stops with one line instead of a KeyError."""
    from tests.tiny import tiny_module, tiny_trainer

    root = _tree(tmp_path / "data", sizes=((40, 40), (48, 40)), classes=("a", "b"))  # 4 files per split
    for split in ("train", "val"):
        (root / split / "a" / "0.png").write_bytes(b"not a png")

    def fit(max_steps):
        dm = ImageFolderDataModule(str(root), image_size=32, global_batch_size=1, val_batch_size=1, num_workers=0,
                                   skip_corrupt=True, hflip=False)
        module = tiny_module(max_steps=max_steps)
        tiny_trainer(str(tmp_path / "run"), max_epochs=2, check_val_every_n_epoch=1).fit(module, dm)
        return module

    with pytest.warns(UserWarning, match="skipping a validation batch: its 1 files were all unusable"):
        assert fit(max_steps=100).step_count == 6  # 3 readable training files in each of 2 epochs
    for path in (root / "train").rglob("*.png"):
        path.write_bytes(b"not a png")
    with pytest.raises(UnusableImageError, match="every file of a whole training epoch .4 batches. was unusable"):
        fit(max_steps=100)


# ----------------------------------------------------------------------------------------- pixels as a viewer shows
def _portrait_jpeg(path, size=(256, 128)):
    """A landscape-stored JPEG (red top half, blue bottom half) whose EXIF says: turn 90 degrees clockwise."""
    arr = np.zeros((size[1], size[0], 3), np.uint8)
    arr[: size[1] // 2, :, 0] = 255
    arr[size[1] // 2:, :, 2] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(arr).save(path, quality=95, exif=exif)
    with Image.open(path) as f:
        return np.asarray(ImageOps.exif_transpose(f).convert("RGB"), dtype=np.float64)


def test_exif_orientation_is_applied_on_both_decode_paths(tmp_path):
    shown = _portrait_jpeg(tmp_path / "portrait.jpg")
    assert shown.shape == (256, 128, 3) and shown[:, :40, 2].mean() > 200  # shown: blue on the left
    assert np.abs(np.asarray(read_image(str(tmp_path / "portrait.jpg")), dtype=np.float64) - shown).mean() < 2
    for fast in (True, False):  # the draft decode reads the stored (landscape) image at a quarter size
        transform = ImageTransform(32, hflip=False, uint8=True, fast=fast)
        assert transform.decode_reduction((128, 256), transform.draw((128, 256), None)) == (4 if fast else 1)
        x = load_item(str(tmp_path / "portrait.jpg"), transform, None)["image"].double()  # (3, 32, 32) centre crop
        assert x[2, :, :8].mean() > 200 and x[0, :, -8:].mean() > 200, fast  # blue left, red right, as shown


def test_transparency_is_composited_onto_white_and_counted(tmp_path):
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[..., 1] = 255  # green hidden under alpha 0 on the left half
    rgba[:, 20:, :] = (0, 0, 0, 255)  # opaque black on the right half
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    arr = np.asarray(read_image(str(tmp_path / "a.png")))
    assert (arr[:, :20] == 255).all() and (arr[:, 20:] == 0).all()  # white where transparent, never the green
    root = tmp_path / "data"
    for split in ("train", "val"):
        for i in range(2):
            (root / split / "c").mkdir(parents=True, exist_ok=True)
            Image.fromarray(rgba, "RGBA").save(root / split / "c" / f"{i}.png")
        Image.fromarray(rgba[..., :3]).save(root / split / "c" / "rgb.png")
        Image.fromarray(rgba[..., :3]).convert("P").save(root / split / "c" / "keyed.png", transparency=0)
    with pytest.warns(UserWarning, match=rf"3 images under {root / 'train'} have transparency .*composited onto "
                                         rf"white \(data.transparency: white"):
        _dm(root)
    with pytest.raises(ValueError, match=rf"3 images under {root / 'train'} have transparency .*data.transparency: "
                                         rf"refuse stops here"):
        _dm(root, transparency="refuse")
