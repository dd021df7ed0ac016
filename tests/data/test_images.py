"""Image folders: batches, per-device batch sizes, and the exact errors for unreadable or missing data."""
import types

import numpy as np
import pytest
from PIL import Image

from tcae_ldm.data.images import CorruptImageError, ImageFolderDataModule


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

