"""SD-VAE: the KL autoencoder of Stable Diffusion (diffusers' `AutoencoderKL`) that the published DiT checkpoints
were trained on, 256x256 -> 4x32x32 (f8c4). Here only to decode those checkpoints' samples, so that the DDPM
sampling and FID path can be checked against the DiT paper's numbers.

    stabilityai/sd-vae-ft-ema   DiT's sample_ddp.py default (FID-50K 2.27 at cfg 1.5, 250 DDPM steps)
    stabilityai/sd-vae-ft-mse   DiT's sample.py default

DiT multiplies SD-VAE latents by 0.18215 before diffusion and divides by it before decoding (SD_VAE_SCALE).
"""
from __future__ import annotations

from tcae_ldm.models.dcae import hf_offline

SD_VAE_SCALE = 0.18215  # DiT's train.py / sample.py constant (also diffusers' scaling_factor of these models)
SD_VAE_DEFAULT = "stabilityai/sd-vae-ft-ema"


def sdvae_latent_shape(model, image_size: int) -> tuple[int, int, int]:
    """(c, h, w) of an AutoencoderKL latent of a square image: one halving per down block but the last."""
    f = 2 ** (len(model.config.block_out_channels) - 1)
    if image_size % f:
        raise ValueError(f"image_size={image_size} is not divisible by the VAE's downsampling factor {f}")
    return model.config.latent_channels, image_size // f, image_size // f


def load_pretrained_sdvae(name_or_path: str):
    """diffusers' AutoencoderKL from a local folder, or a Hub id (only from the local cache when offline); one
    FileNotFoundError that says how to provide it when neither is there."""
    from diffusers import AutoencoderKL

    offline = hf_offline()
    try:
        return AutoencoderKL.from_pretrained(name_or_path, local_files_only=offline, low_cpu_mem_usage=False)
    except (OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FileNotFoundError(
            f"SD-VAE {name_or_path!r} could not be loaded{' offline (HF_HUB_OFFLINE=1)' if offline else ''} "
            f"({reason}). Provide it with `hf download {name_or_path}` where the Hub is reachable (then copy "
            f"the Hugging Face cache, $HF_HOME, here), or pass a local folder holding its config.json and "
            f"diffusion_pytorch_model.safetensors") from None
