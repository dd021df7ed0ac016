"""Every trainable autoencoder by preset name: TC-AE presets ('TC-AE-B/p8-c128') and DC-AE presets ('DC-AE/f32c32').

Both families share one interface (encode, decode, forward -> (x_rec, z), latent_shape, last_layer), which is all
AutoencoderModule and the frozen-autoencoder loaders rely on.
"""
from __future__ import annotations

import torch.nn as nn

from tcae_ldm.models.dcae import DCAE_PRESETS, create_dcae
from tcae_ldm.models.tcae import TCAE_PRESETS, create_tcae


def autoencoder_family(name: str) -> str:
    """'tcae' or 'dcae' for a preset name; a KeyError that lists the families for anything else."""
    if name in TCAE_PRESETS:
        return "tcae"
    if name in DCAE_PRESETS:
        return "dcae"
    raise KeyError(f"unknown autoencoder preset {name!r}: TC-AE presets look like 'TC-AE-B/p8-c128' (sizes T/S/B, "
                   f"patch 4/8/16/32, channels 16-256); DC-AE presets are {sorted(DCAE_PRESETS)}")


def create_autoencoder(name: str, **args) -> nn.Module:
    """Build a preset; args override its constructor arguments (TCAE kwargs, or AutoencoderDC kwargs plus
    `pretrained` for DC-AE)."""
    return create_tcae(name, **args) if autoencoder_family(name) == "tcae" else create_dcae(name, **args)
