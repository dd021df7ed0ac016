"""One shard of a latent cache on disk: a safetensors file {latents, latents_flip (N, c, h, w); labels, indices (N,)}.

Shards are written atomically and group-readable, and described in the cache's metadata by their size and CRC-32,
so that a missing, truncated or garbled shard is refused when the run starts or when the shard is opened, naming
it, instead of surfacing later as a NaN loss. The header check needs only the first bytes of each file.
"""
from __future__ import annotations

import json
import os
import struct
import zlib

import torch
from safetensors import safe_open
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from tcae_ldm.utils.atomic import write_bytes_atomic

SHARD_KEYS = ("latents", "latents_flip", "labels", "indices")
CACHE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SAFETENSORS_DTYPES = {"fp32": "F32", "bf16": "BF16"}


class ShardError(ValueError):
    """A cache shard that is missing, truncated, garbled or does not match the cache's metadata."""


def write_shard(path: str, data: dict, dtype: str) -> tuple[dict, dict]:
    """Write {latents, latents_flip, labels, indices} as one shard; returns (the stored tensors, the shard's info
    {rows, bytes, crc32} for metadata.json)."""
    cast = CACHE_DTYPES[dtype]
    shard = {"latents": data["latents"].to(cast).contiguous(),
             "latents_flip": data["latents_flip"].to(cast).contiguous(),
             "labels": data["labels"].long().contiguous(), "indices": data["indices"].long().contiguous()}
    blob = save_bytes(shard)
    write_bytes_atomic(path, blob, group_readable=True)  # the group that trains on a cache must read it
    return shard, {"rows": len(shard["indices"]), "bytes": len(blob), "crc32": zlib.crc32(blob)}


def read_header(path: str) -> tuple[dict, int]:
    """(tensor entries of the safetensors header, the file size that header implies); ShardError naming the file
    when it cannot be a safetensors file."""
    name = os.path.basename(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ShardError(f"cache shard {path} is truncated ({size} bytes, not even a header)")
        n = struct.unpack("<Q", head)[0]
        if n > min(size, 100 << 20):
            raise ShardError(f"cache shard {path} is garbled (its header claims {n} bytes; the file has {size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ShardError(f"cache shard {path} is garbled or truncated (unreadable header: {e})") from None
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    try:
        end = max((v["data_offsets"][1] for v in tensors.values()), default=0)
    except (KeyError, TypeError, IndexError):
        raise ShardError(f"cache shard {name} ({path}) has a malformed header") from None
    return tensors, 8 + n + end


def shard_problems(path: str, info: dict | None, latent_shape: list[int] | None, dtype: str | None) -> list[str]:
    """What is wrong with one shard against the metadata (cheap: header and size only)."""
    if not os.path.isfile(path):
        return [f"cache shard {path} listed in metadata.json is missing"]
    try:
        tensors, expected = read_header(path)
    except ShardError as e:
        return [str(e)]
    size = os.path.getsize(path)
    if size != expected or (info and size != info.get("bytes", size)):
        want = info.get("bytes", expected) if info else expected
        return [f"cache shard {path} is truncated or padded: {size} bytes, {want} expected"]
    missing = [k for k in SHARD_KEYS if k not in tensors]
    if missing:
        return [f"cache shard {path} has no {missing} (a cache shard holds {list(SHARD_KEYS)})"]
    rows = {k: tensors[k]["shape"][0] if tensors[k]["shape"] else None for k in SHARD_KEYS}
    problems = []
    if len(set(rows.values())) != 1:
        problems.append(f"cache shard {path} holds different numbers of rows per tensor: {rows}")
    for key in ("latents", "latents_flip"):
        if latent_shape is not None and tensors[key]["shape"][1:] != list(latent_shape):
            problems.append(f"cache shard {path} holds {key} of shape {tensors[key]['shape'][1:]}, metadata.json "
                            f"says {list(latent_shape)}")
        if dtype in SAFETENSORS_DTYPES and tensors[key]["dtype"] != SAFETENSORS_DTYPES[dtype]:
            problems.append(f"cache shard {path} stores {key} as {tensors[key]['dtype']}, metadata.json says {dtype}")
    if info and "rows" in info and rows["labels"] != info["rows"]:
        problems.append(f"cache shard {path} holds {rows['labels']} rows, metadata.json says {info['rows']}")
    return problems


def shard_rows(path: str) -> int:
    tensors, _ = read_header(path)
    return tensors["labels"]["shape"][0]


def load_shard(path: str, info: dict | None = None, num_classes: int | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of a shard, read whole; its size and CRC-32 checked against `info` when the metadata has them,
    its latents checked to be finite and its labels to lie in [0, num_classes). ShardError naming the file."""
    with open(path, "rb") as f:
        blob = f.read()
    if info and "crc32" in info and (len(blob) != info["bytes"] or zlib.crc32(blob) != info["crc32"]):
        raise ShardError(_crc_message(path, len(blob), info))
    try:
        data = load_bytes(blob)
    except Exception as e:  # safetensors' own error does not name the file
        raise ShardError(f"cache shard {path} cannot be read ({e})") from None
    check_values(data, path, num_classes)
    return data


def _crc_message(path: str, size: int, info: dict) -> str:
    return (f"cache shard {path} is garbled: its size or CRC-32 differs from what metadata.json recorded when it "
            f"was written ({size} vs {info['bytes']} bytes); re-cache it")


def verify_shard(path: str, info: dict | None, num_classes: int | None = None) -> None:
    """load_shard's checks on a shard that is served memory-mapped: the file is streamed for its CRC-32 and its
    tensors are mapped for the value checks, so that no shard is held in memory twice."""
    if info and "crc32" in info:
        crc, size = 0, 0
        with open(path, "rb") as f:
            while chunk := f.read(16 << 20):
                crc, size = zlib.crc32(chunk, crc), size + len(chunk)
        if size != info["bytes"] or crc != info["crc32"]:
            raise ShardError(_crc_message(path, size, info))
    try:
        with safe_open(path, "pt") as f:
            data = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors' own error does not name the file
        raise ShardError(f"cache shard {path} cannot be read ({e})") from None
    check_values(data, path, num_classes)


def _row_name(data: dict, r: int) -> str:
    index = f" (image index {int(data['indices'][r])})" if "indices" in data and len(data["indices"]) > r else ""
    return f"row {r}{index}"


def check_values(data: dict, path: str, num_classes: int | None = None) -> None:
    """ShardError naming the shard and the first row whose latent is not finite or whose label is not a class:
    either would surface later as a NaN loss or an IndexError deep inside the DiT."""
    for key in ("latents", "latents_flip"):
        if key in data:
            finite = torch.isfinite(data[key]).flatten(1).all(1)
            if not finite.all():
                r = int((~finite).nonzero()[0])
                raise ShardError(f"cache shard {path} holds a non-finite latent in {key} at {_row_name(data, r)} "
                                 f"(a garbled file); re-cache it")
    check_labels(data, path, num_classes)


def check_labels(data: dict, path: str, num_classes: int | None) -> None:
    if num_classes is None or "labels" not in data:
        return
    labels = data["labels"]
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        r = int(bad.nonzero()[0])
        raise ShardError(f"cache shard {path} has label {int(labels[r])} at {_row_name(data, r)}, outside the "
                         f"{num_classes} classes metadata.json records (num_classes); re-cache it")


def plain_name(name, where: str) -> str:
    """`name` when it is a plain file name inside the cache folder; ShardError naming the entry otherwise (a name
    from metadata.json must not reach files outside the folder)."""
    separators = {"/", "\\", os.sep} | ({os.altsep} if os.altsep else set())
    if (not isinstance(name, str) or name in ("", ".", "..") or os.path.isabs(name) or "\x00" in name
            or any(sep in name for sep in separators)):
        raise ShardError(f"{where} names {name!r}, which is not a plain file name inside the cache folder (no folders, "
                         f"'..' or absolute paths are allowed); re-cache, or restore the metadata.json it was written "
                         f"with")
    return name
