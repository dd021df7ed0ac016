import types

import numpy as np
import pytest
import torch
from PIL import Image

from tcae_ldm.data.demo import DEMO_CLASSES, DemoPhotosDataModule, draw_crops, load_demo_photos
from tcae_ldm.data.images import CorruptImageError, ImageFolderDataModule
from tcae_ldm.data.transforms import center_crop_arr, to_tensor, to_uint8


def _tree(root, sizes=((40, 30), (64, 64), (90, 50)), classes=("cat", "dog")):
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i, size in enumerate(sizes):
                arr = np.random.default_rng(i).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(arr).save(root / split / c / f"{i}.png")
    return root


def _dm(root, **kw):
    dm = ImageFolderDataModule(root=str(root), image_size=32, global_batch_size=4, num_workers=0, **kw)
    dm.setup("fit")
    return dm


def test_center_crop_and_tensor_convention():
    img = Image.fromarray(np.zeros((90, 200, 3), dtype=np.uint8))
    assert center_crop_arr(img, 32).size == (32, 32)
    x = to_tensor(np.full((4, 4, 3), 255, dtype=np.uint8))
    assert x.shape == (3, 4, 4) and x.max() == 1.0
    assert torch.equal(to_uint8(to_tensor(np.arange(48, dtype=np.uint8).reshape(4, 4, 3))).permute(1, 2, 0),
                       torch.arange(48, dtype=torch.uint8).reshape(4, 4, 3))


def test_image_folder_batches(tmp_path):
    dm = _dm(_tree(tmp_path))
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 32, 32)
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1
    assert set(batch["label"].tolist()) <= {0, 1} and batch["skipped"] == 0
    assert dm.num_classes == 2 and len(dm.val_set) == 6


def test_per_device_batch_comes_from_the_global_batch(tmp_path):
    dm = _dm(_tree(tmp_path))
    dm.trainer = types.SimpleNamespace(world_size=2, accumulate_grad_batches=1)
    assert dm.per_device_batch_size == 2
    dm.trainer = types.SimpleNamespace(world_size=3, accumulate_grad_batches=1)
    with pytest.raises(ValueError, match="global_batch_size=4 is not divisible by 3 devices"):
        dm.per_device_batch_size


def test_corrupt_image_is_named_or_skipped_and_counted(tmp_path):
    root = _tree(tmp_path)
    bad = root / "train" / "dog" / "broken.png"
    bad.write_bytes(b"not a png at all")
    dm = _dm(root)
    dm.global_batch_size = 7  # the whole training set in one batch
    with pytest.raises(CorruptImageError, match="broken.png"):
        next(iter(dm.train_dataloader()))
    dm = _dm(root, skip_corrupt=True)
    dm.global_batch_size = 7
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


def test_demo_photos_are_bundled_rgb_images():
    photos = load_demo_photos()
    assert tuple(photos) == DEMO_CLASSES
    assert all(p.dtype == np.uint8 and p.ndim == 3 and p.shape[2] == 3 and min(p.shape[:2]) >= 300
               for p in photos.values())


def test_demo_crops_stay_inside_their_region():
    # a photo whose red channel is its column index: crops reveal which columns they came from
    cols = np.tile(np.arange(256, dtype=np.uint8), (200, 1))
    photo = np.stack([cols, cols, cols], -1)
    crops = draw_crops(photo, (180, 256), 20, 16, (0.2, 0.5), np.random.default_rng(0))
    assert crops.shape == (20, 16, 16, 3) and crops[..., 0].min() >= 178  # bicubic may ring by a level or two


def test_demo_datamodule_is_deterministic_and_labelled():
    a = DemoPhotosDataModule(image_size=32, train_per_class=4, val_per_class=2, hflip=False)
    b = DemoPhotosDataModule(image_size=32, train_per_class=4, val_per_class=2, hflip=False)
    a.setup(), b.setup()
    assert len(a.train_set) == 32 and len(a.val_set) == 16 and a.num_classes == 8
    assert np.array_equal(a.train_set.images, b.train_set.images)
    item = a.val_set[15]
    assert item["image"].shape == (3, 32, 32) and item["label"] == 7


def test_demo_validation_crops_do_not_depend_on_the_training_count():
    a = DemoPhotosDataModule(image_size=32, train_per_class=4, val_per_class=2)
    b = DemoPhotosDataModule(image_size=32, train_per_class=1, val_per_class=2)
    a.setup(), b.setup()
    assert np.array_equal(a.val_set.images, b.val_set.images)
