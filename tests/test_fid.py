"""FID: Frechet distance against closed forms, exact running statistics, reference files, feature networks."""
import os

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import linalg

from tcae_ldm.data.transforms import center_crop_arr
from tcae_ldm.metrics import features as feats
from tcae_ldm.metrics.features import (INCEPTION_FILE, INCEPTION_URL, MissingFeatureWeightsError, RandomFeatures,
                                       build_feature_extractor, train_demo_classifier)
from tcae_ldm.metrics.fid import (FIDMetric, FrechetStats, ReconstructionFID, ReferenceStats, frechet_distance,
                                  load_stats, metric_name, save_stats)
from tcae_ldm.metrics.reconstruction import ReconstructionMetrics
from tcae_ldm.metrics.fid_stats import main as fid_stats_main


def random_spd(dim, seed):
    a = np.random.default_rng(seed).normal(size=(dim, dim))
    return a @ a.T / dim + 0.1 * np.eye(dim)


def test_equal_covariances_give_squared_mean_distance():
    rng = np.random.default_rng(0)
    mu1, mu2, sigma = rng.normal(size=8), rng.normal(size=8), random_spd(8, 1)
    assert frechet_distance(mu1, sigma, mu2, sigma) == pytest.approx(np.sum((mu1 - mu2) ** 2), abs=1e-8)


def test_diagonal_covariances_closed_form():
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
    mu1, mu2 = np.zeros(3), np.array([1.0, 2.0, 0.0])
    expected = 5.0 + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, abs=1e-9)


def test_general_covariances_match_symmetric_formula():
    # Tr((S1 S2)^1/2) = Tr((S1^1/2 S2 S1^1/2)^1/2): an independent route through symmetric matrices
    s1, s2 = random_spd(6, 2), random_spd(6, 3)
    mu1, mu2 = np.arange(6.0), np.ones(6)
    r = linalg.sqrtm(s1).real
    tr = np.sum(np.sqrt(np.linalg.eigvalsh(r @ s2 @ r)))
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


def test_rank_deficient_statistics_stay_finite():
    x = np.random.default_rng(4).normal(size=(5, 16))  # fewer samples than dims: singular covariance
    mu, sigma = x.mean(0), np.cov(x, rowvar=False)
    d = frechet_distance(mu, sigma, mu, sigma)
    assert np.isfinite(d) and abs(d) < 1e-2


def test_running_statistics_equal_one_shot_mean_and_cov():
    x = np.random.default_rng(5).normal(loc=3.0, size=(103, 7))
    stats = FrechetStats(7)
    for chunk in np.split(x, [10, 11, 50, 90]):  # uneven batches, one of a single sample
        stats.update(torch.from_numpy(chunk).float())
    mu, sigma = stats.mean_cov()
    x32 = x.astype(np.float32).astype(np.float64)  # the features arrived as float32
    np.testing.assert_allclose(mu, x32.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x32, rowvar=False, ddof=1), rtol=1e-9, atol=1e-12)
    assert stats.count == 103


def test_merge_and_reduce_add_up_without_double_counting():
    x = torch.randn(40, 5, dtype=torch.float64)
    a, b, whole = FrechetStats(5), FrechetStats(5), FrechetStats(5)
    a.update(x[:15])
    b.update(x[15:])
    whole.update(x)
    a.merge(b)
    for _ in range(2):  # reduced() returns a copy: calling it again must not change anything
        mu, sigma = a.reduced().mean_cov()
    np.testing.assert_allclose(mu, whole.mean_cov()[0], rtol=1e-12)
    np.testing.assert_allclose(sigma, whole.mean_cov()[1], rtol=1e-10)
    assert a.count == 40
    with pytest.raises(ValueError, match=r"\(B, 5\), got \(3, 4\)"):
        FrechetStats(5).update(torch.randn(3, 4))


def test_stats_file_round_trip_and_adm_reference_format(tmp_path):
    stats = FrechetStats(4)
    stats.update(torch.randn(20, 4))
    path = str(tmp_path / "ref.npz")
    stats.save(path, features="random", source="unit test")
    ref = load_stats(path, expect_features="random")
    np.testing.assert_allclose(ref.mu, stats.mean_cov()[0])
    np.testing.assert_allclose(ref.sigma, stats.mean_cov()[1])
    assert (ref.features, ref.count) == ("random", 20)
    with pytest.raises(ValueError, match="'random' network, not 'inception'"):
        load_stats(path, expect_features="inception")
    # ADM's VIRTUAL_imagenet256_labeled.npz: images in arr_0 plus mu/sigma and spatial mu_s/sigma_s
    adm = str(tmp_path / "VIRTUAL_imagenet256_labeled.npz")
    mu, sigma = np.arange(3.0), np.eye(3)
    np.savez(adm, arr_0=np.zeros((2, 8, 8, 3), np.uint8), mu=mu, sigma=sigma, mu_s=mu, sigma_s=sigma)
    ref = load_stats(adm, expect_features="inception")  # says nothing about its network: accepted
    np.testing.assert_array_equal(ref.mu, mu)
    np.testing.assert_array_equal(ref.sigma, sigma)
    assert ref.features is None
    save_stats(str(tmp_path / "plain.npz"), mu, sigma)
    assert load_stats(str(tmp_path / "plain.npz")).features is None
    np.savez(str(tmp_path / "nomu.npz"), arr_0=np.zeros(3))
    with pytest.raises(ValueError, match="no 'mu'/'sigma'"):
        load_stats(str(tmp_path / "nomu.npz"))


def test_missing_inception_weights_name_the_file_and_never_download(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda *a, **k: pytest.fail("tried to download"))
    with pytest.raises(MissingFeatureWeightsError) as err:
        build_feature_extractor("inception")
    msg = str(err.value)
    assert isinstance(err.value, FileNotFoundError)
    assert INCEPTION_FILE in msg and INCEPTION_URL in msg and str(tmp_path / "hub" / "checkpoints") in msg
    with pytest.raises(MissingFeatureWeightsError, match="nowhere/inception.pth"):
        build_feature_extractor("inception-v3-compat", weights_path=str(tmp_path / "nowhere" / "inception.pth"))


def test_inception_wrapper_scores_uint8_and_float_alike(tmp_path, monkeypatch):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    fake = tmp_path / INCEPTION_FILE
    fake.write_bytes(b"")  # present on disk; its loading is stubbed so the net keeps random weights
    monkeypatch.setattr(torch, "load", lambda *a, **k: {})
    monkeypatch.setattr(FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None)
    monkeypatch.setattr(FeatureExtractorInceptionV3, "INPUT_IMAGE_SIZE", 75)  # its smallest valid input, for speed
    ext = build_feature_extractor("inception", weights_path=str(fake))
    assert (ext.name, ext.dim, metric_name("gfid", ext.name)) == ("inception", 2048, "gfid_inception")
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    f_uint8, f_float = ext(x), ext(x.float() / 127.5 - 1)
    assert f_uint8.shape == (2, 2048)
    torch.testing.assert_close(f_uint8, f_float)


def images(seed, n=48, shift=0.0):
    """Flat random colours plus noise: images whose pooled features differ from image to image."""
    g = torch.Generator().manual_seed(seed)
    colour = torch.rand(n, 3, 1, 1, generator=g) - 0.5
    return (colour + 0.3 * torch.randn(n, 3, 16, 16, generator=g) + shift).clamp(-1, 1)


def test_fid_metric_zero_on_reference_and_grows_with_shift():
    ext = RandomFeatures(dim=16, seed=0)
    ref = FrechetStats(ext.dim)
    ref.update(ext(images(0)))
    ref = ReferenceStats(*ref.mean_cov(), features=ext.name)
    metric = FIDMetric(ext, ref)
    assert metric.name == "gfid_random" and not list(metric.parameters())  # the network stays out of checkpoints
    metric.update(images(0)[:10])
    metric.update(images(0)[10:])
    assert abs(metric.compute()) < 1e-3
    assert metric.compute() == pytest.approx(metric.compute())  # no double counting on repeated compute
    metric.reset()
    metric.update(images(1))
    near = metric.compute()
    metric.reset()
    metric.update(images(1, shift=0.4))
    assert metric.compute() > near > 1e-3
    with pytest.raises(ValueError, match="16-d"):
        FIDMetric(RandomFeatures(dim=8), ReferenceStats(ref.mu, ref.sigma))
    with pytest.raises(ValueError, match="'random' network cannot score 'demo-classifier'"):
        other = RandomFeatures(dim=16)
        other.name = "demo-classifier"
        FIDMetric(other, ref)


def test_rfid_is_the_frechet_distance_of_real_and_reconstructed_features():
    ext = RandomFeatures(dim=8, seed=0)
    x = images(0)
    x_rec = (x + 0.2 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(-1, 1)
    rfid = ReconstructionFID(ext)
    assert rfid.name == "rfid_random" and not list(rfid.parameters())
    for a, b in zip(x.split(7), x_rec.split(7)):          # batches of any size add up to the one-shot statistics
        rfid.update(a, b)
    f_real, f_fake = ext(x).double().numpy(), ext(x_rec).double().numpy()
    expected = frechet_distance(f_fake.mean(0), np.cov(f_fake, rowvar=False), f_real.mean(0), np.cov(f_real, rowvar=False))
    assert rfid.compute() == pytest.approx(expected, rel=1e-6)
    rfid.reset()
    rfid.update(x, x)
    assert abs(rfid.compute()) < 1e-6                     # a perfect reconstruction scores 0
    metrics = ReconstructionMetrics(fid=ReconstructionFID(ext))
    metrics.update(x, x_rec)
    out = metrics.compute()
    assert set(out) == {"psnr", "ssim", "rfid_random"} and float(out["rfid_random"]) == pytest.approx(expected, rel=1e-6)
    metrics.reset()
    assert metrics.fid.real.count == 0


def test_random_features_are_fixed_by_seed_and_leave_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    a, b = RandomFeatures(dim=8, seed=3), RandomFeatures(dim=8, seed=3)
    assert torch.equal(torch.rand(1), expected)
    x = images(2, n=4)
    torch.testing.assert_close(a(x), b(x))
    assert not torch.allclose(a(x), RandomFeatures(dim=8, seed=4)(x))


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
    with pytest.raises(Exception, match="broken.png"):
        fid_stats_main(["--images", str(root), "--image-size", "16", "--features", "random", "--out", str(out)])


def test_demo_classifier_trains_saves_and_loads(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "cache"))
    with pytest.raises(MissingFeatureWeightsError, match="train-demo-classifier"):
        build_feature_extractor("demo-classifier")
    path = str(tmp_path / "demo_cls.pt")
    trained = train_demo_classifier(path, steps=4, batch_size=8, image_size=32, dim=32, width=8,
                                    train_per_class=4, val_per_class=2)
    loaded = build_feature_extractor("demo-classifier", weights_path=path)
    assert (loaded.name, loaded.dim) == ("demo-classifier", 32)
    assert 0.0 <= trained.val_accuracy <= 1.0
    x = torch.randint(0, 256, (3, 3, 48, 48), dtype=torch.uint8)  # other sizes are resized to its 32x32
    f = loaded(x)
    assert f.shape == (3, 32) and f.dtype == torch.float32
    torch.testing.assert_close(f, trained(x))
    assert not any(p.requires_grad for p in loaded.parameters())
    assert metric_name("rfid", loaded.name) == "rfid_demo-classifier"


def test_fid_stats_command_on_the_demo_split(tmp_path):
    out = tmp_path / "demo.npz"
    fid_stats_main(["--demo", "--split", "val", "--features", "random", "--out", str(out), "--max-images", "40"])
    ref = load_stats(str(out))
    assert (ref.count, ref.mu.shape, ref.features) == (40, (feats.RandomFeatures().dim,), "random")


def test_fid_command_scores_an_adm_npz_and_a_folder_alike(tmp_path, capsys):
    from tcae_ldm.metrics.fid_score import main as fid_main

    arr = ((images(3, n=40) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.savez(tmp_path / "samples.npz", arr_0=arr)
    os.makedirs(tmp_path / "pngs")
    for i, a in enumerate(arr):
        Image.fromarray(a).save(tmp_path / "pngs" / f"{i:03d}.png")
    ext = build_feature_extractor("random")            # what --features random builds
    ref = FrechetStats(ext.dim)
    ref.update(ext(images(4, n=40)))
    ref.save(str(tmp_path / "ref.npz"), features="random")
    f = ext(torch.from_numpy(arr).permute(0, 3, 1, 2)).double().numpy()
    expected = frechet_distance(f.mean(0), np.cov(f, rowvar=False), *ref.mean_cov())
    out = fid_main([str(tmp_path / "samples.npz"), "--ref", str(tmp_path / "ref.npz"), "--features", "random",
                    "--batch-size", "16", "--out", str(tmp_path / "fid.json")])
    assert out["gfid_random"] == pytest.approx(expected, rel=1e-6) and out["num_samples"] == 40
    assert "gfid_random = " in capsys.readouterr().out
    folder = fid_main([str(tmp_path / "pngs"), "--ref", str(tmp_path / "ref.npz"), "--features", "random"])
    assert folder["gfid_random"] == pytest.approx(expected, rel=1e-6)
    np.savez(tmp_path / "bad.npz", images=arr)
    with pytest.raises(SystemExit):
        fid_main([str(tmp_path / "bad.npz"), "--ref", str(tmp_path / "ref.npz"), "--features", "random"])
    assert "has no 'arr_0' array" in capsys.readouterr().err
