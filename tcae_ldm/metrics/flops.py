"""Model cost: parameter counts and GMACs (what papers call "GFLOPs": multiply-accumulates)."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count


def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                            **kwargs) -> int:
    # the backward's four matmuls (gradients of scores, values, queries, keys), twice the forward's two, as the
    # meta device's math path counts them; a flash kernel's recomputation of the scores is not model compute
    return 2 * sdpa_flop_count(query_shape, key_shape, value_shape)


# torch's counter knows the CUDA attention kernels but not the CPU ones, so on CPU the attention score
# and value matmuls (forward and backward) would silently count as zero; count them the same way as on GPU.
_CUSTOM = {}
if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
    _CUSTOM[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_sdpa_flop
if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
    _CUSTOM[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward] = _cpu_sdpa_backward_flop


def count_gmacs(model: nn.Module, *inputs, **kwargs) -> float:
    """GMACs of one forward call model(*inputs, **kwargs); works on meta tensors (no compute)."""
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_CUSTOM) as counter:
        model(*inputs, **kwargs)
    return counter.get_total_flops() / 2 / 1e9  # the counter reports 2 FLOPs per MAC


def count_call_gmacs(fn: Callable[[], object]) -> float:
    """GMACs of everything fn() runs, backward passes included; works on meta tensors."""
    with FlopCounterMode(display=False, custom_mapping=_CUSTOM) as counter:
        fn()
    return counter.get_total_flops() / 2 / 1e9


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (buffers such as fixed position embeddings excluded)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
