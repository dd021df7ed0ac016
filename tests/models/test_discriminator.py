"""The PatchGAN critic's shapes."""
import pytest
import torch

from tcae_ldm.models.discriminator import PatchDiscriminator


@pytest.mark.parametrize("norm", ["group", "batch", "none"])
def test_patch_discriminator_shapes(norm):
    d = PatchDiscriminator(channels=8, num_layers=3, norm=norm)
    assert d(torch.randn(2, 3, 64, 64)).shape == (2, 1, 6, 6)
    with pytest.raises(ValueError, match="norm"):
        PatchDiscriminator(norm="layer")

