"""LPIPS (VGG) built offline: linear heads from the lpips package, the VGG16 trunk from a local file.

The lpips package fetches torchvision's VGG16 weights over the network on first use. Here the trunk is
always built random and then filled from ``$TORCH_HOME/hub/checkpoints/vgg16-397923af.pth`` (torchvision's
cache) or an explicit path, so a missing file is one clear error instead of a download attempt.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn as nn

from tcae_ldm.utils.checkpoints import load_torch_file
from tcae_ldm.utils.files import require_weights, torch_hub_file
from tcae_ldm.utils.precision import autocast_off

VGG16_FILE = "vgg16-397923af.pth"
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"


def default_vgg16_path() -> str:
    return torch_hub_file(VGG16_FILE)


def build_lpips(trunk: str = "pretrained") -> nn.Module:
    """LPIPS-VGG in eval mode, frozen. trunk: 'pretrained' (torchvision cache), 'random' (tests) or a file path."""
    import lpips

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's deprecation notice for lpips' `pretrained=` argument
        net = lpips.LPIPS(net="vgg", pnet_rand=True, pretrained=True, verbose=False)
    if trunk != "random":
        path = require_weights(
            default_vgg16_path() if trunk == "pretrained" else trunk, "LPIPS (its VGG16 trunk)",
            f"Download {VGG16_URL} on a machine with network access and copy it there (torchvision's cache, "
            f"$TORCH_HOME/hub/checkpoints/), or set the loss's lpips_trunk to the file's path; lpips_weight: 0 "
            f"turns LPIPS off.")
        state = load_torch_file(path, what="LPIPS VGG16 trunk")
        # lpips splits torchvision's `features.{i}` into slices that keep the index i as the module name.
        mapped = {k: state[f"features.{k.split('.', 1)[1]}"] for k in net.net.state_dict()}
        net.net.load_state_dict(mapped)
    return net.eval().requires_grad_(False)


class FrozenLPIPS:
    """Holds an LPIPS network outside the module tree: it is not saved in checkpoints (it is a fixed
    metric, rebuilt from its files), is invisible to optimizers and DDP, and follows its inputs' device."""

    def __init__(self, net: nn.Module):
        self.net = net

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-image LPIPS (B,) in fp32 of images in [-1, 1]."""
        if next(self.net.parameters()).device != x.device:
            self.net.to(x.device)
        with autocast_off(x.device):
            return self.net(x.float(), y.float()).flatten()
