"""The embedded demo photographs: bundled, deterministic crops from disjoint train/val regions."""
import numpy as np

from tcae_ldm.data.demo import (
    DEMO_CLASSES,
    DemoPhotosDataModule,
    draw_crops,
    load_demo_photos,
)


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

