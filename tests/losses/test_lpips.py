"""LPIPS built offline: a missing VGG16 file is one clear error; a torchvision file loads and gives lpips' own
values; LPIPS as a loss term and as the val/test metric of an autoencoder run."""
from types import SimpleNamespace

import lightning as L
import lpips
import pytest
import torch
import torchvision

from tcae_ldm.losses.lpips import build_lpips
from tcae_ldm.losses.reconstruction import ReconstructionLoss, ReconstructionLossConfig
from tcae_ldm.metrics.reconstruction import ReconstructionMetrics
from tcae_ldm.utils.files import MissingWeightsError
from tests.tiny import tiny_data, tiny_module, tiny_trainer


def _vgg16_features():
    """torchvision's VGG16 `features` alone (building the whole vgg16 also initialises 120M classifier weights)."""
    return torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])


@pytest.fixture(scope="module")
def trunk(tmp_path_factory):
    """A random VGG16 trunk saved as torchvision saves it (only the `features.*` keys LPIPS reads; fp16 halves
    the file), at its torchvision-cache name."""
    torch.manual_seed(0)
    features = _vgg16_features()
    path = tmp_path_factory.mktemp("torch_home") / "hub" / "checkpoints" / "vgg16-397923af.pth"
    path.parent.mkdir(parents=True)
    torch.save({f"features.{k}": v.half() for k, v in features.state_dict().items()}, path)
    return path


@pytest.fixture(scope="module")
def reference(trunk):
    """lpips' own LPIPS-VGG on the same trunk: its pretrained route, with torchvision's vgg16 handing it these
    weights instead of downloading them."""
    state = {k.split(".", 1)[1]: v.float() for k, v in torch.load(trunk, weights_only=True).items()}
    real = lpips.pretrained_networks.tv.vgg16  # (lpips' `tv` is torchvision.models itself)

    def vgg16(*args, **kwargs):  # lpips reads only `.features`
        features = _vgg16_features()
        features.load_state_dict(state)
        return SimpleNamespace(features=features)

    lpips.pretrained_networks.tv.vgg16 = vgg16
    try:
        return lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=False, verbose=False).eval()
    finally:
        lpips.pretrained_networks.tv.vgg16 = real


def _images(seed, n=3):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_lpips_equals_lpips_own_module_on_the_same_trunk_and_follows_its_input(trunk, reference, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(trunk.parents[2]))  # 'pretrained': $TORCH_HOME/hub/checkpoints/<file>
    x, y, z = _images(0), _images(1), _images(2)
    net = build_lpips("pretrained")  # (a file path: the loss and metric tests below)
    with torch.no_grad():
        d_xy, d_xz, d_xx = net(x, y).flatten(), net(x, z).flatten(), net(x, x).flatten()
        assert torch.allclose(d_xy, reference(x, y).flatten(), rtol=1e-5, atol=1e-7)
        assert torch.allclose(d_xz, reference(x, z).flatten(), rtol=1e-5, atol=1e-7)
    assert (d_xy > 0).all() and not torch.allclose(d_xy, d_xz, rtol=1e-3) and d_xx.abs().max() < 1e-6


def test_lpips_as_a_loss_term(trunk, reference):
    loss = ReconstructionLoss(ReconstructionLossConfig(l1_weight=1.0, lpips_weight=0.5, lpips_trunk=str(trunk),
                                                       gan_weight=0.0))
    x, x_rec = _images(3), _images(4).requires_grad_(True)
    total, logs = loss.generator_loss(x, x_rec, step=0)
    with torch.no_grad():
        expected_lpips = reference(x, x_rec).mean()
    assert torch.allclose(logs["lpips"], expected_lpips, rtol=1e-5)
    assert torch.allclose(total, (x - x_rec).abs().mean() + 0.5 * expected_lpips, rtol=1e-5)
    total.backward()  # the perceptual term sends a gradient to the reconstruction, none to the frozen trunk
    l1_only = torch.autograd.grad((x - x_rec).abs().mean(), x_rec)[0]
    assert not torch.allclose(x_rec.grad, l1_only) and not any(p.requires_grad for p in loss.lpips.net.parameters())
    assert "lpips" not in "".join(loss.state_dict())  # a fixed metric: never in checkpoints


def test_lpips_is_the_val_and_test_metric_of_an_autoencoder_run(trunk, reference, tmp_path, monkeypatch):
    """metrics_lpips (the loss without LPIPS): val/lpips_vgg and test/lpips_vgg are the mean of lpips' own
    distances between the images and their clamped reconstructions, over every image of the split."""
    seen = []
    update = ReconstructionMetrics.update

    def spy(self, x, x_rec):
        seen.append((x.detach().clone(), x_rec.detach().clone()))
        return update(self, x, x_rec)

    monkeypatch.setattr(ReconstructionMetrics, "update", spy)
    L.seed_everything(0)
    module = tiny_module(max_steps=1, metrics_lpips=str(trunk))
    trainer = tiny_trainer(str(tmp_path))
    trainer.fit(module, tiny_data())
    for prefix, run in (("val", trainer.validate), ("test", trainer.test)):
        seen.clear()
        (metrics,) = run(module, tiny_data(), verbose=False)
        x = torch.cat([a for a, _ in seen])
        x_rec = torch.cat([b for _, b in seen]).clamp(-1, 1)
        with torch.no_grad():
            expected = reference(x, x_rec).mean().item()
        assert len(x) == 8 and expected > 0
        assert metrics[f"{prefix}/lpips_vgg"] == pytest.approx(expected, rel=1e-5)


def test_missing_lpips_weights_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(MissingWeightsError) as err:
        build_lpips("pretrained")
    msg = str(err.value)
    assert str(tmp_path / "hub" / "checkpoints" / "vgg16-397923af.pth") in msg
    assert "download.pytorch.org" in msg and "lpips_trunk" in msg
    loss = ReconstructionLoss(ReconstructionLossConfig(lpips_trunk=str(tmp_path / "nowhere.pth")))  # builds
    with pytest.raises(MissingWeightsError, match="nowhere.pth"):
        loss.load_lpips()  # the file is needed when LPIPS is


def test_lpips_trunk_loads_from_a_torchvision_file(tmp_path):
    features = _vgg16_features()
    path = tmp_path / "vgg16.pth"
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)  # what LPIPS reads
    net = build_lpips(str(path))
    assert torch.equal(net.net.slice3.get_submodule("10").weight, features[10].weight)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert net(x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert not any(p.requires_grad for p in net.parameters())

