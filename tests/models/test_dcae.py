"""DC-AE presets: AutoencoderDC's architecture and weights, trained by AutoencoderModule with TC-AE's losses,
loaded frozen for caching, and evaluated by `tcae-ldm validate` / `test` with rFID."""
import pytest
import torch
from diffusers import AutoencoderDC

from tcae_ldm.metrics.flops import count_params
from tcae_ldm.models.dcae import DCAE_PRESETS, create_dcae
from tcae_ldm.models.zoo import create_autoencoder
from tests.tiny import TINY_DCAE


def test_presets_give_the_papers_latent_shapes():
    net = create_autoencoder("DC-AE-S/f16c32")
    x = torch.randn(2, 3, 64, 64)
    x_rec, z = net(x).sample, net.encode(x).latent
    assert z.shape == (2, 32, 4, 4) and x_rec.shape == x.shape
    assert net.latent_shape(64) == (32, 4, 4)
    with torch.device("meta"):
        big = create_autoencoder("DC-AE/f32c32")
    assert big.latent_shape(256) == (32, 8, 8)                     # the same 8x8x32 latent as TC-AE's 8x8 grid
    assert abs(count_params(big) / 1e6 - 323.4) < 0.1               # the published f32c32's size
    with pytest.raises(ValueError, match="not divisible by DC-AE's downsampling factor 32"):
        big.latent_shape(240)


def test_state_dict_and_maths_are_autoencoder_dc():
    torch.manual_seed(0)
    net = create_dcae(TINY_DCAE)
    ref = AutoencoderDC(**DCAE_PRESETS[TINY_DCAE]).eval()
    assert sorted(net.state_dict()) == sorted(ref.state_dict())
    ref.load_state_dict(net.state_dict())
    net.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        z = net.encode(x).latent
        assert torch.equal(z, ref.encode(x).latent) and torch.equal(net.encoder(x), z)
        assert torch.equal(net.decode(z).sample, ref.decode(z).sample)
        assert torch.equal(net(x).sample, ref(x).sample) and net.encode(x, return_dict=False)[0].shape == z.shape
        assert torch.equal(net.to_diffusers().eval().encode(x).latent, z)
    assert net.last_layer is net.decoder.conv_out.conv.weight       # pixel-shuffle output block at f16


def test_pretrained_weights_load_and_a_foreign_config_is_refused(tmp_path):
    torch.manual_seed(0)
    AutoencoderDC(**DCAE_PRESETS[TINY_DCAE]).save_pretrained(tmp_path / "dcae")
    net = create_dcae(TINY_DCAE, pretrained=str(tmp_path / "dcae"))
    saved = AutoencoderDC.from_pretrained(tmp_path / "dcae").state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in net.state_dict().items())
    with pytest.raises(ValueError, match=r"does not match preset 'DC-AE-S/f16c32' in \[.*'encoder_block_out_channels'"):
        create_dcae("DC-AE-S/f16c32", pretrained=str(tmp_path / "dcae"))

