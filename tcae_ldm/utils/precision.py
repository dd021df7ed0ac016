"""Precision settings: regions shared by the losses, and denormal flushing for CPU runs."""
from __future__ import annotations

import contextlib

import torch


def autocast_off(device: torch.device):
    """A region computed in fp32 even under autocast. The meta device, where costs are counted, has no autocast:
    nothing to switch off there."""
    return contextlib.nullcontext() if device.type == "meta" else torch.autocast(device.type, enabled=False)


def flush_denormals() -> bool:
    """Flush float denormals (|x| < 1.2e-38) to zero on the CPU; True where the CPU supports it.

    x86 CPUs compute denormals on a slow path. A network's small gradients and AdamW's second moments reach
    them within a few hundred steps, and CPU training then slows down several-fold: the demo DC-AE ran 0.61
    steps/s without this and 1.76 with it (2 cores). Values that small carry nothing a float32 network uses, and
    CUDA kernels are not affected. The `tcae-ldm` executable sets it once per process."""
    return torch.set_flush_denormal(True)
