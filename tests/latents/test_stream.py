"""The latent stream: normalisation, refusal of foreign caches, flips, passes, ranks and exact resume."""
import glob
import itertools
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tcae_ldm.data.demo import DemoPhotosDataModule
from tcae_ldm.latents.cache import (
    read_metadata,
)
from tcae_ldm.latents.stream import LatentDataModule
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


def test_datamodule_normalises_and_refuses_foreign_caches(cache, tmp_path):
    dm = LatentDataModule(cache["dir"], global_batch_size=16, num_workers=0, random_flip=False,
                          expect_autoencoder={"kind": "tcae", "name": "TC-AE-T/p4-c16"}, expect_image_size=32)
    dm.setup("fit")
    assert dm.latent_shape == (16, 4, 4) and dm.num_classes == 8
    z = next(iter(dm.train_dataloader()))["latent"]
    assert z.mean(dim=(0, 2, 3)).abs().max() < 0.5 and (z.std(dim=(0, 2, 3)) - 1).abs().max() < 0.5
    torch.testing.assert_close(dm.normalizer.denormalize(dm.normalizer.normalize(z)), z)

    weights = read_metadata(cache["dir"])["autoencoder"]["weights_hash"]
    for expect in ({"kind": "dcae"}, {"kind": "tcae", "weights_hash": "0" * 64}):
        with pytest.raises(ValueError, match="was made by tcae 'TC-AE-T/p4-c16'") as err:
            LatentDataModule(cache["dir"], expect_autoencoder=expect).setup("fit")
        assert weights[:12] in str(err.value) and "this run expects" in str(err.value)
    with pytest.raises(ValueError, match="32x32 images, but this run expects 64x64"):
        LatentDataModule(cache["dir"], expect_image_size=64).setup("fit")

    os.makedirs(tmp_path / "unfinished")
    open(tmp_path / "unfinished" / "shard-r0-00000.safetensors", "w").close()
    with pytest.raises(FileNotFoundError, match="unfinished caching run"):
        LatentDataModule(str(tmp_path / "unfinished")).setup("fit")
    with pytest.raises(FileExistsError, match="overwrite"):  # never mixes old shards into a new cache
        cache_latents({"kind": "tcae", "path": cache["ckpt"]}, cache["images"], cache["dir"], accelerator="cpu")


def test_stream_flips_passes_ranks_and_resume(cache):
    data = load_shards(cache["dir"])
    order = data["indices"].argsort()
    plain, flipped = data["latents"][order], data["latents_flip"][order]

    def batches(n, random_flip=True, in_memory=True, rank=0, world=1, start=0, num_workers=0):
        dm = LatentDataModule(cache["dir"], global_batch_size=4, num_workers=num_workers, random_flip=random_flip,
                              in_memory=in_memory, seed=3)
        dm.setup("fit")
        loader = dm.train_dataloader()
        loader.dataset.rank, loader.dataset.world = rank, world
        loader.load_state_dict({"batches": start})
        out = []
        for b in itertools.islice(loader, n):
            raw = dm.normalizer.denormalize(b["latent"])
            flips = []
            for z, i in zip(raw, b["index"].tolist()):
                is_plain, is_flip = torch.allclose(z, plain[i], atol=1e-5), torch.allclose(z, flipped[i], atol=1e-5)
                assert is_plain != is_flip
                flips.append(is_flip)
            out.append((b["index"].tolist(), flips))
        return out

    run = batches(16)  # 4 passes over the 16 latents
    for p in range(4):
        assert sorted(i for idx, _ in run[4 * p: 4 * p + 4] for i in idx) == list(range(16))  # each once per pass
    first = {i: f for idx, fl in run[:4] for i, f in zip(idx, fl)}
    flips = [f for _, fl in run for f in fl]
    assert 0.25 < np.mean(flips) < 0.75
    assert any(first[i] != f for idx, fl in run[4:8] for i, f in zip(idx, fl))  # the variant changes per pass
    assert batches(16, in_memory=False) == run  # memory-mapped shards read the same items
    assert batches(6, start=10) == run[10:]  # resuming at batch 10 continues the same stream
    assert batches(6, num_workers=2) == run[:6]  # worker processes keep the order
    assert not any(f for _, fl in batches(8, random_flip=False) for f in fl)
    ranks = [batches(2, rank=r, world=2) for r in (0, 1)]  # two ranks split a pass without overlap
    assert sorted(i for r in ranks for idx, _ in r for i in idx) == list(range(16))



def test_overwrite_replaces_a_cache_whole(cache, tmp_path):
    """overwrite: true on a complete cache made by another autoencoder with another shard size: the old shards are
    removed, not mixed in; the new cache holds each image once, its stats and its autoencoder."""
    import shutil

    out = tmp_path / "latents"
    shutil.copytree(cache["dir"], out)
    old = sorted(os.listdir(out))
    assert len([f for f in old if f.startswith("shard-")]) == 3  # 16 latents in shards of 6
    other = tiny_tcae_checkpoint(tmp_path / "other.ckpt", seed=1)
    cache_latents({"kind": "tcae", "path": other}, cache["images"], str(out), batch_size=8, shard_size=16,
                  overwrite=True, accelerator="cpu")
    assert [f for f in os.listdir(out) if f.startswith("shard-")] == ["shard-r0-00000.safetensors"]
    meta = read_metadata(str(out))
    assert meta["count"] == 16 and meta["autoencoder"]["path"] == str(other)
    data = load_shards(str(out))
    assert sorted(data["indices"].tolist()) == list(range(16))
    before = load_shards(cache["dir"])
    assert not torch.equal(data["latents"][data["indices"].argsort()], before["latents"][before["indices"].argsort()])
    dm = LatentDataModule(str(out), expect_autoencoder={"kind": "tcae", "path": str(other)})
    dm.setup("fit")  # the stats and shards agree: the stream starts
