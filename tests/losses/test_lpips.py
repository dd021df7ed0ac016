"""LPIPS built offline: a missing VGG16 file is one clear error; a torchvision file loads."""
import pytest
import torch

from tcae_ldm.losses.lpips import build_lpips
from tcae_ldm.losses.reconstruction import ReconstructionLoss, ReconstructionLossConfig
from tcae_ldm.utils.files import MissingWeightsError


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
    import torchvision

    vgg = torchvision.models.vgg16(weights=None)
    path = tmp_path / "vgg16.pth"
    torch.save(vgg.state_dict(), path)
    net = build_lpips(str(path))
    assert torch.equal(net.net.slice3.get_submodule("10").weight, vgg.features[10].weight)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert net(x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert not any(p.requires_grad for p in net.parameters())

