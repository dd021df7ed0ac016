"""tcae-ldm: TC-AE autoencoders and the latent DiTs trained on them.

`from tcae_ldm import AutoencoderTC` gives the TC-AE network, a diffusers model (tcae_ldm.models.tcae); it is
imported on first use, so that `import tcae_ldm.<module>` and the command line stay quick to start.
"""
__all__ = ["AutoencoderTC"]


def __getattr__(name: str):
    if name == "AutoencoderTC":
        from tcae_ldm.models.tcae import AutoencoderTC

        return AutoencoderTC
    raise AttributeError(f"module 'tcae_ldm' has no attribute {name!r}")
