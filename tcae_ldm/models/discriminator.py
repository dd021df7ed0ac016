"""PatchGAN discriminator (pix2pix / taming-transformers style) for the adversarial reconstruction term."""
from __future__ import annotations

import torch.nn as nn


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "group":
        return nn.GroupNorm(min(32, channels // 4), channels)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"discriminator norm must be 'group', 'batch' or 'none', got {kind!r}")


class PatchDiscriminator(nn.Module):
    """Fully convolutional critic: (B, 3, H, W) -> (B, 1, H', W') real/fake logits per receptive patch."""

    def __init__(self, in_channels: int = 3, channels: int = 64, num_layers: int = 3, norm: str = "group"):
        super().__init__()
        layers = [nn.Conv2d(in_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True)]
        mult = 1
        for n in range(1, num_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < num_layers else 1  # the last hidden layer keeps the resolution
            layers += [nn.Conv2d(channels * prev, channels * mult, 4, stride=stride, padding=1, bias=norm == "none"),
                       _norm(norm, channels * mult), nn.LeakyReLU(0.2, inplace=True)]
        layers.append(nn.Conv2d(channels * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.initialize_weights()

    def initialize_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):  # (B, 3, H, W) -> (B, 1, H', W')
        return self.main(x)
