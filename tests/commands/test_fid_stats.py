"""`tcae-ldm fid-stats`: reference statistics of an image folder and of the demo split."""
import numpy as np
import pytest
import torch
from PIL import Image

from tcae_ldm.commands.fid_stats import main as fid_stats_main
from tcae_ldm.data.transforms import center_crop_arr
from tcae_ldm.metrics import features as feats
from tcae_ldm.metrics.features import RandomFeatures
from tcae_ldm.metrics.fid import load_stats


def test_fid_stats_command_on_an_image_folder(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "imgs"
    (root / "a" / "deep").mkdir(parents=True)
    paths = [root / "x.png", root / "a" / "y.jpg", root / "a" / "deep" / "z.png"]
    for p, size in zip(paths, [(40, 30), (24, 50), (32, 32)]):
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(p)
    (root / "notes.txt").write_text("not an image")
    out = tmp_path / "stats" / "ref.npz"
    from tcae_ldm.cli import main as cli_main

    cli_main(["fid-stats", "--images", str(root), "--image-size", "16", "--features", "random", "--out", str(out),
              "--batch-size", "2"])
    ref = load_stats(str(out), expect_features="random")
    ext = RandomFeatures()  # the registry's "random" defaults
    crops = [np.asarray(center_crop_arr(Image.open(p).convert("RGB"), 16)) for p in sorted(map(str, paths))]
    x = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2)
    f = ext(x).double().numpy()
    assert ref.count == 3
    np.testing.assert_allclose(ref.mu, f.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ref.sigma, np.cov(f, rowvar=False), rtol=1e-4, atol=1e-7)
    (root / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(SystemExit, match="broken.png"):
        fid_stats_main(["--images", str(root), "--image-size", "16", "--features", "random", "--out", str(out)])


def test_fid_stats_command_on_the_demo_split(tmp_path):
    out = tmp_path / "demo.npz"
    fid_stats_main(["--demo", "--split", "val", "--features", "random", "--out", str(out), "--max-images", "40"])
    ref = load_stats(str(out))
    assert (ref.count, ref.mu.shape, ref.features) == (40, (feats.RandomFeatures().dim,), "random")

