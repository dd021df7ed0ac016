"""Exponential moving average of a network, held as a frozen copy so that it is part of the checkpoint."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn


class EMA(nn.Module):
    """ema = decay * ema + (1 - decay) * net after every step; buffers are copied."""

    def __init__(self, net: nn.Module, decay: float = 0.9999, warmup: bool = True):
        super().__init__()
        self.decay, self.warmup = decay, warmup
        self.module = copy.deepcopy(net).requires_grad_(False).eval()

    def current_decay(self, step: int) -> float:
        # Warm-up (1 + n) / (10 + n) keeps early EMAs from being dominated by the random init.
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, net: nn.Module, step: int) -> None:
        ema_p = [p for p in self.module.parameters()]
        net_p = [p.detach() for p in net.parameters()]
        torch._foreach_lerp_(ema_p, net_p, 1.0 - self.current_decay(step))
        for b_ema, b in zip(self.module.buffers(), net.buffers()):
            b_ema.copy_(b)

    def train(self, mode: bool = True):
        return super().train(False)  # the average is only ever evaluated
