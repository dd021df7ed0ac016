"""Latent cache: shard contents, statistics, metadata, refusal of foreign caches, flips, DDP writing."""
import glob
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from tcae_ldm.data.demo import DemoPhotosDataModule
from tcae_ldm.data.transforms import to_unit
from tcae_ldm.latents.cache import (
    read_metadata,
)
from tcae_ldm.latents.frozen import load_autoencoder
from tcae_ldm.lit.caching import cache_latents
from tests.tiny import tiny_tcae_checkpoint


def load_shards(cache_dir):
    shards = [load_file(p) for p in sorted(glob.glob(os.path.join(cache_dir, "shard-*.safetensors")))]
    return {k: torch.cat([s[k] for s in shards]) for k in shards[0]}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    ckpt = tiny_tcae_checkpoint(root / "ae.ckpt")
    images = DemoPhotosDataModule(image_size=32, train_per_class=2, val_per_class=1, hflip=True)
    out = cache_latents({"kind": "tcae", "path": ckpt}, images, str(root / "latents"), batch_size=5, shard_size=6,
                        accelerator="cpu")
    return {"dir": out, "ckpt": ckpt, "images": images}


def test_round_trip_shards_stats_metadata(cache):
    data = load_shards(cache["dir"])
    assert sorted(data["indices"].tolist()) == list(range(16))  # every image once, flips off in the source
    order = data["indices"].argsort()
    ds = cache["images"].train_set
    x = to_unit(torch.stack([ds[i]["image"] for i in range(16)]))  # training items are uint8 until the device
    ae = load_autoencoder("tcae", cache["ckpt"])
    torch.testing.assert_close(data["latents"][order], ae.encode(x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(data["latents_flip"][order], ae.encode(x.flip(-1)), rtol=1e-4, atol=1e-5)
    assert data["labels"][order].tolist() == [ds[i]["label"] for i in range(16)]
    assert data["latents"].dtype == torch.float32 and data["labels"].dtype == torch.int64
    assert len(glob.glob(os.path.join(cache["dir"], "shard-r0-*.safetensors"))) == 3  # shards of 6: 6 + 6 + 4

    both = torch.cat([data["latents"], data["latents_flip"]]).double()
    stats = load_file(os.path.join(cache["dir"], "stats.safetensors"))
    torch.testing.assert_close(stats["mean"], both.mean(dim=(0, 2, 3)).float())
    torch.testing.assert_close(stats["std"], both.std(dim=(0, 2, 3), unbiased=False).float())

    meta = read_metadata(cache["dir"])
    assert meta["autoencoder"] == json.loads(json.dumps(ae.identity()))
    assert meta["autoencoder_spec"] == {"kind": "tcae", "path": os.path.realpath(cache["ckpt"]), "dtype": "fp32"}
    assert (meta["image_size"], meta["latent_shape"], meta["count"], meta["num_classes"]) == (32, [16, 4, 4], 16, 8)
    assert meta["dataset"]["datamodule"].endswith("DemoPhotosDataModule") and meta["dataset"]["split"] == "train"

