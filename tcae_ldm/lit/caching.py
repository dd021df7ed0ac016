"""Making a latent cache: `tcae-ldm predict` with a frozen autoencoder turns a split of images into latents.

CacheSourceDataModule serves the images (no flips, no shuffling, with their dataset indices),
LatentCacheModule encodes each image and its mirror image, and LatentCacheWriter writes the shards, the
statistics and the metadata (both in tcae_ldm.latents.cache). cache_latents() runs the same thing from Python.
"""
from __future__ import annotations

import lightning as L
import torch

from tcae_ldm.data.images import ImageDataModule
from tcae_ldm.latents.cache import CacheSourceDataModule, LatentCacheWriter
from tcae_ldm.latents.frozen import AutoencoderSpec, FrozenAutoencoder, load_autoencoder
from tcae_ldm.lit.compiling import CompileSpec


class LatentCacheModule(L.LightningModule):
    """predict_step: images (B, 3, H, W) -> latents of the images and of their horizontal flips.

    Args:
        autoencoder: the frozen autoencoder {kind: tcae | dcae, path, dtype}; it is loaded when the run starts.
        compile: torch.compile its encoder for inference (true, or torch.compile kwargs); latents agree with eager
            ones within float rounding.
    """

    def __init__(self, autoencoder: AutoencoderSpec, compile: CompileSpec = False):
        super().__init__()
        self.autoencoder_spec, self.compile_spec = dict(autoencoder), compile
        self.autoencoder: FrozenAutoencoder | None = None
        self.spec: dict | None = None

    def configure_model(self) -> None:
        if self.autoencoder is None:  # here, not in __init__: a missing file is then one error, not a parser dump
            self.autoencoder = load_autoencoder(**self.autoencoder_spec).compile_(self.compile_spec)
            self.spec = self.autoencoder.spec()  # absolute paths, so a cache can be decoded from anywhere

    def predict_step(self, batch, batch_idx):
        if "image" not in batch:
            return None  # every file of this batch was unreadable and skipped
        x = batch["image"]
        n = x.shape[0]
        z = self.autoencoder.encode(torch.cat([x, x.flip(-1)]))  # (2B, c, h, w): one pass for both variants
        return {"latents": z[:n], "latents_flip": z[n:], "labels": batch["label"], "indices": batch["index"]}

    def cache_metadata(self, image_size: int) -> dict:
        # inference GMACs per image: what the cache cost to make (encoder) and what every sample costs (decoder)
        enc, dec = self.autoencoder.gmacs_parts(image_size)
        return {"autoencoder": self.autoencoder.identity(), "autoencoder_spec": self.spec,
                "latent_shape": list(self.autoencoder.latent_shape(image_size)),
                "autoencoder_gmacs": round(enc + dec, 4), "encoder_gmacs": round(enc, 4),
                "decoder_gmacs": round(dec, 4)}


def cache_latents(autoencoder: AutoencoderSpec, images: ImageDataModule, output_dir: str, batch_size: int = 64,
                  dtype: str = "fp32", shard_size: int = 4096, overwrite: bool = False, split: str = "train",
                  **trainer_kwargs) -> str:
    """Encode a split of an image datamodule into a latent cache at output_dir (what the predict configs do)."""
    trainer_kwargs = {"accelerator": "auto", "devices": 1, "logger": False, "enable_progress_bar": False,
                      "enable_model_summary": False, **trainer_kwargs}
    writer = LatentCacheWriter(output_dir, dtype=dtype, shard_size=shard_size, overwrite=overwrite)
    trainer = L.Trainer(callbacks=[writer], **trainer_kwargs)
    trainer.predict(LatentCacheModule(autoencoder), CacheSourceDataModule(images, batch_size, split=split),
                    return_predictions=False)
    return output_dir
