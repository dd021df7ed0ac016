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



def _folder(root, sizes, seed=0):
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    for i, (w, h) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"{i}.png")
    return root


def adm_evaluator_reads(path):
    """What guided-diffusion's evaluations/evaluator.py takes from a batch: activations from arr_0 (uint8 NHWC,
    read_activations), then mu / sigma AND mu_s / sigma_s when the file has mu (read_statistics), else statistics
    computed from those activations."""
    obj = np.load(path)
    images = obj["arr_0"]
    assert images.dtype == np.uint8 and images.ndim == 4 and images.shape[-1] == 3
    stats = (obj["mu"], obj["sigma"], obj["mu_s"], obj["sigma_s"]) if "mu" in list(obj.keys()) else None
    return images, stats


def test_the_image_size_comes_from_the_data_and_mixed_sizes_are_refused(tmp_path):
    same = _folder(tmp_path / "same", [(24, 24), (24, 24)])
    fid_stats_main(["--images", str(same), "--features", "random", "--out", str(tmp_path / "a.npz")])
    assert load_stats(str(tmp_path / "a.npz")).image_size == 24
    mixed = _folder(tmp_path / "mixed", [(24, 24), (40, 30)])
    with pytest.raises(SystemExit) as err:
        fid_stats_main(["--images", str(mixed), "--features", "random", "--out", str(tmp_path / "b.npz")])
    assert f"the images have several sizes ({mixed / '0.png'} is 24x24, {mixed / '1.png'} is 40x30)" in str(err.value)
    assert "give --image-size" in str(err.value) and not (tmp_path / "b.npz").exists()


def test_adm_reference_batches_both_ways(tmp_path):
    """--adm-batch writes the crops as ADM's evaluator reads a reference batch (arr_0, and no mu it would pair
    with the mu_s it then requires); fid-stats reads such a batch (ours, or ADM's own with its statistics) back."""
    root = _folder(tmp_path / "imgs", [(40, 30), (24, 50), (32, 32)])
    common = ["--features", "random", "--batch-size", "2"]
    fid_stats_main(["--images", str(root), "--image-size", "16", *common, "--out", str(tmp_path / "ref.npz"),
                    "--adm-batch", str(tmp_path / "adm.npz")])
    images, stats = adm_evaluator_reads(tmp_path / "adm.npz")
    crops = [np.asarray(center_crop_arr(Image.open(p).convert("RGB"), 16)) for p in sorted(root.glob("*.png"))]
    assert np.array_equal(images, np.stack(crops)) and stats is None
    assert sorted(np.load(tmp_path / "adm.npz").keys()) == ["arr_0"] and not list(tmp_path.glob("*.partial"))
    # ... and read back: the same statistics as from the folder, the size taken from the batch
    fid_stats_main(["--images", str(tmp_path / "adm.npz"), *common, "--out", str(tmp_path / "back.npz")])
    ref, back = load_stats(str(tmp_path / "ref.npz")), load_stats(str(tmp_path / "back.npz"))
    assert back.image_size == 16 and back.count == 3
    np.testing.assert_allclose(back.mu, ref.mu, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(back.sigma, ref.sigma, rtol=1e-4, atol=1e-7)
    with pytest.raises(SystemExit, match=r"adm.npz holds 16x16 images, not 32x32"):
        fid_stats_main(["--images", str(tmp_path / "adm.npz"), "--image-size", "32", *common,
                        "--out", str(tmp_path / "x.npz")])
    # ADM's own reference batch layout (VIRTUAL_imagenet256_labeled.npz): its mu / sigma are what FID uses
    d = 4
    np.savez(tmp_path / "virtual.npz", arr_0=images, mu=np.arange(d, dtype=np.float64), sigma=np.eye(d),
             mu_s=np.zeros(3), sigma_s=np.eye(3))
    adm = load_stats(str(tmp_path / "virtual.npz"), expect_features="inception")
    assert adm.mu.tolist() == [0, 1, 2, 3] and adm.image_size == 16 and adm.features is None
    assert adm_evaluator_reads(tmp_path / "virtual.npz")[1][0].tolist() == [0, 1, 2, 3]
