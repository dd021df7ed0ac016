"""Latent cache: shard contents, statistics, metadata, refusal of foreign caches, flips, DDP writing."""
import glob
import hashlib
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tcae_ldm.data.demo import DemoPhotosDataModule
from tcae_ldm.data.transforms import to_unit
from tcae_ldm.latents.cache import (
    CACHE_FORMAT,
    LatentNormalizer,
    read_metadata,
    read_stats,
)
from tcae_ldm.latents.frozen import load_autoencoder
from tcae_ldm.lit.caching import cache_latents
from tcae_ldm.utils.checkpoints import UntrustedFileError
from tests.tiny import Touch, tiny_tcae_checkpoint


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
    stats = dict(zip(("mean", "std"), read_stats(cache["dir"])))
    torch.testing.assert_close(stats["mean"], both.mean(dim=(0, 2, 3)).float())
    torch.testing.assert_close(stats["std"], both.std(dim=(0, 2, 3), unbiased=False).float())

    meta = read_metadata(cache["dir"])
    assert meta["autoencoder"] == json.loads(json.dumps(ae.identity()))
    assert meta["autoencoder_spec"] == {"kind": "tcae", "path": os.path.realpath(cache["ckpt"]), "dtype": "fp32"}
    assert (meta["image_size"], meta["latent_shape"], meta["count"], meta["num_classes"]) == (32, [16, 4, 4], 16, 8)
    assert meta["dataset"]["datamodule"].endswith("DemoPhotosDataModule") and meta["dataset"]["split"] == "train"
    from tcae_ldm.metrics.flops import count_gmacs  # inference cost per image, encoder and decoder apart
    enc = count_gmacs(ae.model.encoder, torch.zeros(1, 3, 32, 32))
    dec = count_gmacs(ae.model.decoder, torch.zeros(1, 16, 4, 4))
    assert (meta["encoder_gmacs"], meta["decoder_gmacs"]) == (round(enc, 4), round(dec, 4)) and enc > 0 and dec > 0
    assert meta["autoencoder_gmacs"] == round(enc + dec, 4)
    # the file format: every shard by name, the statistics file and its checksum
    shards = sorted(os.path.basename(p) for p in glob.glob(os.path.join(cache["dir"], "shard-*.safetensors")))
    assert meta["format"] == CACHE_FORMAT and meta["count"] == 16 and meta["dtype"] == "fp32"
    assert meta["shards"] == shards and list(meta["shard_info"]) == shards
    assert meta["stats_file"] == "latents_stats.pt"
    with open(os.path.join(cache["dir"], "latents_stats.pt"), "rb") as f:
        assert meta["stats_sha256"] == hashlib.sha256(f.read()).hexdigest()
    assert meta["stats"] == "per-channel mean/std over latents and latents_flip"



def lightningdit_read(data_dir):
    """What LightningDiT's latent loader (hustvl/LightningDiT, datasets/img_latent_dataset.py, ImgLatentDataset)
    reads from a cache folder, re-done here: every *.safetensors file of the folder in sorted order, the row count
    of its `labels`, rows of `latents` / `latents_flip` sliced from the file, and latents_stats.pt loaded with a
    plain torch.load, whose mean / std of shape (1, C, 1, 1) normalise a row as (x - mean) / std.
    Returns ([(latent, latent_flip, label)] normalised, in the loader's order, one per image)."""
    from safetensors import safe_open

    stats = torch.load(os.path.join(data_dir, "latents_stats.pt"))
    mean, std = stats["mean"], stats["std"]
    items = []
    for path in sorted(glob.glob(os.path.join(data_dir, "*.safetensors"))):
        with safe_open(path, framework="pt", device="cpu") as f:
            for i in range(f.get_slice("labels").get_shape()[0]):
                z, zf = (((f.get_slice(k)[i:i + 1] - mean) / std).squeeze(0) for k in ("latents", "latents_flip"))
                items.append((z, zf, f.get_slice("labels")[i:i + 1].squeeze(0)))
    return items


def test_lightningdit_loader_reads_the_cache_unchanged(cache):
    from tcae_ldm.latents.stream import LatentDataModule

    items = lightningdit_read(cache["dir"])
    assert len(items) == 16  # three shards, no stats file taken for a shard
    dm = LatentDataModule(cache["dir"], num_workers=0)
    dm.setup("fit")
    data = load_shards(cache["dir"])  # the same sorted shard order
    for (z, zf, y), i in zip(items, data["indices"].tolist()):
        n = dm.train_set.indices.index(i)
        ours = dm.train_set[n]
        torch.testing.assert_close(z, dm.normalizer.normalize(ours["latent"][None])[0])
        torch.testing.assert_close(zf, dm.normalizer.normalize(ours["latent_flip"][None])[0])
        assert int(y) == int(ours["label"])


def test_a_format_1_cache_is_still_read_and_upgrade_makes_it_lightningdit_readable(cache, tmp_path):
    import shutil

    from safetensors.torch import save_file

    from tcae_ldm.latents.checks import upgrade_cache
    from tcae_ldm.latents.stream import LatentDataModule

    old = tmp_path / "old"
    shutil.copytree(cache["dir"], old)
    mean, std = read_stats(str(old))  # rewrite the folder as the previous code wrote it
    save_file({"mean": mean, "std": std}, str(old / "stats.safetensors"))
    os.remove(old / "latents_stats.pt")
    meta = json.loads((old / "metadata.json").read_text())
    meta = {k: v for k, v in meta.items() if k not in ("shard_info", "stats_file")} | {"format": 1}
    (old / "metadata.json").write_text(json.dumps(meta))

    dm = LatentDataModule(str(old), num_workers=0)
    dm.setup("fit")
    torch.testing.assert_close(dm.normalizer.mean, mean)
    upgrade_cache(str(old))
    assert not (old / "stats.safetensors").exists() and read_metadata(str(old))["format"] == 2
    assert len(lightningdit_read(str(old))) == 16
    assert read_metadata(str(old))["shard_info"] == read_metadata(cache["dir"])["shard_info"]


def test_expected_autoencoder_keys_and_weights(cache, tmp_path):
    from tcae_ldm.latents.stream import LatentDataModule

    with pytest.raises(ValueError, match=r"expect_autoencoder has unknown keys \['nmae'\]; it takes \['kind', 'name'"):
        LatentDataModule(cache["dir"], expect_autoencoder={"kind": "tcae", "nmae": "TC-AE-T/p4-c16"})
    same = {"kind": "tcae", "name": "TC-AE-T/p4-c16", "path": cache["ckpt"]}
    LatentDataModule(cache["dir"], expect_autoencoder=same).setup("fit")
    # another run of the same preset (other weights) under the expected name: refused by the weights' identity
    other = tiny_tcae_checkpoint(tmp_path / "other.ckpt", seed=1)
    with pytest.raises(ValueError, match=r"was made by tcae 'TC-AE-T/p4-c16'.*differs in \['weights: encoder_hash"):
        LatentDataModule(cache["dir"], expect_autoencoder={**same, "path": other}).setup("fit")


def test_normalizer_maps_cache_latents_to_unit_statistics_and_back_in_their_dtype(cache):
    norm = LatentNormalizer.from_cache(cache["dir"])
    mean, std = read_stats(cache["dir"])
    z = torch.cat([load_shards(cache["dir"])["latents"], load_shards(cache["dir"])["latents_flip"]])
    n = norm.normalize(z)
    torch.testing.assert_close(n, (z - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1))
    torch.testing.assert_close(n.double().mean(dim=(0, 2, 3)), torch.zeros(16, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(norm.denormalize(n), z, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(norm.denormalize(torch.zeros_like(z)), mean.view(1, -1, 1, 1).expand_as(z))
    half = z.bfloat16()  # a bf16 DiT's latents stay bf16 both ways
    assert norm.normalize(half).dtype == norm.denormalize(half).dtype == torch.bfloat16


def test_unreadable_pickled_or_missing_statistics_name_the_file(cache, tmp_path):
    broken = str(tmp_path / "latents")
    shutil.copytree(cache["dir"], broken)
    stats = os.path.join(broken, "latents_stats.pt")
    with open(stats, "wb") as f:
        f.write(b"not a torch file")
    meta = read_metadata(broken)
    meta["stats_sha256"] = hashlib.sha256(b"not a torch file").hexdigest()  # damaged before it was recorded
    with open(os.path.join(broken, "metadata.json"), "w") as f:
        json.dump(meta, f)
    with pytest.raises(Exception, match=rf"^latent statistics {stats} cannot be read \(.*\); re-cache$"):
        read_stats(broken)
    torch.save({"mean": torch.zeros(16), "std": torch.ones(16), "payload": Touch(tmp_path / "SENTINEL")}, stats)
    with open(stats, "rb") as f:
        meta["stats_sha256"] = hashlib.sha256(f.read()).hexdigest()
    with open(os.path.join(broken, "metadata.json"), "w") as f:
        json.dump(meta, f)
    with pytest.raises(UntrustedFileError, match=rf"^latent statistics {stats} holds pickled objects"):
        read_stats(broken)
    assert not (tmp_path / "SENTINEL").exists()
    os.remove(stats)
    with pytest.raises(FileNotFoundError, match=rf"^latent cache {broken} has no latents_stats.pt; re-cache$"):
        read_stats(broken)
