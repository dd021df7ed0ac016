"""Cache integrity: a missing, truncated or garbled shard, or metadata that disagrees with the shards, is refused when
the DiT run starts or when the shard is opened, naming the shard; cache files are group-readable."""
import json
import os
import re
import shutil
import stat
import struct

import pytest
import torch

from tcae_ldm.latents.cache import write_cache
from tcae_ldm.latents.shards import ShardError
from tcae_ldm.latents import stream
from tcae_ldm.latents.stream import LatentDataModule

SHARD = "shard-r0-00000.safetensors"


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    g = torch.Generator().manual_seed(0)
    z = torch.randn(12, 4, 2, 2, generator=g)
    meta = {"autoencoder": {"kind": "tcae", "name": "TC-AE-T/p4-c16"}, "image_size": 16, "latent_shape": [4, 2, 2],
            "num_classes": 3}
    old = os.umask(0o077)  # even under the strictest umask the group can read a cache
    try:
        write_cache(str(root / "cache"), z, z.flip(-1), torch.arange(12) % 3, meta)
    finally:
        os.umask(old)
    return root / "cache"


def _copy(good, tmp_path):
    shutil.copytree(good, tmp_path / "cache")
    return tmp_path / "cache"


def _start(cache, in_memory=True):
    dm = LatentDataModule(str(cache), num_workers=0, in_memory=in_memory)
    dm.setup("fit")
    return dm


def test_files_are_group_readable(good):
    for name in os.listdir(good):
        assert os.stat(good / name).st_mode & stat.S_IRGRP, name


def test_missing_and_truncated_shards_are_refused_at_start(good, tmp_path):
    cache = _copy(good, tmp_path)
    data = (cache / SHARD).read_bytes()
    (cache / SHARD).write_bytes(data[:-40])
    with pytest.raises(ShardError, match=f"cache shard {cache / SHARD} is truncated or padded: {len(data) - 40} bytes, "
                                         f"{len(data)} expected"):
        _start(cache)
    (cache / SHARD).write_bytes(data[:5])
    with pytest.raises(ShardError, match=f"cache shard {cache / SHARD} is truncated \\(5 bytes, not even a header\\)"):
        _start(cache)
    os.remove(cache / SHARD)
    with pytest.raises(ShardError, match=f"cache shard {cache / SHARD} listed in metadata.json is missing"):
        _start(cache)


def _with_header(data: bytes, header: bytes, claimed: int | None = None) -> bytes:
    """The shard's bytes with another header (and header length field), its tensor data unchanged."""
    n = struct.unpack("<Q", data[:8])[0]
    return struct.pack("<Q", len(header) if claimed is None else claimed) + header + data[8 + n:]


@pytest.mark.parametrize("case, message", [
    ("claims", "is garbled \\(its header claims 1099511627776 bytes; the file has"),
    ("not json", "is garbled or truncated \\(unreadable header: "),
    ("not utf-8", "is garbled or truncated \\(unreadable header: "),
    ("no offsets", f"cache shard {SHARD} \\(.*{SHARD}\\) has a malformed header"),
    ("offsets not a list", f"cache shard {SHARD} \\(.*{SHARD}\\) has a malformed header"),
])
def test_malformed_shard_headers_are_refused_at_start_naming_the_shard(good, tmp_path, case, message):
    cache = _copy(good, tmp_path)
    data = (cache / SHARD).read_bytes()
    header = json.loads(data[8:8 + struct.unpack("<Q", data[:8])[0]])
    broken = {
        "claims": lambda: _with_header(data, b"{}", claimed=1 << 40),
        "not json": lambda: _with_header(data, b'{"latents": {"dtype": "F32",'),
        "not utf-8": lambda: _with_header(data, b"\xff\xfe{}"),
        "no offsets": lambda: _with_header(data, json.dumps(
            {k: ({kk: vv for kk, vv in v.items() if kk != "data_offsets"} if k == "latents" else v)
             for k, v in header.items()}).encode()),
        "offsets not a list": lambda: _with_header(data, json.dumps(
            {k: ({**v, "data_offsets": 7} if k == "latents" else v) for k, v in header.items()}).encode()),
    }[case]()
    (cache / SHARD).write_bytes(broken)
    with pytest.raises(ShardError, match=message) as err:
        _start(cache)
    assert str(cache / SHARD) in str(err.value) and "\n" not in str(err.value)


def test_metadata_that_disagrees_with_the_shards_is_refused(good, tmp_path):
    cache = _copy(good, tmp_path)
    meta = json.loads((cache / "metadata.json").read_text())
    (cache / "metadata.json").write_text(json.dumps({**meta, "count": 13}))
    with pytest.raises(ShardError, match="metadata.json counts 13 latents, its shards hold 12"):
        _start(cache)
    (cache / "metadata.json").write_text(json.dumps({**meta, "latent_shape": [4, 4, 4]}))
    with pytest.raises(ShardError, match=f"cache shard {cache / SHARD} holds latents of shape \\[4, 2, 2\\], "
                                         f"metadata.json says \\[4, 4, 4\\]"):
        _start(cache)
    (cache / "metadata.json").write_text(json.dumps(meta))
    shutil.copy(cache / SHARD, cache / "shard-r0-00001.safetensors")
    with pytest.raises(ShardError, match=r"holds shards that metadata.json does not list: \['shard-r0-00001"):
        _start(cache)


def _nan_in_first_latent(shard):
    data = bytearray(shard.read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    start = 8 + n + header["latents"]["data_offsets"][0]
    data[start:start + 4] = struct.pack("<f", float("nan"))  # the first latent's first value
    shard.write_bytes(bytes(data))  # same size, valid header: only the contents say it is garbled


def test_a_garbled_shard_is_named_when_it_is_opened(good, tmp_path, monkeypatch):
    cache = _copy(good, tmp_path)
    _nan_in_first_latent(cache / SHARD)
    garbled = f"cache shard {cache / SHARD} is garbled: its size or CRC-32 differs"
    with pytest.raises(ShardError, match=garbled):
        _start(cache, in_memory=True)
    verified = []
    real = stream.verify_shard
    monkeypatch.setattr(stream, "verify_shard", lambda *a: (verified.append(a[0]), real(*a)))
    dm = _start(cache, in_memory=False)  # memory-mapped: start-up stays fast, the CRC is checked at first use
    assert verified == []
    with pytest.raises(ShardError, match=garbled):
        dm.train_set[5]  # any item of the shard, not only the garbled one
    good_dm = _start(good, in_memory=False)
    items = [good_dm.train_set[i] for i in range(12)]
    assert verified == [str(cache / SHARD), str(good / SHARD)]  # once per shard and process
    assert all(torch.isfinite(it["latent"]).all() for it in items)


def _write(tmp_path, z, labels, num_classes=3):
    meta = {"autoencoder": {"kind": "tcae", "name": "TC-AE-T/p4-c16"}, "image_size": 16, "latent_shape": [4, 2, 2],
            "num_classes": num_classes}
    return write_cache(str(tmp_path / "cache"), z, z.flip(-1), labels, meta)


@pytest.mark.parametrize("in_memory", [True, False])
def test_a_bad_latent_or_label_is_one_line_naming_shard_and_row(tmp_path, in_memory):
    """Written so (its CRC agrees): a NaN latent or a label outside num_classes, named before the DiT sees it."""
    z = torch.randn(12, 4, 2, 2)
    z[7, 1, 0, 0] = float("inf")
    cache = _write(tmp_path / "nan", z, torch.arange(12) % 3)
    with pytest.raises(ShardError, match=rf"^cache shard {cache}/{SHARD} holds a non-finite latent in latents at row 7 "
                                         rf"\(image index 7\) \(a garbled file\); re-cache it$"):
        _start(cache, in_memory).train_set[0]
    labels = torch.arange(12) % 3
    labels[4] = 3
    cache = _write(tmp_path / "label", torch.randn(12, 4, 2, 2), labels)
    with pytest.raises(ShardError, match=rf"^cache shard {cache}/{SHARD} has label 3 at row 4 \(image index 4\), "
                                         rf"outside the 3 classes metadata.json records"):
        _start(cache, in_memory)


@pytest.mark.parametrize("name", ["../outside/x.safetensors", "/tmp/x.safetensors", "sub/x.safetensors", "..",
                                  "sub\\x.safetensors"])
def test_metadata_names_only_files_inside_the_cache(good, tmp_path, name):
    cache = _copy(good, tmp_path)
    (tmp_path / "outside").mkdir()
    shutil.copy(cache / SHARD, tmp_path / "outside" / "x.safetensors")  # what a crafted name would reach
    meta = json.loads((cache / "metadata.json").read_text())
    meta["shards"] = [name]
    meta["shard_info"] = {name: meta["shard_info"][SHARD]}
    (cache / "metadata.json").write_text(json.dumps(meta))
    said = f"^latent cache metadata {cache / 'metadata.json'} names {re.escape(repr(name))}, which is not a plain"
    with pytest.raises(ShardError, match=f"{said} file name inside the cache folder"):
        _start(cache, in_memory=False)


def test_statistics_are_checked_against_their_recorded_checksum(good, tmp_path, caplog):
    from tcae_ldm.latents.cache import read_stats

    cache = _copy(good, tmp_path)
    mean, std = read_stats(str(cache))
    torch.save({"mean": (mean + 1).view(1, -1, 1, 1), "std": std.view(1, -1, 1, 1)}, cache / "latents_stats.pt")
    with pytest.raises(ShardError, match=f"^latent statistics {cache / 'latents_stats.pt'} differ from the checksum "
                                         f"metadata.json recorded when the cache was written"):
        read_stats(str(cache))
    meta = json.loads((cache / "metadata.json").read_text())
    del meta["stats_sha256"]  # a cache written before checksums were recorded: read, with one warning
    (cache / "metadata.json").write_text(json.dumps(meta))
    with caplog.at_level("WARNING"):
        read_stats(str(cache))
        assert torch.equal(read_stats(str(cache))[0], mean + 1)
    warned = [r.getMessage() for r in caplog.records if "read unchecked" in r.getMessage()]
    assert len(warned) == 1 and str(cache / "latents_stats.pt") in warned[0] and "\n" not in warned[0]
