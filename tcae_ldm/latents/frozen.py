"""Frozen autoencoders behind one interface: TC-AE (our checkpoints or saved folders), DC-AE (diffusers
folders and Hub ids, or a DC-AE trained by our AutoencoderModule), and SD-VAE (diffusers AutoencoderKL, to
decode the published DiT checkpoints' samples).

x in [-1, 1] (B, 3, H, W) <-> z (B, c, h, w). Every stage after autoencoder training (latent cache, DiT
sampling, benchmarks) goes through this interface, so TC-AE and DC-AE latents are handled identically.
Latents are raw: DC-AE's ``scaling_factor`` is not applied, per-channel normalisation comes from the
latent cache's statistics instead, the same way for both.
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
from typing import Literal, TypedDict

import torch
import torch.nn as nn
from safetensors.torch import load_file

from tcae_ldm.metrics.flops import count_gmacs
from tcae_ldm.models.dcae import (
    DCAE_PRESETS,
    dcae_config,
    dcae_latent_shape,
    load_pretrained_dcae,
    public_config,
)
from tcae_ldm.models.sdvae import load_pretrained_sdvae, sdvae_latent_shape
from tcae_ldm.models.tcae import TCAE_PRESETS, AutoencoderTC
from tcae_ldm.utils.checkpoints import read_checkpoint

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MATCH_KEYS = ("kind", "name", "config_hash", "weights_hash", "encoder_hash", "path")


class _AutoencoderSource(TypedDict):
    kind: Literal["tcae", "dcae", "sdvae"]
    path: str  # an AutoencoderModule checkpoint file, or a diffusers folder (tcae-ldm export) / dcae, sdvae: a hub id


# The optional key sits in a total=False subclass rather than under typing.NotRequired: that needs Python 3.11, and
# with postponed annotations (the `from __future__` import above) TypedDict cannot see it and requires the key.
class AutoencoderSpec(_AutoencoderSource, total=False):
    """How to load a frozen autoencoder; a config value (``autoencoder: {kind, path, dtype}``)."""
    dtype: Literal["fp32", "bf16"]  # optional; bf16 runs the network under autocast; latents are fp32


#################################################################################
#                        Identity: which autoencoder made a latent              #
#################################################################################

def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def weights_hash(module: nn.Module) -> str:
    """sha256 over the parameter and buffer bytes: two runs of one architecture never share latents."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _normpath(path: str) -> str:
    return os.path.realpath(path) if os.path.exists(path) else path


def identity_mismatch(expected: dict, actual: dict) -> list[str]:
    """Keys of ``expected`` (kind, name, config_hash, weights_hash, encoder_hash, path) whose value differs."""
    bad = []
    for key in MATCH_KEYS:
        if expected.get(key) is None:
            continue
        want, got = expected[key], actual.get(key)
        if key == "path":
            want, got = _normpath(str(want)), _normpath(str(got))
        if want != got:
            bad.append(key)
    return bad


def describe_identity(identity: dict) -> str:
    """One line: kind, name, short hashes and source path."""
    short = {k: str(identity.get(k, "?"))[:12] for k in ("config_hash", "weights_hash")}
    return (f"{identity.get('kind')} {identity.get('name')!r} (config {short['config_hash']}, weights "
            f"{short['weights_hash']}, from {identity.get('path')})")


def read_module_checkpoint(path: str, family: str) -> tuple[dict, dict]:
    """(hyper_parameters, autoencoder weights) of an AutoencoderModule checkpoint; the EMA weights when present."""
    ckpt = read_checkpoint(path, what="autoencoder checkpoint")
    hp = ckpt.get("hyper_parameters") or {}
    if "net" not in hp or "state_dict" not in ckpt:
        raise ValueError(f"{path} is not an AutoencoderModule checkpoint (no hyper_parameters.net / state_dict)")
    presets = TCAE_PRESETS if family == "tcae" else DCAE_PRESETS
    if hp["net"] not in presets:
        other = "dcae" if family == "tcae" else "tcae"
        raise ValueError(f"{path} holds a {hp['net']} autoencoder, not a {family} one: load it with kind '{other}'")
    return hp, autoencoder_weights(ckpt["state_dict"])[1]


def autoencoder_weights(state_dict: dict) -> tuple[str, dict]:
    """('ema' or 'net', the autoencoder's weights) of an AutoencoderModule state_dict: the EMA when it has one."""
    prefix = "ema.module." if any(k.startswith("ema.module.") for k in state_dict) else "net."
    return prefix.split(".")[0], {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


#################################################################################
#                                The interface                                  #
#################################################################################

class FrozenAutoencoder(nn.Module):
    """A pretrained autoencoder in eval mode without gradients: encode / decode / latent_shape / identity."""

    kind = ""

    def __init__(self, model: nn.Module, name: str, path: str, config: dict, dtype: str = "fp32"):
        super().__init__()
        if dtype not in DTYPES:
            raise ValueError(f"autoencoder dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.model = model.eval().requires_grad_(False)
        self.name, self.path, self.config, self.dtype_name = name, path, config, dtype
        self._hashes: dict | None = None
        self._freeze = False  # compiled by inductor: trace with frozen weights (compile_)

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: Lightning's model.train() must not switch norms or dropout

    def _autocast(self, device: torch.device):
        if self.dtype_name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=DTYPES[self.dtype_name])

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, c, h, w) fp32."""
        with self._autocast(x.device), self._graphs():
            return self._encode(x).float()

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, c, h, w) -> (B, 3, H, W), nominally in [-1, 1] (not clamped)."""
        with self._autocast(z.device), self._graphs():
            return self._decode(z).float()

    def _encode(self, x):
        raise NotImplementedError

    def _decode(self, z):
        raise NotImplementedError

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        """(c, h, w) of the latent of a square image of this size."""
        raise NotImplementedError

    def gmacs(self, image_size: int) -> float:
        """Encode + decode GMACs of one square image of this size (MACs, as the papers count them)."""
        return sum(self.gmacs_parts(image_size))

    def gmacs_parts(self, image_size: int) -> tuple[float, float]:
        """(encode, decode) inference GMACs of one square image of this size."""
        device = next(self.model.parameters()).device
        x = torch.zeros(1, 3, image_size, image_size, device=device)
        z = torch.zeros(1, *self.latent_shape(image_size), device=device)
        return count_gmacs(self.model.encoder, x), count_gmacs(self.model.decoder, z)

    def compile_(self, spec: bool | dict = True) -> "FrozenAutoencoder":
        """torch.compile the encoder and decoder in place (spec: True, or torch.compile kwargs; False leaves them
        eager). Inductor freezes the weights into its graphs (constants, prepacked for the CPU's GEMM and convolution
        kernels), which is right here: a frozen autoencoder's weights never change. Outputs agree with eager within
        float rounding (fused kernels reorder sums); identity and spec are unchanged."""
        if not spec:
            return self
        kwargs = dict(spec) if isinstance(spec, dict) else {}
        for module in (self.model.encoder, self.model.decoder):
            module.compile(**kwargs)
        self._freeze = kwargs.get("backend", "inductor") == "inductor"
        return self

    def _graphs(self):
        # Inductor freezes only what dynamo traces while its global `freezing` flag is on (a per-compile option
        # comes too late: the weights are already graph inputs), and tracing happens at the first call.
        if not self._freeze:
            return contextlib.nullcontext()
        import torch._inductor.config

        return torch._inductor.config.patch(freezing=True)

    def identity(self) -> dict:
        """What made a latent: kind, name, path, config (+ hash), hashes of all weights and of the encoder's.

        Equal encoder hashes mean the same latent space (e.g. before and after decoder finetuning)."""
        if self._hashes is None:
            self._hashes = {"weights_hash": weights_hash(self.model), "encoder_hash": weights_hash(self.model.encoder)}
        return {"kind": self.kind, "name": self.name, "path": self.path, "config": self.config,
                "config_hash": config_hash(self.config), **self._hashes}

    def spec(self) -> AutoencoderSpec:
        """Arguments of load_autoencoder that rebuild this autoencoder."""
        return {"kind": self.kind, "path": self.path, "dtype": self.dtype_name}


#################################################################################
#                                    TC-AE                                      #
#################################################################################

LATENT_STATS = ("latents_mean", "latents_std")  # config entries that describe latents without changing them
TCAE_SCALARS = ("scaling_factor", "shift_factor")  # AutoencoderTC's scalar version of them (diffusers' pipelines)
OLD_TCAE_WEIGHTS = "model.safetensors"  # the folder layout before AutoencoderTC (config.json: _class_name TCAE)


def tcae_config(net: str, net_args: dict | None = None) -> dict:
    """AutoencoderTC's architecture arguments of a preset + overrides: what identifies a TC-AE (its config_hash).

    Gradient checkpointing changes memory and the latent statistics describe the latents; neither changes one."""
    if net not in TCAE_PRESETS:
        raise KeyError(f"unknown TC-AE preset {net!r}")
    defaults = {k: p.default for k, p in inspect.signature(AutoencoderTC.__init__).parameters.items()
                if k != "self" and k not in LATENT_STATS + TCAE_SCALARS}
    return {**defaults, **TCAE_PRESETS[net], **(net_args or {}), "grad_checkpointing": False}


def architecture(config: dict) -> dict:
    """The architecture arguments of a TC-AE config (config.json or AutoencoderTC.config)."""
    return {k: v for k, v in config.items() if not k.startswith("_") and k not in LATENT_STATS}


def tcae_architecture(config: dict) -> dict:
    """architecture() of a TC-AE, without the scalars derived from its latent statistics."""
    return {k: v for k, v in architecture(config).items() if k not in TCAE_SCALARS}


def latent_stats(model: nn.Module) -> dict:
    """{latents_mean, latents_std} recorded in a diffusers model's config (None where not known yet)."""
    config = getattr(model, "config", {})
    return {k: config.get(k) for k in LATENT_STATS}


class DiffusersAutoencoder(FrozenAutoencoder):
    """An autoencoder with diffusers' interface (AutoencoderTC, AutoencoderDC): encode(x).latent, decode(z).sample,
    save_pretrained."""

    def _encode(self, x):
        return self.model.encode(x).latent

    def _decode(self, z):
        return self.model.decode(z).sample

    def save_pretrained(self, path: str) -> None:
        """config.json + diffusion_pytorch_model.safetensors, which the class's from_pretrained reads back."""
        self.model.save_pretrained(path)


class TCAEAutoencoder(DiffusersAutoencoder):
    """TC-AE (AutoencoderTC) from an AutoencoderModule checkpoint (EMA weights when present) or a diffusers folder."""

    kind = "tcae"

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        return self.model.latent_shape(image_size)

    @classmethod
    def _wrap(cls, model: AutoencoderTC, name: str, path: str, dtype: str) -> "TCAEAutoencoder":
        model.register_to_config(_preset=name)  # save_pretrained keeps the preset's name with the weights
        return cls(model, name, path, {**tcae_architecture(model.config), "grad_checkpointing": False}, dtype)

    @classmethod
    def _build(cls, config: dict, weights: dict, name: str, path: str, dtype: str) -> "TCAEAutoencoder":
        model = AutoencoderTC(**config)
        missing, unexpected = model.load_state_dict(weights, strict=False)
        if missing or unexpected:
            raise ValueError(f"TC-AE weights in {path} do not fit {name} {config}: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        return cls._wrap(model, name, path, dtype)

    @classmethod
    def from_checkpoint(cls, path: str, dtype: str = "fp32") -> "TCAEAutoencoder":
        hp, weights = read_module_checkpoint(path, "tcae")
        config = tcae_config(hp["net"], hp.get("net_args"))
        config["cls_token"] = "encoder.cls_token" in weights  # it takes part in the encoder's attention
        return cls._build(config, weights, hp["net"], _normpath(path), dtype)

    @classmethod
    def from_pretrained(cls, path: str, dtype: str = "fp32") -> "TCAEAutoencoder":
        """A diffusers folder (AutoencoderTC.save_pretrained, `tcae-ldm export`), or one in the layout of earlier
        versions (config.json with _class_name TCAE + model.safetensors)."""
        config_file = os.path.join(path, "config.json")
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"{path} has no config.json: expected a TC-AE folder written by `tcae-ldm export` "
                                    f"or AutoencoderTC.save_pretrained")
        with open(config_file) as f:
            config = json.load(f)
        found = config.get("_class_name")
        if found not in ("AutoencoderTC", "TCAE"):
            raise ValueError(f"{config_file} describes a {found}, not a TC-AE (AutoencoderTC): load it with the kind "
                             f"of that autoencoder ('dcae' for AutoencoderDC, 'sdvae' for AutoencoderKL)")
        name = config.get("_preset") or os.path.basename(os.path.normpath(path))
        if found == "TCAE" and os.path.isfile(os.path.join(path, OLD_TCAE_WEIGHTS)):
            return cls._build(tcae_architecture(config), load_file(os.path.join(path, OLD_TCAE_WEIGHTS)), name,
                              _normpath(path), dtype)
        try:
            model = AutoencoderTC.from_pretrained(path, low_cpu_mem_usage=False)
        except OSError as e:  # diffusers names the weight file it looked for
            raise FileNotFoundError(f"{path}: {str(e).splitlines()[0]}") from None
        return cls._wrap(model, name, _normpath(path), dtype)


#################################################################################
#                                    DC-AE                                      #
#################################################################################

class DCAEAutoencoder(DiffusersAutoencoder):
    """diffusers AutoencoderDC (e.g. mit-han-lab/dc-ae-f32c32-in-1.0-diffusers), raw latents."""

    kind = "dcae"

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        return dcae_latent_shape(self.model.config.latent_channels, self.model.spatial_compression_ratio, image_size)

    @classmethod
    def from_pretrained(cls, name_or_path: str, dtype: str = "fp32") -> "DCAEAutoencoder":
        model = load_pretrained_dcae(name_or_path)
        return cls(model, name_or_path, _normpath(name_or_path), architecture(model.config), dtype)

    @classmethod
    def from_checkpoint(cls, path: str, dtype: str = "fp32") -> "DCAEAutoencoder":
        """A DC-AE trained by AutoencoderModule (`net: DC-AE-...`)."""
        from diffusers import AutoencoderDC

        hp, weights = read_module_checkpoint(path, "dcae")
        # `pretrained` only initialised the training run; the checkpoint holds the trained weights
        overrides = {k: v for k, v in (hp.get("net_args") or {}).items() if k != "pretrained"}
        model = AutoencoderDC(**dcae_config(hp["net"], overrides))
        missing, unexpected = model.load_state_dict(weights, strict=False)
        if missing or unexpected:
            raise ValueError(f"DC-AE weights in {path} do not fit {hp['net']}: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        return cls(model, hp["net"], _normpath(path), architecture(model.config), dtype)

    @classmethod
    def from_config(cls, config: dict, dtype: str = "fp32", name: str = "AutoencoderDC(config)") -> "DCAEAutoencoder":
        """A randomly initialised AutoencoderDC from constructor kwargs (tests, benchmarks)."""
        from diffusers import AutoencoderDC

        model = AutoencoderDC(**config)
        return cls(model, name, "", architecture(model.config), dtype)


class SDVAEAutoencoder(FrozenAutoencoder):
    """diffusers AutoencoderKL (stabilityai/sd-vae-ft-ema / -mse), raw latents; encode returns the posterior mean."""

    kind = "sdvae"

    def _encode(self, x):
        return self.model.encode(x).latent_dist.mean  # deterministic, unlike DiT's train.py, which samples

    def _decode(self, z):
        return self.model.decode(z).sample

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        return sdvae_latent_shape(self.model, image_size)

    @classmethod
    def from_pretrained(cls, name_or_path: str, dtype: str = "fp32") -> "SDVAEAutoencoder":
        model = load_pretrained_sdvae(name_or_path)
        return cls(model, name_or_path, _normpath(name_or_path), public_config(model), dtype)


#################################################################################
#                                   Factory                                     #
#################################################################################

def load_autoencoder(kind: str, path: str, dtype: str = "fp32") -> FrozenAutoencoder:
    """kind 'tcae': checkpoint file or diffusers folder; 'dcae': checkpoint file, hub id or local folder;
    'sdvae': hub id or local folder."""
    if kind == "tcae":
        if os.path.isdir(path):
            return TCAEAutoencoder.from_pretrained(path, dtype)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"TC-AE checkpoint or folder {path!r} does not exist (train one with "
                                    f"`tcae-ldm fit --config configs/tcae.yaml`, or export one with `tcae-ldm export`)")
        return TCAEAutoencoder.from_checkpoint(path, dtype)
    if kind == "dcae":
        if os.path.isfile(path):
            return DCAEAutoencoder.from_checkpoint(path, dtype)
        return DCAEAutoencoder.from_pretrained(path, dtype)
    if kind == "sdvae":
        return SDVAEAutoencoder.from_pretrained(path, dtype)
    raise ValueError(f"autoencoder kind must be 'tcae', 'dcae' or 'sdvae', got {kind!r}")
