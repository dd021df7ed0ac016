"""`tcae-ldm bench --profile`: where each autoencoder's encode + decode time goes, op by op (torch.profiler).

The FLOP counts say how much arithmetic a network asks for; the profile says how fast the device delivers it: the
matrix products and convolutions run near the device's peak, while normalisation, activations, residual additions
and layout copies move memory without adding MACs. Each network gets one warm-up call, then one profiled encode and
decode (eval, no grad, the run's first precision), reported as self time per op and per category.
"""
from __future__ import annotations

import contextlib

import torch
from torch.profiler import ProfilerActivity, profile

# Op categories by aten name, checked in order (the first match wins).
CATEGORIES = [
    ("attention", ("scaled_dot_product", "flash_attention", "efficient_attention", "cudnn_attention")),
    ("matmul", ("addmm", "::mm", "bmm", "matmul", "linear", "_mkl_linear", "gemm")),
    ("convolution", ("conv",)),
    ("normalisation", ("layer_norm", "batch_norm", "group_norm", "rms_norm", "native_norm")),
    ("activation", ("gelu", "silu", "relu", "clamp", "sigmoid", "tanh", "hardswish")),
    ("copy / layout", ("copy_", "clone", "contiguous", "cat", "pixel_shuffle", "pixel_unshuffle", "_to_copy",
                       "permute", "transpose", "reshape", "view", "fill_", "empty", "as_strided", "expand", "unbind",
                       "narrow", "slice", "select", "squeeze", "flatten", "split", "repeat", "::t", "stack")),
    ("elementwise", ("add", "mul", "sub", "div", "pow", "sum", "mean", "sin", "cos", "exp", "sqrt", "where")),
]
KERNEL_TAG = "## Call CompiledFxGraph"  # torch.compile's generated kernels, one event per graph


def category(op: str) -> str:
    if op.startswith(KERNEL_TAG) or op.startswith("Torch-Compiled"):
        return "compiled kernels"
    return next((name for name, keys in CATEGORIES if any(k in op for k in keys)), "other")


def profile_call(fn, device: torch.device) -> list[dict]:
    """Self time of every op fn() runs: [{op, calls, self_ms}], slowest first (CUDA kernel time on a GPU)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    rows = []
    for e in prof.key_averages():
        self_us = e.self_device_time_total if device.type == "cuda" else e.self_cpu_time_total
        if self_us > 0:
            rows.append({"op": e.key, "calls": e.count, "self_ms": self_us / 1e3})
    return sorted(rows, key=lambda r: -r["self_ms"])


def profile_autoencoder(net, batch: int, image_size: int, device: torch.device, precision: str, top: int) -> dict:
    """{total_ms, categories: {name: ms}, top: [...]} of one encode + one decode of `net` (a cases.Net)."""
    from tcae_ldm.commands.bench.cases import autocast

    gen = torch.Generator(device="cpu").manual_seed(0)
    fmt = torch.channels_last if net.channels_last else torch.contiguous_format
    x = (torch.rand(batch, 3, image_size, image_size, generator=gen) * 2 - 1).to(device, memory_format=fmt)
    z = torch.randn(batch, *net.latent_shape, generator=gen).to(device, memory_format=fmt)
    net.module.eval()

    def run():
        with torch.no_grad(), (autocast(device, precision) if precision else contextlib.nullcontext()):
            net.encode(x)
            net.decode(z)
    run()  # warm-up: first-call allocations, kernel selection, compilation
    rows = profile_call(run, device)
    total = sum(r["self_ms"] for r in rows)
    cats: dict[str, float] = {}
    for r in rows:
        r["category"] = category(r["op"])
        cats[r["category"]] = cats.get(r["category"], 0.0) + r["self_ms"]
    return {"total_ms": total, "categories": dict(sorted(cats.items(), key=lambda kv: -kv[1])), "top": rows[:top]}
