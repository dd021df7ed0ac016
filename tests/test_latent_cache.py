"""Latent cache: shard contents, statistics, metadata, refusal of foreign caches, flips, DDP writing."""
import glob
import itertools
import json
import os

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch.utils.data import DataLoader, DistributedSampler

from tcae_ldm.data.demo import DemoPhotosDataModule
from tcae_ldm.data.images import ImageFolderDataModule, collate_skipping
from tcae_ldm.data.latents import LatentCacheWriter, LatentDataModule, read_metadata
from tcae_ldm.lit.caching import CacheSourceDataModule, LatentCacheModule, cache_latents
from tcae_ldm.models.autoencoders import load_autoencoder
from tcae_ldm.models.tcae import create_tcae

NET_ARGS = {"image_size": 32, "latent_size": 4}


def tiny_tcae_checkpoint(path, seed=0):
    """An AutoencoderModule-shaped checkpoint of a random TC-AE-T (16 x 4 x 4 latents of 32 x 32 images)."""
    torch.manual_seed(seed)
    net = create_tcae("TC-AE-T/p4-c16", **NET_ARGS)
    torch.save({"hyper_parameters": {"net": "TC-AE-T/p4-c16", "net_args": NET_ARGS},
                "state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}}, path)
    return str(path)


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
    x = torch.stack([ds[i]["image"] for i in range(16)])
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


class PaddingSource(CacheSourceDataModule):
    """Images through torch's DistributedSampler, which pads 13 images to 14 by repeating index 0."""

    def predict_dataloader(self):
        sampler = DistributedSampler(self.dataset, self.trainer.world_size, self.trainer.global_rank, shuffle=False)
        return DataLoader(self.dataset, batch_size=self.batch_size, sampler=sampler, collate_fn=collate_skipping)


@pytest.mark.slow
@pytest.mark.parametrize("padding", [False, True])
def test_ddp_two_processes_write_every_index_once(tmp_path, padding):
    rng = np.random.default_rng(0)
    for split, count in (("train", 13), ("val", 2)):  # 13: the ranks get 7 and 6 images
        for i in range(count):
            os.makedirs(tmp_path / "images" / split / f"class{i % 2}", exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (40, 36, 3), dtype=np.uint8)).save(
                tmp_path / "images" / split / f"class{i % 2}" / f"{i:02d}.png")
    ckpt = tiny_tcae_checkpoint(tmp_path / "ae.ckpt")
    images = ImageFolderDataModule(str(tmp_path / "images"), image_size=32, num_workers=0)
    out = tmp_path / "latents"
    # ddp_fork: the same DDP code path as `ddp` (gloo on CPU) without re-importing torch in every rank.
    spec = {"kind": "tcae", "path": ckpt}
    if padding:
        trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_fork", logger=False,
                            callbacks=[LatentCacheWriter(str(out), shard_size=4)], enable_progress_bar=False)
        trainer.predict(LatentCacheModule(spec), PaddingSource(images, batch_size=3), return_predictions=False)
    else:
        cache_latents(spec, images, str(out), batch_size=3, shard_size=4, accelerator="cpu", devices=2,
                      strategy="ddp_fork")
    data = load_shards(out)
    assert sorted(data["indices"].tolist()) == list(range(13))
    names = {os.path.basename(p) for p in glob.glob(str(out / "shard-*"))}
    assert {n[:8] for n in names} == {"shard-r0", "shard-r1"}
    meta = read_metadata(out)
    assert meta["count"] == 13 and sorted(meta["shards"]) == sorted(names) and meta["num_classes"] == 2
    both = torch.cat([data["latents"], data["latents_flip"]]).double()
    stats = load_file(out / "stats.safetensors")
    torch.testing.assert_close(stats["mean"], both.mean(dim=(0, 2, 3)).float())
    torch.testing.assert_close(stats["std"], both.std(dim=(0, 2, 3), unbiased=False).float())
