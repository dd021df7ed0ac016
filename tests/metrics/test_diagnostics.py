"""Latent diagnostics: effective rank, spectra, linear probes, feature extraction."""
import pytest
import torch

from tcae_ldm.data.demo import DemoPhotosDataModule
from tcae_ldm.metrics.diagnostics import (
    diagnose,
    extract_features,
    latent_spectrum,
    linear_probe,
)
from tcae_ldm.models.tcae import create_tcae


def _tiny_demo():
    return DemoPhotosDataModule(image_size=32, train_per_class=4, val_per_class=2, global_batch_size=8)


def _blobs(n, k, d, g, labels=None):
    centres = torch.randn(k, d, generator=torch.Generator().manual_seed(1)) * 6
    y = torch.randint(0, k, (n,), generator=g) if labels is None else labels
    return centres[y] + torch.randn(n, d, generator=g), y


def test_isotropic_latent_has_full_effective_rank():
    g = torch.Generator().manual_seed(0)
    s = latent_spectrum(torch.randn(512, 16, 4, 4, generator=g))  # 8192 samples of 16 channels
    assert s["effective_rank"] == pytest.approx(16, rel=0.02)
    assert s["effective_rank_ratio"] == pytest.approx(1.0, rel=0.02)
    assert s["channels_90"] >= 14 and s["channels_99"] == 16


def test_rank_one_latent_has_effective_rank_one():
    g = torch.Generator().manual_seed(0)
    direction = torch.randn(16, generator=g)
    amount = torch.randn(256, 1, 4, 4, generator=g)
    s = latent_spectrum(amount * direction.view(1, 16, 1, 1) + 3.0)  # an offset is not variance
    assert s["effective_rank"] == pytest.approx(1.0, abs=1e-3)
    assert s["components_90"] == s["components_99"] == 1


def test_spectra_are_sorted_and_sum_to_one():
    g = torch.Generator().manual_seed(0)
    scales = torch.tensor([0.1, 3.0, 1.0, 0.01, 2.0, 0.5, 0.2, 1.5]).view(1, 8, 1, 1)
    s = latent_spectrum(torch.randn(64, 8, 2, 2, generator=g) * scales)
    for key in ("channel_variance", "eigenvalues"):
        v = torch.tensor(s[key])
        assert v.sum().item() == pytest.approx(1.0, abs=1e-9)
        assert torch.all(v[:-1] >= v[1:]), key
    # channel 1 (scale 3) carries 9 / sum(scale^2) of the variance
    assert s["channel_variance"][0] == pytest.approx(9 / float(scales.pow(2).sum()), rel=0.2)
    assert s["channels"] == 8 and s["samples"] == 256
    assert 1 <= s["channels_90"] <= s["channels_99"] <= 8


def test_constant_latent_and_bad_shape():
    s = latent_spectrum(torch.ones(4, 3, 2, 2))
    assert s["effective_rank"] == 0.0 and s["total_variance"] == 0.0
    with pytest.raises(ValueError, match=r"\(N, c, h, w\)"):
        latent_spectrum(torch.ones(4, 3))


def test_probe_separates_separable_features():
    g = torch.Generator().manual_seed(0)
    xt, yt = _blobs(400, 5, 20, g)
    xv, yv = _blobs(200, 5, 20, g)
    acc, train_acc = linear_probe(xt * 100 + 7, yt, xv * 100 + 7, yv, return_train_acc=True)  # scale-free
    assert acc == pytest.approx(1.0, abs=0.01) and train_acc == 1.0
    assert linear_probe(xt, yt, xv, yv) == acc  # deterministic: same data, same probe


def test_probe_on_random_labels_is_at_chance():
    g = torch.Generator().manual_seed(0)
    xt, xv = torch.randn(2000, 16, generator=g), torch.randn(2000, 16, generator=g)
    yt, yv = torch.randint(0, 4, (2000,), generator=g), torch.randint(0, 4, (2000,), generator=g)
    assert abs(linear_probe(xt, yt, xv, yv, num_classes=4) - 0.25) < 0.05


def test_extract_features_shapes_and_mode():
    torch.manual_seed(0)
    net = create_tcae("TC-AE-T/p4-c16", image_size=32, latent_size=2).train()
    dm = _tiny_demo()
    dm.setup()
    loader = torch.utils.data.DataLoader(dm.val_set, batch_size=5)  # 16 images in batches of 5
    f = extract_features(net, loader)
    assert f["tokens"].shape == (16, 32)  # width of the T preset
    assert f["latents"].shape == (16, 16 * 2 * 2) and f["latents_pooled"].shape == (16, 16)
    assert f["latent_grid"].shape == (16, 16, 2, 2)
    assert torch.equal(f["labels"], torch.arange(8).repeat_interleave(2))
    assert net.training  # restored
    with torch.no_grad():
        z = net.eval().encode(next(iter(loader))["image"]).latent
    assert torch.allclose(f["latent_grid"][:5], z, atol=1e-6)
    coarse = extract_features(net, loader, max_images=7, tokens="coarse")
    assert coarse["tokens"].shape == (7, 32) and len(coarse["labels"]) == 7
    with pytest.raises(ValueError, match="tokens must be one of"):
        extract_features(net, loader, tokens="cls")


def test_diagnose_leaves_rng_and_datamodule_untouched():
    net = create_tcae("TC-AE-T/p4-c16", image_size=32, latent_size=2)
    dm = _tiny_demo()
    dm.setup()
    rng = torch.get_rng_state()
    res = diagnose(net, dm, max_images=12, batch_size=8)
    assert torch.equal(rng, torch.get_rng_state())
    assert dm.train_set.transform.hflip  # the training set keeps its augmentation
    assert res["train_images"] == res["val_images"] == 12
    assert res["num_classes"] == 8 and res["chance"] == 0.125
    assert res["latent_shape"] == [16, 2, 2] and res["token_dim"] == 32
    assert all(0.0 <= res[k] <= 1.0 for k in ("probe_tokens", "probe_latent", "probe_latent_pooled"))
    assert res["spectrum"]["samples"] == 24 * 4



def test_diagnose_reports_progress_only_when_asked(capsys):
    torch.manual_seed(0)
    net = create_tcae("TC-AE-T/p4-c16", image_size=32, latent_size=2)
    quiet = diagnose(net, _tiny_demo(), batch_size=16)
    assert capsys.readouterr().err == ""
    loud = diagnose(net, _tiny_demo(), batch_size=16, progress=True)
    err = capsys.readouterr().err.splitlines()
    assert [ln.split(" in ")[0] for ln in err if ln.startswith("encode")] == ["encode train: 2 batches",
                                                                             "encode val: 1 batches"]
    assert any(ln.startswith("fitting probe_latent on (32, 64) features") for ln in err)
    assert loud["probe_latent"] == quiet["probe_latent"]
