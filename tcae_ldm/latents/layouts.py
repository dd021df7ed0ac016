"""Latent folders written by other code bases, recognised so that pointing a run at one says what it is and what
to do, instead of "does not exist or is empty".

    LightningDiT (extract_features.py)   latents_rank00_shard000.safetensors ... {latents, latents_flip, labels}
                                         + latents_stats.pt {mean, std}
    fast-DiT (extract_features.py)       <name>_features/<i>.npy (1, 4, 32, 32) SD-VAE latents x 0.18215
                                         + <name>_labels/<i>.npy, one file per image

Neither records which autoencoder made the latents (nor any checksum), which every cache of this project does, so
neither is read as it is.
"""
from __future__ import annotations

import glob
import os

RECACHE = ("re-encode the images with `tcae-ldm predict --config configs/cache_latents_<autoencoder>.yaml` "
           "(--data.init_args.images.init_args.root: the image folder; the cache it writes is also read by "
           "LightningDiT unchanged)")


def _count(pattern: str) -> int:
    return len(glob.glob(pattern))


def _fast_dit_pairs(folder: str) -> list[tuple[str, str]]:
    """(features folder, labels folder) pairs of fast-DiT's layout at `folder` or as `folder` itself."""
    pairs = []
    for features in sorted(glob.glob(os.path.join(folder, "*_features"))):
        labels = features[: -len("_features")] + "_labels"
        if os.path.isdir(labels) and _count(os.path.join(features, "*.npy")):
            pairs.append((features, labels))
    name = os.path.normpath(folder)
    if name.endswith("_features") and os.path.isdir(name[: -len("_features")] + "_labels") \
            and _count(os.path.join(name, "*.npy")):
        pairs.append((name, name[: -len("_features")] + "_labels"))
    return pairs


def foreign_layout(folder: str) -> str | None:
    """One line saying which other code base's latent layout `folder` holds and how to use its images here, or
    None when it holds neither."""
    if not os.path.isdir(folder):
        return None
    lightning = _count(os.path.join(folder, "latents_rank*_shard*.safetensors"))
    if lightning:
        stats = " + latents_stats.pt" if os.path.isfile(os.path.join(folder, "latents_stats.pt")) else ""
        return (f"latent cache {folder} is in LightningDiT's own layout ({lightning} latents_rank*_shard*.safetensors"
                f"{stats}, no metadata.json): it does not record which autoencoder made the latents nor checksums "
                f"of its files, so it is not read as a cache of this project; {RECACHE}")
    pairs = _fast_dit_pairs(folder)
    if pairs:
        features, labels = pairs[0]
        return (f"latent cache {folder} is in fast-DiT's own layout ({_count(os.path.join(features, '*.npy'))} .npy "
                f"files in {os.path.basename(features)}/ with labels in {os.path.basename(labels)}/: SD-VAE latents "
                f"scaled by 0.18215, one random flip per image, no record of the autoencoder or checksums), so it "
                f"is not read as a cache of this project; {RECACHE}")
    return None
