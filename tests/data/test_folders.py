"""Image folders as a user keeps them: hidden names are not data, symlinked folders are read once, a symlink loop
is refused naming it, and the log's summary line says what was left out and why."""
import logging
import os

import numpy as np
import pytest
from PIL import Image

from tcae_ldm.data.folders import find_images, scan_image_folder
from tcae_ldm.data.images import ImageFolderDataModule


def _image(path, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(path)


def _tree(root):
    for split in ("train", "val"):
        for c in ("cat", "dog"):
            for i in range(2):
                _image(root / split / c / f"{i}.png", i)
    return root


def test_hidden_names_are_ignored_and_reported(tmp_path, caplog):
    root = _tree(tmp_path)
    _image(root / "train" / ".ipynb_checkpoints" / "0-checkpoint.png")  # would be class 0 and shift every label
    _image(root / "train" / "cat" / ".ipynb_checkpoints" / "0-checkpoint.png")
    _image(root / "train" / "dog" / "._0.png")  # macOS's companion file
    samples, classes, _, ignored = scan_image_folder(str(root / "train"))
    assert classes == ["cat", "dog"] and len(samples) == 4
    assert [label for _, label in samples] == [0, 0, 1, 1]
    assert sorted(os.path.basename(p) for p in ignored.hidden) == ["._0.png", ".ipynb_checkpoints",
                                                                    ".ipynb_checkpoints"]
    assert all(".ipynb" not in p and "._" not in p for p in find_images(str(root)))
    with caplog.at_level(logging.INFO):
        ImageFolderDataModule(root=str(root), image_size=32, global_batch_size=2, num_workers=0).setup("fit")
    line = next(m for m in caplog.messages if m.startswith("train:"))
    assert line.endswith("; ignored: 3 hidden names (starting with '.', e.g. .ipynb_checkpoints)"), line


def test_symlinked_folders_are_read_once(tmp_path):
    root = _tree(tmp_path / "data")
    for i in range(3):
        _image(tmp_path / "more" / f"{i}.png", 10 + i)
    os.symlink(tmp_path / "more", root / "train" / "dog" / "more")
    os.symlink(tmp_path / "more", root / "train" / "dog" / "again")  # the same folder a second time
    samples, classes, _, ignored = scan_image_folder(str(root / "train"))
    assert len(samples) == 2 + 2 + 3 and classes == ["cat", "dog"]
    assert ignored.repeated == [str(root / "train" / "dog" / "more")]  # 'again' is read first (sorted)
    assert "1 folders reached again through a symlink" in ignored.summary()


@pytest.mark.parametrize("target", ["..", "../.."])
def test_a_symlink_loop_is_refused_naming_it(tmp_path, target):
    root = _tree(tmp_path)
    os.symlink(target, root / "train" / "cat" / "loop")
    with pytest.raises(ValueError, match=f"^image folder {root / 'train' / 'cat' / 'loop'} is a symlink loop: it "
                                         f"leads back to "):
        scan_image_folder(str(root / "train"))
    with pytest.raises(ValueError, match="is a symlink loop"):
        find_images(str(root))


def test_two_class_folders_that_are_one_folder_are_refused(tmp_path):
    root = _tree(tmp_path)
    os.symlink(root / "train" / "cat", root / "train" / "kitten")
    with pytest.raises(ValueError, match=r"class folders 'cat' and 'kitten' of .* are the same folder"):
        scan_image_folder(str(root / "train"))
