"""The bicubic baseline keeps no more floats than the latent."""
import torch

from tcae_ldm.metrics.reconstruction import bicubic_roundtrip, bicubic_side


def test_bicubic_baseline_keeps_no_more_floats_than_the_latent():
    assert bicubic_side(32 * 4 * 4) == 13  # 507 <= 512 floats
    assert bicubic_side(128 * 8 * 8) == 52  # paper scale: 8112 <= 8192
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    assert bicubic_roundtrip(x, 13).shape == x.shape
    flat = torch.zeros(1, 3, 64, 64)
    assert torch.allclose(bicubic_roundtrip(flat, 13), flat)

