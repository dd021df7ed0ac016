"""Building blocks of `tcae-ldm bench`: the networks under test, their step functions, cost counts,
interleaved timing with a memory probe, and the two input pipelines.

Speed figures are only compared inside one run: every case of a group is timed in rounds (A B C A B C ...)
after a warm-up, and the median of the rounds is kept, so a machine that slows down mid-run slows every
model alike.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from tcae_ldm.metrics.flops import count_gmacs, count_params
from tcae_ldm.models.dcae import DCAE_PRESETS, create_dcae
from tcae_ldm.models.dcae import dcae_factor as dcae_config_factor
from tcae_ldm.models.dit import create_dit
from tcae_ldm.models.tcae import create_tcae

MODES = ("encode", "decode", "train")
ROUNDTRIP = "encode+decode"  # derived from the encode and decode timings: one image through both
INPUT_TARGET = 3.0  # a loader should deliver >= 3x what the training step it feeds consumes

#################################################################################
#                               Networks under test                             #
#################################################################################

# Dense (no 2:4 sparsity) bf16 tensor-core peaks in TFLOP/s, matched in order against the device name.
PEAK_BF16_TFLOPS = [("GH200", 989.0), ("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0),
                    ("H100", 989.0), ("H800", 989.0), ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0),
                    ("L40S", 362.0), ("L4", 121.0), ("A10G", 70.0)]


def peak_bf16_tflops(device_name: str) -> float | None:
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in device_name), None)


def is_dcae(name: str) -> bool:
    """A DC-AE preset, with or without a variant suffix."""
    return name.partition(":")[0] in DCAE_PRESETS


def dcae_factor(name: str) -> int:
    return dcae_config_factor(DCAE_PRESETS[name.partition(":")[0]])


TCAE_VARIANTS = {"": {}, "vanilla": {"staged": False}, "ckpt": {"grad_checkpointing": True}}
VARIANTS = (*TCAE_VARIANTS, "cl")  # 'cl': weights and inputs in channels-last memory format (any autoencoder)


@dataclass
class Net:
    """An autoencoder behind one call convention: encode(x) -> z, decode(z) -> x."""
    name: str
    module: nn.Module
    encode: Callable[[torch.Tensor], torch.Tensor]
    decode: Callable[[torch.Tensor], torch.Tensor]
    latent_shape: tuple[int, int, int]
    channels_last: bool = False  # inputs are handed over in channels-last memory format


def build_autoencoder(name: str, image_size: int, factor: int) -> Net:
    """'TC-AE-<preset>[:vanilla|:ckpt|:cl]' with a latent grid image_size / factor, or a DC-AE preset
    (tcae_ldm.models.dcae: AutoencoderDC's own encoder and decoder)[:cl]. ':vanilla' is staged=False, ':ckpt' the
    same network with activation checkpointing of the high-token stages (only training steps differ), ':cl' the
    same network with weights and inputs in channels-last memory format.

    Built on the current default device (use `with torch.device(...)`), random weights, nothing downloaded.
    """
    preset, _, variant = name.partition(":")
    if variant not in VARIANTS or (variant and variant != "cl" and is_dcae(preset)):
        raise ValueError(f"unknown variant {variant!r} in {name!r}; use ':cl' (channels-last), or for TC-AE "
                         f"':vanilla' (staged=False) or ':ckpt' (activation checkpointing)")
    if variant == "cl":
        net = build_autoencoder(preset, image_size, factor)
        net.module.to(memory_format=torch.channels_last)
        return Net(name, net.module, net.encode, net.decode, net.latent_shape, channels_last=True)
    if is_dcae(preset):
        m = create_dcae(preset)
        return Net(name, m, m.encode, m.decode, m.latent_shape(image_size))
    if image_size % factor:
        raise ValueError(f"image_size={image_size} is not divisible by the latent downsampling factor {factor}")
    net = create_tcae(preset, image_size=image_size, latent_size=image_size // factor, **TCAE_VARIANTS[variant])
    return Net(name, net, net.encode, net.decode, net.latent_shape(image_size))


def compiled_twin(net: Net) -> Net:
    """The same weights behind torch.compile'd encoder and decoder, so eager and compiled interleave.

    (Training code compiles in place with `net.encoder.compile()`, which keeps state_dict keys; a wrapper
    from torch.compile(module) would prefix them with `_orig_mod.`. Here nothing is saved, so wrappers that
    share the parameters are the cheaper choice.)
    """
    # Each (instance, train/eval, autocast dtype) is one more compiled variant of the same code: dynamo's
    # default of 8 would silently fall back to eager in a run with several TC-AEs and precisions.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    m = net.module
    return Net(net.name, m, torch.compile(m.encoder), torch.compile(m.decoder), net.latent_shape)


def autoencoder_cost(name: str, image_size: int, factor: int) -> dict:
    """Parameters and GMACs of encode and decode for one image, counted on the meta device (no compute)."""
    with torch.device("meta"):
        net = build_autoencoder(name, image_size, factor)
        x, z = torch.empty(1, 3, image_size, image_size), torch.empty(1, *net.latent_shape)
    net.module.eval()
    enc, dec = count_gmacs(net.module.encoder, x), count_gmacs(net.module.decoder, z)
    return {"params_m": count_params(net.module) / 1e6, "latent_shape": list(net.latent_shape),
            "gmacs": {"encode": enc, "decode": dec, "total": enc + dec}}


def build_latent_shape(name: str, image_size: int, factor: int) -> list[int]:
    with torch.device("meta"):
        return list(build_autoencoder(name, image_size, factor).latent_shape)


def build_dit(name: str, latent_shape) -> nn.Module:
    c, h, _ = latent_shape
    return create_dit(name, input_size=h, in_channels=c, num_classes=1000)


def dit_cost(name: str, latent_shape) -> dict:
    with torch.device("meta"):
        dit = build_dit(name, latent_shape).eval()
        x, t, y = torch.empty(1, *latent_shape), torch.rand(1), torch.zeros(1, dtype=torch.long)
    return {"params_m": count_params(dit) / 1e6, "gmacs": count_gmacs(dit, x, t, y)}


#################################################################################
#                                 Step functions                                #
#################################################################################

def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype={"bf16": torch.bfloat16}[precision])


def ae_calls(net: Net, batch: int, image_size: int, device: torch.device, precision: str,
             optimizer: torch.optim.Optimizer) -> dict[str, Callable[[], None]]:
    """encode / decode (eval, no grad) and one training step: forward, L1, backward, AdamW.

    The GAN and LPIPS terms of the real step cost the same for every autoencoder, so L1 alone keeps the
    comparison about the autoencoders. Train/eval mode is set per group by the caller, not per call.
    """
    gen = torch.Generator(device="cpu").manual_seed(0)
    fmt = torch.channels_last if net.channels_last else torch.contiguous_format
    x = (torch.rand(batch, 3, image_size, image_size, generator=gen) * 2 - 1).to(device, memory_format=fmt)
    z = torch.randn(batch, *net.latent_shape, generator=gen).to(device, memory_format=fmt)

    @torch.no_grad()
    def encode():
        with autocast(device, precision):
            net.encode(x)

    @torch.no_grad()
    def decode():
        with autocast(device, precision):
            net.decode(z)

    def train():
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, precision):
            x_rec = net.decode(net.encode(x))
        F.l1_loss(x_rec.float(), x).backward()  # losses in fp32, as in the training modules
        optimizer.step()

    return {"encode": encode, "decode": decode, "train": train}


def adamw(params, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW(fused=True): one kernel over all parameters. On 2 CPU cores the default per-tensor AdamW
    takes ~8 s a step for 190M parameters (about as long as the backward pass), the fused one ~0.3 s."""
    params = list(params)
    try:
        return torch.optim.AdamW(params, lr=1e-4, weight_decay=weight_decay, fused=True)
    except (RuntimeError, ValueError):  # a device without the fused kernel
        return torch.optim.AdamW(params, lr=1e-4, weight_decay=weight_decay)


def dit_train_call(dit: nn.Module, forward: Callable, latent_shape, batch: int, device: torch.device,
                   precision: str, optimizer: torch.optim.Optimizer) -> Callable[[], None]:
    """One DiT training step: forward on noisy latents, MSE to the target, backward, AdamW."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, *latent_shape, generator=gen).to(device)
    target = torch.randn(batch, *latent_shape, generator=gen).to(device)
    t = torch.rand(batch, generator=gen).to(device)
    y = torch.randint(0, 1000, (batch,), generator=gen).to(device)

    def train():
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, precision):
            pred = forward(x, t, y)
        F.mse_loss(pred.float(), target).backward()
        optimizer.step()

    return train


#################################################################################
#                             Timing and memory                                 #
#################################################################################

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class MemoryProbe:
    """Peak memory a call adds on top of what was held before it (bytes; None where unmeasurable).

    CUDA: the allocator's own peak. CPU: resident set size sampled every 2 ms (needs psutil); memory the
    C allocator kept from earlier calls is reused without growing the RSS, so on CPU it is a lower bound.
    """

    def __init__(self, device: torch.device):
        self.device, self.peak_bytes = device, None

    def __enter__(self):
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._before = torch.cuda.memory_allocated(self.device)
            return self
        try:
            import psutil
        except ImportError:
            self._thread = None
            return self
        proc, self._stop, self._max = psutil.Process(), threading.Event(), [0]
        self._before = proc.memory_info().rss

        def sample():
            while not self._stop.is_set():
                self._max[0] = max(self._max[0], proc.memory_info().rss)
                self._stop.wait(0.002)
        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            sync(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._before
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(0, self._max[0] - self._before)
        return False


def max_rss_mb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


@dataclass
class Case:
    """One timed thing: fn() processes `items` images (or latents); resident() is the memory of its own
    (weights, optimizer state) already held when the call starts."""
    key: str
    fn: Callable[[], None]
    items: int
    resident: Callable[[], int] = lambda: 0
    result: dict = field(default_factory=dict)


def describe_error(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]


def time_interleaved(cases: list[Case], repeats: int, device: torch.device, min_round_s: float = 0.0) -> None:
    """Warm up each case (measuring its memory), then time `repeats` rounds A B C A B C ...; fills .result.

    On a GPU, a second warm-up call sizes how many calls one round makes (about min_round_s), so that
    launch jitter stays small against the round; on a CPU one call is already long.
    """
    live = []
    for c in cases:
        try:
            resident = c.resident()
            with MemoryProbe(device) as mem:
                c.fn()
            iters = 1
            if min_round_s > 0:
                t0 = time.perf_counter()
                c.fn()
                sync(device)
                iters = max(1, min(50, math.ceil(min_round_s / max(time.perf_counter() - t0, 1e-6))))
            peak = None if mem.peak_bytes is None else (mem.peak_bytes + resident) / 2**20
            c.result = {"iters_per_round": iters, "peak_mem_mb": peak, "times_s": []}
            live.append(c)
        except Exception as e:  # an OOM or a compile failure ends this case, not the run
            c.result = {"error": describe_error(e)}
            if device.type == "cuda":
                torch.cuda.empty_cache()
    for _ in range(repeats):
        for c in list(live):
            try:
                n = c.result["iters_per_round"]
                sync(device)
                t0 = time.perf_counter()
                for _ in range(n):
                    c.fn()
                sync(device)
                c.result["times_s"].append((time.perf_counter() - t0) / n)
            except Exception as e:
                c.result = {"error": describe_error(e)}
                live.remove(c)
    for c in live:
        c.result["median_s"] = statistics.median(c.result["times_s"])
        c.result["items_per_s"] = c.items / c.result["median_s"]


def state_bytes(module: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Bytes of the parameters and of whatever optimizer state exists yet (AdamW creates it on its first
    step, inside the probed call); gradients are freed between steps, so a step's peak counts them."""
    n = sum(p.numel() * p.element_size() for p in module.parameters())
    if optimizer is not None:
        n += sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                 if torch.is_tensor(t))
    return n


#################################################################################
#                                 Input pipelines                               #
#################################################################################

def _time_passes(make_iter, batches: int, repeats: int) -> dict:
    """Items per second over `batches` batches; the first pass (worker start-up, caches) is not timed."""
    times, count = [], 0
    for r in range(repeats + 1):
        t0, n = time.perf_counter(), 0
        for i, b in enumerate(make_iter()):
            n += b
            if i + 1 >= batches:
                break
        if r:
            times.append(time.perf_counter() - t0)
            count = n
    med = statistics.median(times)
    return {"items_per_s": count / med, "times_s": times, "items_per_pass": count}


def image_loader_throughput(image_size: int, batch: int, repeats: int, num_workers: int) -> dict:
    """The demo datamodule's train loader: uint8 crop -> PIL -> centre crop -> tensor in [-1, 1] -> batch."""
    from tcae_ldm.data.demo import DemoPhotosDataModule

    batches = max(8, 4 * num_workers)  # a pass long enough that every worker delivers several batches
    dm = DemoPhotosDataModule(image_size=image_size, global_batch_size=batch, num_workers=num_workers,
                              train_per_class=max(2, math.ceil(batch * batches / 8)), val_per_class=1)
    dm.setup("fit")
    loader = dm.train_dataloader()
    out = _time_passes(lambda: (len(b["image"]) for b in loader), batches, repeats)
    return {"source": "DemoPhotosDataModule.train_dataloader", "num_workers": num_workers, **out}


def latent_loader_throughput(latent_shape, batch: int, repeats: int, num_workers: int, tmpdir: str) -> dict:
    """LatentDataModule on a throw-away cache of random latents (cache layout of tcae_ldm.data.latents);
    an in-memory TensorDataset where that module is missing or its layout changed."""
    batches = max(16, 4 * num_workers)
    n = batch * batches
    z, z_flip = torch.randn(n, *latent_shape), torch.randn(n, *latent_shape)
    labels, idx = torch.randint(0, 1000, (n,)), torch.arange(n)
    try:
        from safetensors.torch import save_file

        from tcae_ldm.data.latents import LatentDataModule

        save_file({"latents": z, "latents_flip": z_flip, "labels": labels, "indices": idx},
                  os.path.join(tmpdir, "shard-r0-00000.safetensors"))
        save_file({"mean": torch.zeros(latent_shape[0]), "std": torch.ones(latent_shape[0])},
                  os.path.join(tmpdir, "stats.safetensors"))
        with open(os.path.join(tmpdir, "metadata.json"), "w") as f:
            json.dump({"format": 1, "autoencoder": {"kind": "bench", "name": "random"}, "image_size": 0,
                       "latent_shape": list(latent_shape), "num_classes": 1000, "count": n, "dtype": "fp32",
                       "shards": ["shard-r0-00000.safetensors"]}, f)
        dm = LatentDataModule(tmpdir, global_batch_size=batch, num_workers=num_workers)
        dm.setup("fit")
        loader = dm.train_dataloader()
        # on_before_batch_transfer is where Lightning hands the module its batch: count that work too
        out = _time_passes(lambda: (len(dm.on_before_batch_transfer(b, 0)["latent"]) for b in loader),
                           batches, repeats)
        source = "LatentDataModule.train_dataloader (in-memory cache of random latents)"
    except Exception as e:  # noqa: BLE001 - fall back, but say why
        from torch.utils.data import DataLoader, TensorDataset

        loader = DataLoader(TensorDataset(z, labels), batch_size=batch, shuffle=True, num_workers=num_workers)
        out = _time_passes(lambda: (len(b[0]) for b in loader), batches, repeats)
        source = f"TensorDataset in memory (LatentDataModule failed: {describe_error(e)})"
    return {"source": source, "num_workers": num_workers, **out}
