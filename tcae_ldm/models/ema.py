"""Exponential moving averages of a network: the EMA weights that evaluation and sampling use, and iBOT's
teacher, both moved by the one routine `ema_update_`."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn


@torch.no_grad()
def ema_update_(average: nn.Module, net: nn.Module, decay: float) -> None:
    """average = decay * average + (1 - decay) * net for the parameters `net` trains; copy the rest.

    Parameters the net does not train (a frozen encoder, iBOT's fixed prototype lengths) and buffers are
    copied, so float rounding can never make the average drift away from a constant.
    """
    avg_params, net_params = dict(average.named_parameters()), dict(net.named_parameters())
    if avg_params.keys() != net_params.keys():
        raise ValueError("the average and the network have different parameters: "
                         f"{sorted(avg_params.keys() ^ net_params.keys())[:5]}")
    trained = [n for n, p in net_params.items() if p.requires_grad]
    if trained:
        torch._foreach_lerp_([avg_params[n] for n in trained], [net_params[n].detach() for n in trained], 1.0 - decay)
    for n, p in net_params.items():
        if not p.requires_grad:
            avg_params[n].copy_(p)
    for b_avg, b in zip(average.buffers(), net.buffers()):
        b_avg.copy_(b)


class EMA(nn.Module):
    """A frozen copy of a network holding its moving average, so that the average is part of the checkpoint."""

    def __init__(self, net: nn.Module, decay: float = 0.9999, warmup: bool = True):
        super().__init__()
        self.decay, self.warmup = decay, warmup
        self.module = copy.deepcopy(net).requires_grad_(False).eval()

    def current_decay(self, step: int) -> float:
        # Warm-up (1 + n) / (10 + n) keeps early averages from being dominated by the random init.
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    def update(self, net: nn.Module, step: int) -> None:
        ema_update_(self.module, net, self.current_decay(step))

    def train(self, mode: bool = True):
        return super().train(False)  # the average is only ever evaluated
