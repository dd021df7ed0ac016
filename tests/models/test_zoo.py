"""Autoencoders by preset name: families and the errors for unknown names."""
import pytest

from tcae_ldm.lit.autoencoder import AutoencoderModule
from tcae_ldm.losses.reconstruction import ReconstructionLossConfig
from tcae_ldm.models.zoo import autoencoder_family, create_autoencoder
from tests.tiny import TINY_DCAE


def test_families_and_bad_names():
    assert autoencoder_family("TC-AE-B/p8-c128") == "tcae" and autoencoder_family("DC-AE/f32c32") == "dcae"
    with pytest.raises(KeyError, match="unknown autoencoder preset 'DC-AE/f64c128'"):
        create_autoencoder("DC-AE/f64c128")
    with pytest.raises(ValueError, match="iBOT reads the tokens of a ViT encoder; DC-AE-T/f16c16 is a convolutional"):
        AutoencoderModule(net=TINY_DCAE, loss=ReconstructionLossConfig(lpips_weight=0.0), ssl={}, metrics_lpips=None)

