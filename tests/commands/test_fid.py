"""`tcae-ldm fid`: FID / IS / precision-recall as torch-fidelity computes them, npz and folders alike, and one line
for every wrong input."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from tcae_ldm.commands.fid import main as fid_main
from tcae_ldm.commands.fid_stats import main as fid_stats_main
from tcae_ldm.metrics.features import RandomFeatures, build_feature_extractor
from tcae_ldm.metrics.fid import FrechetStats, frechet_distance


def images(seed, n=48, shift=0.0, size=16):
    """Flat random colours plus noise: images whose pooled features differ from image to image."""
    g = torch.Generator().manual_seed(seed)
    colour = torch.rand(n, 3, 1, 1, generator=g) - 0.5
    return (colour + 0.3 * torch.randn(n, 3, size, size, generator=g) + shift).clamp(-1, 1)


def as_uint8(x):
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()  # (N, H, W, 3)


def write_pngs(folder, arr):
    os.makedirs(folder, exist_ok=True)
    for i, a in enumerate(arr):
        Image.fromarray(a).save(os.path.join(folder, f"{i:06d}.png"))


@pytest.fixture
def data(tmp_path):
    """40 samples (npz and PNGs) and reference statistics of 48 other images, made by fid-stats."""
    samples, refs = as_uint8(images(3, n=40, shift=0.2)), as_uint8(images(4, n=48))
    np.savez(tmp_path / "samples.npz", arr_0=samples)
    write_pngs(tmp_path / "pngs", samples)
    write_pngs(tmp_path / "refs", refs)
    fid_stats_main(["--images", str(tmp_path / "refs"), "--image-size", "16", "--features", "random", "--out",
                    str(tmp_path / "ref.npz"), "--batch-size", "16"])
    return {"samples": samples, "refs": refs, "ref": str(tmp_path / "ref.npz")}


def test_npz_and_folder_score_alike(data, tmp_path, capsys):
    ext = build_feature_extractor("random")  # what --features random builds
    f = ext(torch.from_numpy(data["samples"]).permute(0, 3, 1, 2)).double().numpy()
    r = ext(torch.from_numpy(data["refs"]).permute(0, 3, 1, 2)).double().numpy()
    expected = frechet_distance(f.mean(0), np.cov(f, rowvar=False), r.mean(0), np.cov(r, rowvar=False))
    out = fid_main([str(tmp_path / "samples.npz"), "--ref", data["ref"], "--features", "random", "--batch-size", "16",
                    "--out", str(tmp_path / "fid.json")])
    assert out["gfid_random"] == pytest.approx(expected, rel=1e-6) and out["num_samples"] == 40
    assert out["image_size"] == "16x16" and os.path.isfile(tmp_path / "fid.json")
    assert "gfid_random = " in capsys.readouterr().out
    folder = fid_main([str(tmp_path / "pngs"), "--ref", data["ref"], "--features", "random"])
    for key in ("gfid_random", "is_random", "precision_random", "recall_random"):
        assert folder[key] == pytest.approx(out[key], rel=1e-6)


def test_is_and_precision_recall_equal_torch_fidelity_called_directly(data, tmp_path):
    """torch-fidelity's calculate_metrics with the same network registered as its feature extractor."""
    import torch_fidelity
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    class Random(FeatureExtractorBase):
        def __init__(self, name, features_list, **kwargs):
            super().__init__(name, features_list)
            self.net = RandomFeatures()

        @staticmethod
        def get_provided_features_list():
            return ("features", "logits")

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return "logits" if metric == "isc" else "features"

        @staticmethod
        def can_be_compiled():
            return False

        def forward(self, x):
            f, logits = self.net(x, logits=True)
            return tuple(f if name == "features" else logits for name in self.features_list)

    class Images(torch.utils.data.Dataset):
        def __init__(self, arr):
            self.arr = arr

        def __len__(self):
            return len(self.arr)

        def __getitem__(self, i):
            return torch.from_numpy(self.arr[i]).permute(2, 0, 1).contiguous()

    if "tcae-random" not in FEATURE_EXTRACTORS_REGISTRY:
        torch_fidelity.register_feature_extractor("tcae-random", Random)
    theirs = torch_fidelity.calculate_metrics(input1=Images(data["samples"]), input2=Images(data["refs"]), cuda=False,
                                              isc=True, fid=True, prc=True, feature_extractor="tcae-random",
                                              batch_size=7, verbose=False, cache=False, save_cpu_ram=True)
    ours = fid_main([str(tmp_path / "samples.npz"), "--ref", data["ref"], "--features", "random", "--batch-size", "16"])
    assert ours["is_random"] == pytest.approx(theirs["inception_score_mean"], rel=1e-5)
    assert ours["is_random_std"] == pytest.approx(theirs["inception_score_std"], rel=1e-4, abs=1e-7)
    assert (ours["precision_random"], ours["recall_random"]) == (theirs["precision"], theirs["recall"])
    assert 0 < ours["precision_random"] < 1 and 0 < ours["recall_random"] <= 1  # not a degenerate case
    assert ours["gfid_random"] == pytest.approx(theirs["frechet_inception_distance"], rel=1e-5)
    assert ours["num_reference_features"] == 48


def test_a_sample_folder_is_scored_without_its_grid(data, tmp_path):
    out = tmp_path / "sampled"  # what `tcae-ldm sample` writes: images/ and grid.png beside it
    write_pngs(out / "images", data["samples"])
    Image.fromarray(np.zeros((80, 80, 3), np.uint8)).save(out / "grid.png")
    scored = fid_main([str(out), "--ref", data["ref"], "--features", "random", "--metrics", "fid"])
    alone = fid_main([str(tmp_path / "pngs"), "--ref", data["ref"], "--features", "random", "--metrics", "fid"])
    assert scored["num_samples"] == 40 and scored["gfid_random"] == pytest.approx(alone["gfid_random"], rel=1e-9)


def test_adm_reference_batch_gives_its_size_and_its_images_features(data, tmp_path):
    """ADM's reference batch: images in arr_0 beside mu/sigma; precision/recall read its images' features."""
    ext = build_feature_extractor("random")
    stats = FrechetStats(ext.dim)
    stats.update(ext(torch.from_numpy(data["refs"]).permute(0, 3, 1, 2)))
    np.savez(tmp_path / "adm.npz", arr_0=data["refs"], mu=stats.mean_cov()[0], sigma=stats.mean_cov()[1])
    adm = fid_main([str(tmp_path / "samples.npz"), "--ref", str(tmp_path / "adm.npz"), "--features", "random"])
    ours = fid_main([str(tmp_path / "samples.npz"), "--ref", data["ref"], "--features", "random"])
    for key in ("gfid_random", "precision_random", "recall_random"):
        assert adm[key] == pytest.approx(ours[key], rel=1e-6)
    np.savez(tmp_path / "adm64.npz", arr_0=np.zeros((2, 64, 64, 3), np.uint8), mu=stats.mean_cov()[0],
             sigma=stats.mean_cov()[1])
    with pytest.raises(SystemExit, match="samples are 16x16 images but the reference statistics .*adm64.npz were "
                                         "computed on 64x64 images"):
        fid_main([str(tmp_path / "samples.npz"), "--ref", str(tmp_path / "adm64.npz"), "--features", "random"])


def test_wrong_inputs_fail_on_one_line(data, tmp_path):
    samples = data["samples"]
    np.savez(tmp_path / "float.npz", arr_0=samples.astype(np.float32))
    np.savez(tmp_path / "gray.npz", arr_0=samples[..., 0])
    np.savez(tmp_path / "chw.npz", arr_0=samples.transpose(0, 3, 1, 2))
    np.savez(tmp_path / "noarr.npz", images=samples)
    np.savez(tmp_path / "one.npz", arr_0=samples[:1])
    np.savez(tmp_path / "small.npz", arr_0=samples[:5])
    (tmp_path / "text.npz").write_text("not an archive")
    (tmp_path / "empty").mkdir()
    other = tmp_path / "other.npz"
    fid_stats_main(["--images", str(tmp_path / "refs"), "--image-size", "16", "--features", "random", "--out",
                    str(other), "--prc-images", "0"])
    cases = [
        ([str(tmp_path / "float.npz")], "float.npz: arr_0 must be uint8 (N, H, W, 3) in C order, got float32 (40, 16, 16, 3)"),
        ([str(tmp_path / "gray.npz")], "arr_0 must be uint8 (N, H, W, 3) in C order, got uint8 (40, 16, 16)"),
        ([str(tmp_path / "chw.npz")], "arr_0 must be uint8 (N, H, W, 3) in C order, got uint8 (40, 3, 16, 16)"),
        ([str(tmp_path / "noarr.npz")], "noarr.npz has no 'arr_0' array (keys: ['images'])"),
        ([str(tmp_path / "text.npz")], "text.npz is not an .npz file numpy wrote"),
        ([str(tmp_path / "one.npz")], "one.npz holds 1 image(s): a covariance needs at least 2"),
        ([str(tmp_path / "missing.npz")], "samples " + str(tmp_path / "missing.npz") + " do not exist"),
        ([str(tmp_path / "empty")], "no image files"),
        ([str(tmp_path / "samples.npz"), "--ref", str(tmp_path / "none.npz")], "reference statistics "),
        ([str(tmp_path / "samples.npz"), "--ref", str(tmp_path / "text.npz")], "are not an .npz file numpy can read"),
        ([str(tmp_path / "samples.npz"), "--ref", str(tmp_path / "noarr.npz")], "has no 'mu'/'sigma' arrays"),
        ([str(tmp_path / "samples.npz"), "--features", "demo-classifier", "--weights", data["ref"]],
         "ref.npz is not a demo-classifier weight file from `tcae-ldm train-demo-classifier`"),
        ([str(tmp_path / "samples.npz"), "--metrics", "fid,kid"], "--metrics takes a comma-separated subset of fid,is,pr"),
        ([str(tmp_path / "small.npz"), "--metrics", "is"], "needs at least 10 samples, got 5"),
        ([str(tmp_path / "samples.npz"), "--ref", str(other), "--metrics", "pr"], "has none: make it with `tcae-ldm fid-stats`"),
        ([str(tmp_path / "samples.npz"), "--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    ]
    for args, message in cases:
        if "--ref" not in args:
            args = args + ["--ref", data["ref"]]
        if "--features" not in args:
            args = args + ["--features", "random"]
        with pytest.raises(SystemExit) as err:
            fid_main(args)
        text = str(err.value)
        assert text.startswith("tcae-ldm fid: error: ") and message in text and "\n" not in text, (args, text)
    # without --metrics, what the inputs do not allow is skipped, not an error
    assert "is_random" not in fid_main([str(tmp_path / "small.npz"), "--ref", data["ref"], "--features", "random"])
    assert "precision_random" not in fid_main([str(tmp_path / "samples.npz"), "--ref", str(other), "--features", "random"])
