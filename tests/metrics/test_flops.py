"""GMACs counted by torch's flop counter: hand counts and attention on the CPU."""
import pytest
import torch
import torch.nn as nn

from tcae_ldm.metrics.flops import count_gmacs
from tcae_ldm.models.dit import DiT, create_dit


def test_gmacs_match_hand_counts():
    assert count_gmacs(nn.Linear(64, 32), torch.randn(10, 64)) * 1e9 == 10 * 64 * 32
    conv = nn.Conv2d(3, 8, kernel_size=3, padding=1, stride=2)
    # 8 output channels x 8x8 positions, each a 3x3x3 dot product
    assert count_gmacs(conv, torch.randn(1, 3, 16, 16)) * 1e9 == 8 * 8 * 8 * 27


NUM_CLASSES = 10


def tiny(patch_size: int = 1, **overrides) -> DiT:
    kwargs = dict(input_size=8, in_channels=4, num_classes=NUM_CLASSES, patch_size=patch_size)
    return create_dit("DiT-T/1", **{**kwargs, **overrides})


def inputs(batch: int = 2, channels: int = 4, size: int = 8):
    torch.manual_seed(1)
    return torch.randn(batch, channels, size, size), torch.rand(batch), torch.randint(0, NUM_CLASSES, (batch,))


def test_gmacs_count_attention_on_cpu():
    # torch's counter has no formula for the CPU attention kernel; ours adds it, so CPU equals meta.
    model = tiny(1)
    x, t, y = inputs(1)
    with torch.device("meta"):
        meta_model, meta_in = tiny(1), [torch.empty_like(v, device="meta") for v in (x, t, y)]
    assert count_gmacs(model, x, t, y) == pytest.approx(count_gmacs(meta_model, *meta_in), rel=1e-9)

