"""Every trainable autoencoder by preset name: TC-AE presets ('TC-AE-B/p8-c128') and DC-AE presets ('DC-AE/f32c32').

Both families share one interface, which is all AutoencoderModule and the frozen-autoencoder loaders rely on: the
tensor modules `encoder(x) -> z` and `decoder(z) -> x` (what training, torch.compile and the FLOP counter call),
diffusers' `encode(x).latent`, `decode(z).sample` and `forward(x).sample`, `latent_shape` and `last_layer`.
"""
from __future__ import annotations

import torch.nn as nn

from tcae_ldm.models.dcae import DCAE_PRESETS, create_dcae
from tcae_ldm.models.tcae import TCAE_PRESETS, AutoencoderTC, create_tcae
from tcae_ldm.utils.kwargs import parameter_types


def autoencoder_family(name: str) -> str:
    """'tcae' or 'dcae' for a preset name; a KeyError that lists the families for anything else."""
    if name in TCAE_PRESETS:
        return "tcae"
    if name in DCAE_PRESETS:
        return "dcae"
    raise KeyError(f"unknown autoencoder preset {name!r}: TC-AE presets look like 'TC-AE-B/p8-c128' (sizes T/S/B, "
                   f"patch 4/8/16/32, channels 16-256); DC-AE presets are {sorted(DCAE_PRESETS)}")


def constructor_types(family: str) -> dict:
    """The keyword arguments a family's presets take as overrides, with the types of their values."""
    if family == "tcae":
        return parameter_types(AutoencoderTC)
    from diffusers import AutoencoderDC

    return {**parameter_types(AutoencoderDC), "pretrained": str}


def constructor_args(family: str) -> set[str]:
    """The keyword arguments a family's presets take as overrides."""
    return set(constructor_types(family))


def create_autoencoder(name: str, **args) -> nn.Module:
    """Build a preset; args override its constructor arguments (AutoencoderTC kwargs, or AutoencoderDC kwargs plus
    `pretrained` for DC-AE)."""
    family = autoencoder_family(name)
    unknown = sorted(set(args) - constructor_args(family))
    if unknown:
        raise ValueError(f"{name} does not take {unknown} (net_args of a {'TC-AE' if family == 'tcae' else 'DC-AE'}"
                         f" are: {', '.join(sorted(constructor_args(family)))})")
    return create_tcae(name, **args) if family == "tcae" else create_dcae(name, **args)
