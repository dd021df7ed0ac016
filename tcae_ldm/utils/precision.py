"""Precision regions shared by the losses."""
from __future__ import annotations

import contextlib

import torch


def autocast_off(device: torch.device):
    """A region computed in fp32 even under autocast. The meta device, where costs are counted, has no autocast:
    nothing to switch off there."""
    return contextlib.nullcontext() if device.type == "meta" else torch.autocast(device.type, enabled=False)
