"""Cache integrity: a missing, truncated or garbled shard, or metadata that disagrees with the shards, is refused when
the DiT run starts or when the shard is opened, naming the shard; cache files are group-readable."""
import json
import os
import shutil
import stat
import struct

import pytest
import torch

from tcae_ldm.latents.cache import write_cache
from tcae_ldm.latents.shards import ShardError
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


def test_a_garbled_shard_is_named_when_it_is_opened(good, tmp_path):
    cache = _copy(good, tmp_path)
    data = bytearray((cache / SHARD).read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    start = 8 + n + header["latents"]["data_offsets"][0]
    data[start:start + 4] = struct.pack("<f", float("nan"))  # the first latent's first value
    (cache / SHARD).write_bytes(bytes(data))  # same size, valid header: only the contents say it is garbled
    with pytest.raises(ShardError, match=f"cache shard {cache / SHARD} is garbled: its size or CRC-32 differs"):
        _start(cache, in_memory=True)
    dm = _start(cache, in_memory=False)  # memory-mapped: each item is checked as it is read
    first = dm.train_set.indices.index(0)
    with pytest.raises(ShardError, match=f"cache shard {cache / SHARD} holds non-finite values in latents"):
        dm.train_set[first]
    assert torch.isfinite(dm.train_set[(first + 1) % 12]["latent"]).all()
