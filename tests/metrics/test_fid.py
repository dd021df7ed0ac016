"""FID: Frechet distance against closed forms, exact running statistics (one process and 2 gloo ranks),
reference files, feature networks."""
import os
import pickle
import socket
import zipfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from scipy import linalg
from torch.utils.data.distributed import DistributedSampler

from tcae_ldm.metrics.features import RandomFeatures
from tcae_ldm.metrics.fid import (
    FIDMetric,
    FrechetStats,
    ReconstructionFID,
    ReferenceStats,
    frechet_distance,
    load_stats,
    save_stats,
)
from tcae_ldm.metrics.reconstruction import ReconstructionMetrics
from tests.metrics.gloo_workers import reduce_worker
from tests.tiny import Touch


def random_spd(dim, seed):
    a = np.random.default_rng(seed).normal(size=(dim, dim))
    return a @ a.T / dim + 0.1 * np.eye(dim)


def images(seed, n=48, shift=0.0):
    """Flat random colours plus noise: images whose pooled features differ from image to image."""
    g = torch.Generator().manual_seed(seed)
    colour = torch.rand(n, 3, 1, 1, generator=g) - 0.5
    return (colour + 0.3 * torch.randn(n, 3, 16, 16, generator=g) + shift).clamp(-1, 1)


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
    assert np.isfinite(d) and abs(d) < 1e-6 * np.trace(sigma)


def torch_fidelity_fd(mu1, s1, mu2, s2):
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    return fid_statistics_to_metric({"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": s2}, verbose=False)[KEY_METRIC_FID]


def sqrtm_fd(mu1, s1, mu2, s2):
    """The previous form (pytorch-fid's, the ADM evaluator's): scipy's sqrtm of S1 S2, real part."""
    covmean = linalg.sqrtm(s1 @ s2)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real), covmean


def test_eigenvalue_form_equals_sqrtm_and_torch_fidelity_on_well_conditioned_statistics():
    rng = np.random.default_rng(7)
    for dim in (3, 16, 64):
        s1, s2 = random_spd(dim, dim), random_spd(dim, dim + 1)
        mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
        ours = frechet_distance(mu1, s1, mu2, s2)
        assert ours == pytest.approx(sqrtm_fd(mu1, s1, mu2, s2)[0], rel=1e-9)
        assert ours == pytest.approx(torch_fidelity_fd(mu1, s1, mu2, s2), rel=1e-9)


def test_eigenvalue_form_stays_real_where_sqrtm_breaks_down():
    """3 samples of 128-d ReLU features per set: sqrtm's 'square root' of the singular product has imaginary
    parts far above the 1e-3 at which pytorch-fid gives up ("Imaginary component"; their size depends on the scipy
    release: about 1000 with 1.15, about 20 with 1.17); the eigenvalue form is real and finite and agrees with
    torch-fidelity's eigvals form."""
    rng = np.random.default_rng(0)
    x, y = np.maximum(rng.normal(size=(3, 128)), 0), np.maximum(rng.normal(size=(3, 128)) + 0.05, 0)
    stats = (x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    _, covmean = sqrtm_fd(*stats)
    assert np.abs(covmean.imag).max() > 1e-3
    ours = frechet_distance(*stats)
    assert np.isfinite(ours) and ours > 0
    assert ours == pytest.approx(torch_fidelity_fd(*stats), rel=1e-6)
    with pytest.raises(ValueError, match="NaN or infinite"):
        frechet_distance(stats[0], stats[1] * np.nan, stats[2], stats[3])


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
    stats.save(path, features="random", source="unit test", image_size=16)
    ref = load_stats(path, expect_features="random")
    np.testing.assert_allclose(ref.mu, stats.mean_cov()[0])
    np.testing.assert_allclose(ref.sigma, stats.mean_cov()[1])
    assert (ref.features, ref.count, ref.image_size) == ("random", 20, 16)
    with pytest.raises(ValueError, match="'random' network, not 'inception'"):
        load_stats(path, expect_features="inception")
    # ADM's VIRTUAL_imagenet256_labeled.npz: images in arr_0 plus mu/sigma and spatial mu_s/sigma_s
    adm = str(tmp_path / "VIRTUAL_imagenet256_labeled.npz")
    mu, sigma = np.arange(3.0), np.eye(3)
    np.savez(adm, arr_0=np.zeros((2, 8, 8, 3), np.uint8), mu=mu, sigma=sigma, mu_s=mu, sigma_s=sigma)
    ref = load_stats(adm, expect_features="inception")  # says nothing about its network: accepted
    np.testing.assert_array_equal(ref.mu, mu)
    np.testing.assert_array_equal(ref.sigma, sigma)
    assert ref.features is None and ref.image_size == 8  # read from the images' array header alone
    save_stats(str(tmp_path / "plain.npz"), mu, sigma)
    assert (load_stats(str(tmp_path / "plain.npz")).features, load_stats(str(tmp_path / "plain.npz")).image_size) == (None, None)
    with pytest.raises(FileNotFoundError, match="reference statistics .*missing.npz do not exist"):
        load_stats(str(tmp_path / "missing.npz"))
    (tmp_path / "garbage.npz").write_text("not an npz")
    with pytest.raises(ValueError, match="garbage.npz are not an .npz file numpy can read"):
        load_stats(str(tmp_path / "garbage.npz"))
    np.savez(str(tmp_path / "nomu.npz"), arr_0=np.zeros(3))
    with pytest.raises(ValueError, match="no 'mu'/'sigma'"):
        load_stats(str(tmp_path / "nomu.npz"))


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
    sized = FIDMetric(ext, ReferenceStats(ref.mu, ref.sigma, features=ext.name, image_size=32))
    with pytest.raises(ValueError, match="gfid_random: the images are 16x16 but the reference statistics were "
                                         "computed on 32x32 images"):
        sized.update(images(0))
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
    assert set(out) == {"psnr", "ssim", "rfid_random", "rfid_images"}
    assert float(out["rfid_random"]) == pytest.approx(expected, rel=1e-6) and float(out["rfid_images"]) == len(x)
    metrics.reset()
    assert metrics.fid.real.count == 0



def _ddp_rfid_worker(rank, world_size, init_method, out_dir, n):
    """One rank of a DDP evaluation: Lightning's DistributedSampler (no shuffle; it pads the last round by repeating
    the first indices) in batches of 2, rFID computed on every rank."""
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size)
    try:
        x, x_rec = images(0, n), images(1, n)
        metric = ReconstructionFID(RandomFeatures(dim=6))
        rows = list(DistributedSampler(range(n), num_replicas=world_size, rank=rank, shuffle=False))
        for i in range(0, len(rows), 2):
            metric.update(x[rows[i:i + 2]], x_rec[rows[i:i + 2]])
        fid = metric.compute()
        real = metric.real.reduced()
        torch.save({"fid": fid, "count": real.count, "sum": real.sum, "outer": real.outer,
                    "local_count": metric.real.count}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_fid_sums_over_two_gloo_ranks_equal_one_process_on_the_same_images(tmp_path):
    """Sums (count, sum x, sum x x^T) all-reduced over 2 ranks equal one process's sums over the images the ranks
    saw: 9 images, so the sampler pads rank 1 with image 0 (10 scored). The padding is visible, and counted."""
    n = 9
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_rfid_worker, args=(2, f"tcp://127.0.0.1:{port}", str(tmp_path), n), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    padded = [i for r in range(2) for i in DistributedSampler(range(n), num_replicas=2, rank=r, shuffle=False)]
    assert sorted(padded) == [0] + list(range(n))                  # one image twice: what DDP evaluation scores
    x, x_rec = images(0, n), images(1, n)
    one = ReconstructionFID(RandomFeatures(dim=6))
    one.update(x[padded], x_rec[padded])
    unpadded = ReconstructionFID(RandomFeatures(dim=6))
    unpadded.update(x, x_rec)
    assert [r["local_count"] for r in ranks] == [5, 5]
    for r in ranks:                                                 # every rank holds the same, whole sums
        assert r["count"] == one.real.count == 10
        # (float32 features of batches of 2 and of one batch of 10 differ in the last bits; the sums are float64)
        assert torch.allclose(r["sum"], one.real.sum, rtol=1e-6, atol=0)
        assert torch.allclose(r["outer"], one.real.outer, rtol=1e-6, atol=0)
        assert r["fid"] == pytest.approx(one.compute(), rel=1e-5)
    assert ranks[0]["fid"] != pytest.approx(unpadded.compute(), rel=1e-3)  # the duplicate changes the value


def test_frechet_distance_refuses_mismatched_or_non_finite_statistics_with_their_shapes():
    mu, eye3, eye4 = np.zeros(3), np.eye(3), np.eye(4)
    with pytest.raises(ValueError, match=r"^statistics of different feature sizes: mu \(3,\) vs \(3,\), "
                                         r"sigma \(3, 3\) vs \(4, 4\)$"):
        frechet_distance(mu, eye3, mu, eye4)  # means agree, covariances do not
    with pytest.raises(ValueError, match=r"^FID of statistics that hold NaN or infinite values$"):
        frechet_distance(mu, eye3, mu + np.inf, eye3)


def test_frechet_distance_computes_in_float64_whatever_the_inputs():
    """float32 statistics (a GPU run's) give exactly the value of their float64 copies: no float32 eigh or trace."""
    mu1, mu2 = np.random.default_rng(0).normal(size=(2, 6))
    s1, s2 = random_spd(6, 1) * 1e3, random_spd(6, 2) * 1e3 + 1 / 3
    low = [a.astype(np.float32) for a in (mu1, s1, mu2, s2)]
    assert frechet_distance(*low) == frechet_distance(*[a.astype(np.float64) for a in low])


def test_stats_files_hold_float64_and_reference_headers_are_read_without_the_images(tmp_path):
    path = str(tmp_path / "f32.npz")
    save_stats(path, np.ones(3, np.float32) / 3, np.eye(3, dtype=np.float32) / 3, count=5)
    with np.load(path) as f:
        assert f["mu"].dtype == f["sigma"].dtype == np.float64 and f["count"].dtype == np.int64
    np.savez(str(tmp_path / "f32_adm.npz"), mu=np.ones(3, np.float32) / 3, sigma=np.eye(3, dtype=np.float32))
    ref = load_stats(str(tmp_path / "f32_adm.npz"))
    assert ref.mu.dtype == ref.sigma.dtype == np.float64

    def adm(name, images, version=(1, 0)):
        """An ADM-style reference batch whose images array is written with .npy format `version`."""
        p = tmp_path / name
        with zipfile.ZipFile(p, "w") as z:
            for key, arr in (("arr_0", images), ("mu", np.zeros(3)), ("sigma", np.eye(3))):
                with z.open(f"{key}.npy", "w") as f:
                    np.lib.format.write_array(f, arr, version=version if key == "arr_0" else (1, 0))
        return str(p)

    assert load_stats(adm("v2.npz", np.zeros((2, 8, 8, 3), np.uint8), version=(2, 0))).image_size == 8
    assert load_stats(adm("wide.npz", np.zeros((2, 8, 6, 3), np.uint8))).image_size is None
    assert load_stats(adm("flat.npz", np.zeros((2, 8, 8), np.uint8))).image_size is None

    np.savez(str(tmp_path / "mu_only.npz"), mu=np.zeros(3))
    with pytest.raises(ValueError, match=r"mu_only.npz has no 'mu'/'sigma' arrays \(keys: \['mu'\]\)"):
        load_stats(str(tmp_path / "mu_only.npz"))


def test_reference_statistics_holding_pickled_objects_are_refused_without_running_them(tmp_path):
    sentinel = tmp_path / "SENTINEL"
    evil = str(tmp_path / "evil.npz")
    payload = np.array([Touch(sentinel)], dtype=object)
    np.savez(evil, mu=np.zeros(3), sigma=np.eye(3), features=payload, count=payload)
    with pytest.raises(ValueError, match=r"^reference statistics .*evil.npz hold pickled objects \(features, count\) "
                                         r"that loading would have to run code to build"):
        load_stats(evil)
    raw = tmp_path / "raw_pickle.npz"  # not a zip at all: a pickle under an .npz name
    raw.write_bytes(pickle.dumps(Touch(sentinel)))
    with pytest.raises(ValueError, match=r"raw_pickle.npz are not an .npz file numpy can read \(ValueError\)"):
        load_stats(str(raw))
    (tmp_path / "garbage.npz").write_bytes(b"PK\x03\x04 truncated zip")
    with pytest.raises(ValueError, match=r"garbage.npz are not an .npz file numpy can read \(BadZipFile\)"):
        load_stats(str(tmp_path / "garbage.npz"))
    assert not sentinel.exists()


def test_running_statistics_edges_and_errors():
    two = FrechetStats(2)
    two.update(torch.tensor([[0.0, 1.0], [2.0, 5.0]]))
    mu, sigma = two.mean_cov()  # two samples are enough for a covariance
    np.testing.assert_allclose(mu, [1.0, 3.0])
    np.testing.assert_allclose(sigma, [[2.0, 4.0], [4.0, 8.0]])
    one = FrechetStats(2)
    one.update(torch.zeros(1, 2))
    with pytest.raises(ValueError, match=r"^need at least 2 samples for a covariance, have 1$"):
        one.mean_cov()
    with pytest.raises(ValueError, match=r"^cannot merge statistics of 4-d features into 2-d ones$"):
        two.merge(FrechetStats(4))


def test_fid_metric_reads_a_reference_path_and_refuses_another_network(tmp_path):
    ext = RandomFeatures(dim=16, seed=0)
    stats = FrechetStats(ext.dim)
    stats.update(ext(images(0)))
    mine, other = str(tmp_path / "mine.npz"), str(tmp_path / "other.npz")
    stats.save(mine, features=ext.name)
    stats.save(other, features="inception")
    metric = FIDMetric(ext, mine)
    np.testing.assert_array_equal(metric.reference.mu, stats.mean_cov()[0])
    metric.update(images(0))
    assert metric.compute() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match=r"'inception' network, not 'random'; make matching ones with "
                                         r"`tcae-ldm fid-stats --features random`"):
        FIDMetric(ext, other)
    assert ReconstructionFID(ext).num_images == 0  # no compute() yet: no image behind a value


def test_reduced_sums_every_rank_once_under_two_gloo_processes(tmp_path):
    """count, sum x and sum x x^T all-reduced over 2 ranks holding different rows equal one process's sums over
    all of them, on every rank; a second reduced() gives the same (it reduces a copy), the local sums stay."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(reduce_worker, args=(2, f"tcp://127.0.0.1:{port}", str(tmp_path)), nprocs=2, join=True)
    whole = FrechetStats(3)
    whole.update(torch.randn(11, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    whole = whole.reduced()  # without a process group: a plain copy, the one-process answer
    for rank, local in ((0, 4), (1, 7)):
        r = torch.load(tmp_path / f"{rank}.pt")
        assert (r["count"], r["first"], r["local"]) == (11, 11, local)
        assert torch.allclose(r["sum"], whole.sum, rtol=1e-12) and torch.allclose(r["outer"], whole.outer, rtol=1e-12)
