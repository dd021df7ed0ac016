"""DC-AE (Chen et al. 2024, "Deep Compression Autoencoder") behind TC-AE's training interface.

The network is diffusers' `AutoencoderDC`, unchanged. `DCAE` holds its encoder and decoder under the same
attribute names, so its state_dict is AutoencoderDC's: a DC-AE trained by AutoencoderModule loads into
`AutoencoderDC(**config)` as it is, and a published diffusers DC-AE initialises a DCAE as it is.

    DC-AE/f32c32        mit-han-lab/dc-ae-f32c32-in-1.0-diffusers: 256x256 -> 32x8x8, 323.4M params,
                        606.9 GMACs encode + decode (the paper's baseline at TC-AE's latent shape)
    DC-AE-M/f16c32      the GPU demo's baseline: f32c32 without its first (highest-resolution) stage, at half width,
                        64x64 -> 32x4x4, 37.95 GMACs (the GPU demo's TC-AE-B/p8-c32: 8.54, 0.23x; the paper's: 0.27x)
    DC-AE-S/f16c32      the same design (residual conv stages at high resolution, EfficientViT stages at low
                        resolution, decoder deeper than encoder) at 1/4 width, 64x64 -> 32x4x4, 0.907 GMACs
    DC-AE-XS/f16c32     the CPU demo's baseline: DC-AE-S at half width (16 to 128 channels), 64x64 -> 32x4x4,
                        0.236 GMACs (the CPU demo's TC-AE-S/p8-c32: 0.078, 0.33x)
    DC-AE-T/f16c16      tests: 32x32 -> 16x2x2
"""
from __future__ import annotations

import os

import torch.nn as nn

_TYPES = ["ResBlock"] * 3 + ["EfficientViTBlock"] * 3
_DECODER_NORMS = ["batch_norm"] * 3 + ["rms_norm"] * 3
_DECODER_ACTS = ["relu"] * 3 + ["silu"] * 3

# mit-han-lab/dc-ae-f32c32-in-1.0-diffusers, as diffusers' scripts/convert_dcae_to_diffusers.py writes it: no
# multi-scale attention branch (that is the SANA variant's, whose conv/interpolate resamplers and single norm /
# activation also differ), pixel-(un)shuffle resamplers (the signature's defaults).
DCAE_PRESETS = {
    "DC-AE/f32c32": dict(
        in_channels=3, latent_channels=32, attention_head_dim=32,
        encoder_block_types=_TYPES, decoder_block_types=_TYPES,
        encoder_block_out_channels=[128, 256, 512, 512, 1024, 1024],
        decoder_block_out_channels=[128, 256, 512, 512, 1024, 1024],
        encoder_layers_per_block=[0, 4, 8, 2, 2, 2], decoder_layers_per_block=[0, 5, 10, 2, 2, 2],
        encoder_qkv_multiscales=[[]] * 6, decoder_qkv_multiscales=[[]] * 6,
        downsample_block_type="pixel_unshuffle", upsample_block_type="pixel_shuffle",
        decoder_norm_types=_DECODER_NORMS, decoder_act_fns=_DECODER_ACTS, scaling_factor=0.3189),
    # f16: the first (highest-resolution) f32c32 stage is dropped, at half its widths; depths as f32c32's.
    "DC-AE-M/f16c32": dict(
        in_channels=3, latent_channels=32, attention_head_dim=32,
        encoder_block_types=_TYPES[1:], decoder_block_types=_TYPES[1:],
        encoder_block_out_channels=[128, 256, 256, 512, 512], decoder_block_out_channels=[128, 256, 256, 512, 512],
        encoder_layers_per_block=[4, 8, 2, 2, 2], decoder_layers_per_block=[5, 10, 2, 2, 2],
        encoder_qkv_multiscales=[[]] * 5, decoder_qkv_multiscales=[[]] * 5,
        decoder_norm_types=_DECODER_NORMS[1:], decoder_act_fns=_DECODER_ACTS[1:]),
    # f16 at a quarter of f32c32's widths, depths ~ / 4.
    "DC-AE-S/f16c32": dict(
        in_channels=3, latent_channels=32, attention_head_dim=32,
        encoder_block_types=_TYPES[1:], decoder_block_types=_TYPES[1:],
        encoder_block_out_channels=[32, 64, 128, 128, 256], decoder_block_out_channels=[32, 64, 128, 128, 256],
        encoder_layers_per_block=[0, 2, 2, 1, 1], decoder_layers_per_block=[0, 2, 3, 1, 1],
        encoder_qkv_multiscales=[[]] * 5, decoder_qkv_multiscales=[[]] * 5,
        decoder_norm_types=_DECODER_NORMS[1:], decoder_act_fns=_DECODER_ACTS[1:]),
    # Half of DC-AE-S's widths (attention heads of 32 channels: 2 and 4 heads in the EfficientViT stages).
    "DC-AE-XS/f16c32": dict(
        in_channels=3, latent_channels=32, attention_head_dim=32,
        encoder_block_types=_TYPES[1:], decoder_block_types=_TYPES[1:],
        encoder_block_out_channels=[16, 32, 64, 64, 128], decoder_block_out_channels=[16, 32, 64, 64, 128],
        encoder_layers_per_block=[0, 2, 2, 1, 1], decoder_layers_per_block=[0, 2, 3, 1, 1],
        encoder_qkv_multiscales=[[]] * 5, decoder_qkv_multiscales=[[]] * 5,
        decoder_norm_types=_DECODER_NORMS[1:], decoder_act_fns=_DECODER_ACTS[1:]),
    "DC-AE-T/f16c16": dict(
        in_channels=3, latent_channels=16, attention_head_dim=8,
        encoder_block_types=_TYPES[1:], decoder_block_types=_TYPES[1:],
        encoder_block_out_channels=[8, 16, 32, 32, 64], decoder_block_out_channels=[8, 16, 32, 32, 64],
        encoder_layers_per_block=[0, 1, 1, 1, 1], decoder_layers_per_block=[0, 1, 1, 1, 1],
        encoder_qkv_multiscales=[[]] * 5, decoder_qkv_multiscales=[[]] * 5,
        decoder_norm_types=_DECODER_NORMS[1:], decoder_act_fns=_DECODER_ACTS[1:]),
}


def public_config(model) -> dict:
    """An AutoencoderDC's constructor arguments (its config without diffusers' private `_` entries)."""
    return {k: v for k, v in dict(model.config).items() if not k.startswith("_")}


def dcae_latent_shape(latent_channels: int, spatial_compression_ratio: int, image_size: int) -> tuple[int, int, int]:
    """(c, h, w) of a DC-AE latent of a square image, or a ValueError naming the factor that does not divide it."""
    f = spatial_compression_ratio
    if image_size % f:
        raise ValueError(f"image_size={image_size} is not divisible by DC-AE's downsampling factor {f}")
    return latent_channels, image_size // f, image_size // f


def hf_offline() -> bool:
    """Whether the Hugging Face Hub must not be contacted (HF_HUB_OFFLINE)."""
    from huggingface_hub import constants
    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def load_pretrained_dcae(name_or_path: str):
    """diffusers' AutoencoderDC from a local folder, or from a Hub id (only from the local cache when offline);
    one FileNotFoundError that says how to provide it when neither is there."""
    from diffusers import AutoencoderDC

    offline = hf_offline()
    try:
        return AutoencoderDC.from_pretrained(name_or_path, local_files_only=offline, low_cpu_mem_usage=False)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(
            f"DC-AE model {name_or_path!r} could not be loaded{' offline (HF_HUB_OFFLINE=1)' if offline else ''}: "
            f"{e}. Provide it by running `hf download {name_or_path}` where the Hub is reachable "
            f"(then copy the Hugging Face cache, $HF_HOME, here), or pass a local folder holding config.json "
            f"and diffusion_pytorch_model.safetensors as the autoencoder path") from None


class DCAE(nn.Module):
    """AutoencoderDC's encoder and decoder with AutoencoderDC's encode / decode / forward (without tiling or slicing),
    plus what training needs: latent_shape and last_layer (for the adaptive GAN weight). Latents are raw
    (scaling_factor is not applied: the latent cache normalises every autoencoder's latents the same way)."""

    def __init__(self, **config):
        super().__init__()
        from diffusers import AutoencoderDC

        model = AutoencoderDC(**config)
        self.config = public_config(model)
        self.encoder, self.decoder = model.encoder, model.decoder  # AutoencoderDC's own modules and keys
        self.spatial_compression_ratio = model.spatial_compression_ratio  # diffusers': 2 ** (stages - 1)

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        """(c, h, w) of the latent of a square image of this size."""
        return dcae_latent_shape(self.config["latent_channels"], self.spatial_compression_ratio, image_size)

    def encode(self, x, return_dict: bool = True):  # (B, 3, H, W) -> EncoderOutput(latent=(B, c, H/f, W/f))
        from diffusers.models.autoencoders.vae import EncoderOutput

        z = self.encoder(x)
        return EncoderOutput(latent=z) if return_dict else (z,)

    def decode(self, z, return_dict: bool = True):  # (B, c, h, w) -> DecoderOutput(sample=(B, 3, h*f, w*f))
        from diffusers.models.autoencoders.vae import DecoderOutput

        x = self.decoder(z)
        return DecoderOutput(sample=x) if return_dict else (x,)

    def forward(self, sample, return_dict: bool = True):  # the reconstruction, as AutoencoderDC's forward
        return self.decode(self.encoder(sample), return_dict=return_dict)

    @property
    def last_layer(self) -> nn.Parameter:
        """Weight whose gradient norms set the adaptive GAN weight: the decoder's output convolution."""
        out = self.decoder.conv_out
        return out.weight if isinstance(out, nn.Conv2d) else out.conv.weight

    def to_diffusers(self):
        """An AutoencoderDC holding these weights (for `save_pretrained` or any diffusers pipeline)."""
        from diffusers import AutoencoderDC

        model = AutoencoderDC(**self.config)
        model.load_state_dict(self.state_dict())
        return model


def dcae_config(name: str, overrides: dict | None = None) -> dict:
    """AutoencoderDC kwargs of a preset + overrides."""
    if name not in DCAE_PRESETS:
        raise KeyError(f"unknown DC-AE preset {name!r}; choose one of {sorted(DCAE_PRESETS)}")
    return {**DCAE_PRESETS[name], **(overrides or {})}


def create_dcae(name: str, pretrained: str | None = None, **overrides) -> DCAE:
    """A DC-AE preset, randomly initialised, or with the weights of a diffusers AutoencoderDC (`pretrained`:
    a local folder, or a Hub id already in the local Hugging Face cache); its config must match the preset's."""
    net = DCAE(**dcae_config(name, overrides))
    if pretrained is not None:
        load_pretrained_weights(net, pretrained, name)
    return net


def load_pretrained_weights(net: DCAE, pretrained: str, name: str = "") -> None:
    """Copy the weights of a diffusers AutoencoderDC (folder or Hub id in the local cache) into net, whose config
    must match theirs."""
    source = load_pretrained_dcae(pretrained)
    theirs = public_config(source)
    diff = sorted(k for k in net.config if _norm(net.config[k]) != _norm(theirs.get(k)))
    if diff:
        raise ValueError(f"pretrained DC-AE {pretrained!r} does not match preset {name!r} in {diff}: "
                         f"{ {k: theirs.get(k) for k in diff} } vs { {k: net.config[k] for k in diff} }")
    net.load_state_dict(source.state_dict())


def _norm(value):
    """Configs read from JSON hold lists where presets hold tuples."""
    if isinstance(value, (list, tuple)):
        return [_norm(v) for v in value]
    return value

