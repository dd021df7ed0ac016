"""Checks that refuse a latent cache the run cannot trust: damaged (a missing, truncated or garbled shard, metadata
that disagrees with the shards) or foreign (another autoencoder, other weights, another resolution); and the
conversion of a format-1 cache.
"""
from __future__ import annotations

import glob
import os
import zlib
from typing import Literal, TypedDict

from tcae_ldm.latents.cache import (
    CACHE_FORMAT,
    METADATA_FILE,
    OLD_STATS_FILE,
    STATS_FILE,
    read_metadata,
    read_stats,
    write_json,
    write_stats,
)
from tcae_ldm.latents.frozen import (
    MATCH_KEYS,
    describe_identity,
    identity_mismatch,
    load_autoencoder,
)
from tcae_ldm.latents.shards import ShardError, plain_name, shard_problems, shard_rows


def cache_problems(cache_dir: str, metadata: dict) -> list[str]:
    """Everything wrong between metadata.json and the files of a cache (headers and sizes only: cheap)."""
    infos = metadata.get("shard_info") or {}
    problems = []
    rows = 0
    for name in metadata.get("shards", []):
        path = os.path.join(cache_dir, plain_name(name, f"latent cache metadata {cache_dir}/{METADATA_FILE}"))
        found = shard_problems(path, infos.get(name), metadata.get("latent_shape"), metadata.get("dtype"))
        problems += found
        if not found:
            rows += infos[name]["rows"] if name in infos else shard_rows(path)
    listed = set(metadata.get("shards", []))
    extra = sorted(os.path.basename(p) for p in glob.glob(os.path.join(cache_dir, "*.safetensors"))
                   if os.path.basename(p) not in listed and os.path.basename(p) != OLD_STATS_FILE)
    if extra:
        problems.append(f"latent cache {cache_dir} holds shards that metadata.json does not list: {extra[:5]} (left "
                        f"from another caching run? any *.safetensors file is read as a shard by LightningDiT)")
    if not problems and "count" in metadata and rows != metadata["count"]:
        problems.append(f"latent cache {cache_dir}: metadata.json counts {metadata['count']} latents, its shards hold "
                        f"{rows}")
    if not any(os.path.isfile(os.path.join(cache_dir, n)) for n in (STATS_FILE, OLD_STATS_FILE)):
        problems.append(f"latent cache {cache_dir} has no {STATS_FILE}")
    return problems


def verify_cache(cache_dir: str, metadata: dict) -> None:
    """Raise ShardError naming every shard that is missing, truncated, garbled or disagrees with metadata.json."""
    problems = cache_problems(cache_dir, metadata)
    if problems:
        raise ShardError("; ".join(problems) + " (re-cache, or restore the missing files)")


def upgrade_cache(cache_dir: str) -> None:
    """Convert a format-1 cache in place: latents_stats.pt instead of stats.safetensors (which LightningDiT's loader
    would read as a shard), and each shard's size and CRC-32 in metadata.json."""
    meta = read_metadata(cache_dir)
    if meta.get("format", 1) >= CACHE_FORMAT:
        return
    verify_cache(cache_dir, meta)
    infos = {}
    for name in meta["shards"]:
        blob = open(os.path.join(cache_dir, name), "rb").read()
        infos[name] = {"rows": shard_rows(os.path.join(cache_dir, name)), "bytes": len(blob), "crc32": zlib.crc32(blob)}
    digest = write_stats(cache_dir, *read_stats(cache_dir))
    write_json(os.path.join(cache_dir, METADATA_FILE), {**meta, "format": CACHE_FORMAT, "shard_info": infos,
                                                         "stats_file": STATS_FILE, "stats_sha256": digest})
    os.remove(os.path.join(cache_dir, OLD_STATS_FILE))


class ExpectedAutoencoder(TypedDict, total=False):
    """What a run expects of the autoencoder that made its cache (a config value; a misspelt key fails parsing)."""
    kind: Literal["tcae", "dcae"]
    name: str          # the preset (or DC-AE hub id)
    path: str          # its checkpoint / folder / hub id: the cache's encoder weights must equal these
    config_hash: str
    weights_hash: str
    encoder_hash: str


def check_expected_keys(expect_autoencoder: dict | None) -> None:
    """A misspelt key would silently switch the check off: unknown keys are an error naming them."""
    unknown = sorted(set(expect_autoencoder or {}) - set(MATCH_KEYS))
    if unknown:
        raise ValueError(f"expect_autoencoder has unknown keys {unknown}; it takes {list(MATCH_KEYS)}")


def check_cache(metadata: dict, cache_dir: str, expect_autoencoder: dict | None = None,
                expect_image_size: int | None = None) -> None:
    """Refuse a cache made by another autoencoder or at another resolution than the run expects.

    With expect_autoencoder.path, the autoencoder at that path is loaded and its encoder's weights compared with
    the ones the cache recorded (latents depend on the encoder only, so a decoder-finetuned checkpoint of the same
    encoder matches): another run of the same preset, or the same file trained further, is refused."""
    check_expected_keys(expect_autoencoder)
    made_by = metadata["autoencoder"]
    if expect_autoencoder:
        expected = {k: v for k, v in expect_autoencoder.items() if k != "path"}
        bad = identity_mismatch(expected, made_by)
        path = expect_autoencoder.get("path")
        if path and not bad:
            actual = load_autoencoder(expected.get("kind") or made_by["kind"], str(path)).identity()
            key = "encoder_hash" if made_by.get("encoder_hash") else "weights_hash"
            if made_by.get(key) and made_by[key] != actual[key]:
                bad.append(f"weights: {key} {made_by[key][:12]} in the cache, {actual[key][:12]} at {path}")
        if bad:
            raise ValueError(f"latent cache {cache_dir} was made by {describe_identity(made_by)}, "
                             f"but this run expects {describe_identity(expect_autoencoder)} (differs in {bad}); "
                             f"re-cache with the expected autoencoder or point cache_dir at its cache")
    if expect_image_size is not None and metadata["image_size"] != expect_image_size:
        raise ValueError(f"latent cache {cache_dir} holds latents of {metadata['image_size']}x"
                         f"{metadata['image_size']} images, but this run expects {expect_image_size}x"
                         f"{expect_image_size} (made by {describe_identity(made_by)})")
