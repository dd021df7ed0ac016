"""What `tcae-ldm bench` times: the networks under test and their step functions, their costs counted on the meta
device, and the two input pipelines."""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._inductor import config as inductor_config

from tcae_ldm.commands.bench.timing import time_passes
from tcae_ldm.data.demo import DemoPhotosDataModule
from tcae_ldm.latents.cache import write_cache
from tcae_ldm.latents.stream import LatentDataModule
from tcae_ldm.metrics.flops import count_gmacs, count_params
from tcae_ldm.models.dcae import DCAE_PRESETS, create_dcae
from tcae_ldm.models.dit import create_dit
from tcae_ldm.models.tcae import create_tcae

MODES = ("encode", "decode", "train")
ROUNDTRIP = "encode+decode"  # derived from the encode and decode timings: one image through both
INPUT_TARGET = 3.0  # a loader should deliver >= 3x what the training step it feeds consumes

#################################################################################
#                               Networks under test                             #
#################################################################################

def is_dcae(name: str) -> bool:
    """A DC-AE preset, with or without a variant suffix."""
    return name.partition(":")[0] in DCAE_PRESETS


def dcae_factor(name: str) -> int:
    """A DC-AE preset's spatial compression ratio (diffusers' own attribute, read off a meta-device build)."""
    with torch.device("meta"):
        return create_dcae(name.partition(":")[0]).spatial_compression_ratio


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
        return Net(name, m, m.encoder, m.decoder, m.latent_shape(image_size))
    if image_size % factor:
        raise ValueError(f"image_size={image_size} is not divisible by the latent downsampling factor {factor}")
    net = create_tcae(preset, image_size=image_size, latent_size=image_size // factor, **TCAE_VARIANTS[variant])
    return Net(name, net, net.encoder, net.decoder, net.latent_shape(image_size))


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
    return Net(net.name, m, _frozen_when_no_grad(torch.compile(m.encoder)),
               _frozen_when_no_grad(torch.compile(m.decoder)), net.latent_shape, net.channels_last)


def _frozen_when_no_grad(fn: Callable) -> Callable:
    """Inference calls (no grad) trace with frozen weights, as an inference deployment compiles: constants, prepacked
    for the CPU's GEMM / convolution kernels (inductor freezes only what dynamo traces under its global flag). The
    timings do not depend on the weights' values, so training steps between the inference groups do not matter."""
    def call(x):
        if torch.is_grad_enabled():
            return fn(x)
        with inductor_config.patch(freezing=True):
            return fn(x)
    return call


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
    """AdamW(fused=True): one kernel over all parameters; the default per-tensor AdamW can take as long as the
    backward pass of a 190M-parameter network on a CPU."""
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
#                                 Input pipelines                               #
#################################################################################

def image_loader_throughput(image_size: int, batch: int, repeats: int, num_workers: int) -> dict:
    """The demo datamodule's train loader: uint8 crop -> PIL -> centre crop -> tensor in [-1, 1] -> batch."""
    batches = max(8, 4 * num_workers)  # a pass long enough that every worker delivers several batches
    dm = DemoPhotosDataModule(image_size=image_size, global_batch_size=batch, num_workers=num_workers,
                              train_per_class=max(2, math.ceil(batch * batches / 8)), val_per_class=1)
    dm.setup("fit")
    loader = dm.train_dataloader()
    out = time_passes(lambda: (len(b["image"]) for b in loader), batches, repeats)
    return {"source": "DemoPhotosDataModule.train_dataloader", "num_workers": num_workers, **out}


def latent_loader_throughput(latent_shape, batch: int, repeats: int, num_workers: int, tmpdir: str) -> dict:
    """LatentDataModule on a throw-away cache of random latents, written in the cache's own format."""
    batches = max(16, 4 * num_workers)
    n = batch * batches
    write_cache(tmpdir, torch.randn(n, *latent_shape), torch.randn(n, *latent_shape), torch.randint(0, 1000, (n,)),
                {"autoencoder": {"kind": "bench", "name": "random"}, "image_size": 0,
                 "latent_shape": list(latent_shape), "num_classes": 1000})
    dm = LatentDataModule(tmpdir, global_batch_size=batch, num_workers=num_workers)
    dm.setup("fit")
    loader = dm.train_dataloader()
    # on_before_batch_transfer is where Lightning hands the module its batch: count that work too
    out = time_passes(lambda: (len(dm.on_before_batch_transfer(b, 0)["latent"]) for b in loader), batches, repeats)
    return {"source": "LatentDataModule.train_dataloader (in-memory cache of random latents)",
            "num_workers": num_workers, **out}
