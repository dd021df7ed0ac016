"""The battery of bad inputs: each row runs one bad input through the public entry point a user would call (the
`tcae-ldm` command line, tcae_ldm.cli.main, or the Python API) and asserts the one clear line it must get.

Adding a case is one row: Case(name, what to run, the text the error must contain). `what to run` is either the
arguments of `tcae-ldm` or a function of the fixture paths; "{name}" in an argument or in the expected text stands
for a path of the `paths` fixture below (a tiny autoencoder checkpoint, a latent cache and damaged copies of both,
a finished DiT run). Every case runs in its own empty working directory.
"""
import json
import os
import re
import shutil
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

from tcae_ldm.cli import main
from tcae_ldm.data.images import ImageFolderDataModule
from tcae_ldm.latents.cache import LatentCacheWriter
from tcae_ldm.latents.frozen import load_autoencoder
from tcae_ldm.latents.stream import LatentDataModule
from tcae_ldm.lit.autoencoder import AutoencoderModule
from tcae_ldm.lit.caching import cache_latents
from tcae_ldm.lit.diffusion import DiffusionModule
from tcae_ldm.losses.lpips import build_lpips
from tcae_ldm.losses.ssl import SSLConfig
from tcae_ldm.metrics.features import build_feature_extractor
from tcae_ldm.models.tcae import create_tcae
from tests.tiny import callbacks_arg, dit_argv, tiny_latent_cache, tiny_tcae_checkpoint


@dataclass
class Case:
    name: str
    run: list[str] | Callable[[dict], object]  # tcae-ldm arguments, or a function of the fixture paths
    message: str                                # what the error must say ("{name}": a fixture path)
    error: type = Exception                     # and its type (SystemExit: a command-line error on stderr)


def dit(max_steps=2, *extra):
    """`tcae-ldm fit` of the tiny DiT on {cache} (made by {ae})."""
    return dit_argv("{cache}", "{ae}", max_steps, callbacks_arg(1), *extra)


def _with(args, old, new):
    return [new if a == old else a for a in args]


CASES = [
    # --- checkpoints
    Case("resume from a truncated last.ckpt", dit(4, "--ckpt_path={dit_truncated}"),
         "checkpoint {dit_truncated} cannot be read: it is truncated or not a checkpoint"),
    Case("resume from an empty checkpoint", dit(4, "--ckpt_path={empty_ckpt}"),
         "checkpoint {empty_ckpt} cannot be read: it is empty (0 bytes); no intact checkpoint is left beside it"),
    Case("resume from a missing checkpoint", dit(4, "--ckpt_path={root}/nothing.ckpt"),
         "{root}/nothing.ckpt"),
    Case("cache from a truncated autoencoder checkpoint", lambda p: load_autoencoder("tcae", p["ae_truncated"]),
         "checkpoint {ae_truncated} cannot be read: it is truncated or not a checkpoint"),
    Case("cache from a missing autoencoder checkpoint", lambda p: load_autoencoder("tcae", p["root"] + "/no.ckpt"),
         "TC-AE checkpoint or folder '{root}/no.ckpt' does not exist"),
    Case("DC-AE hub id absent from the offline cache", lambda p: load_autoencoder("dcae", "nobody/no-such-dcae"),
         "DC-AE model 'nobody/no-such-dcae' could not be loaded offline (HF_HUB_OFFLINE=1)"),
    # --- latent caches
    Case("DiT on a cache with a truncated shard", dit(2, "--data.cache_dir={cache_truncated}"),
         "cache shard {cache_truncated}/shard-r0-00000.safetensors is truncated or padded"),
    Case("DiT on a cache with a missing shard", dit(2, "--data.cache_dir={cache_missing}"),
         "cache shard {cache_missing}/shard-r0-00000.safetensors listed in metadata.json is missing"),
    Case("DiT on a cache with a garbled shard", lambda p: LatentDataModule(p["cache_garbled"]).setup("fit"),
         "cache shard {cache_garbled}/shard-r0-00000.safetensors is garbled"),
    Case("DiT on a cache whose metadata miscounts", dit(2, "--data.cache_dir={cache_miscount}"),
         "latent cache {cache_miscount}: metadata.json counts 17 latents, its shards hold 16"),
    Case("DiT on an unfinished cache", dit(2, "--data.cache_dir={cache_unfinished}"),
         "latent cache {cache_unfinished} has shards but no metadata.json (an unfinished caching run)", SystemExit),
    Case("DiT on a cache of another resolution", dit(2, "--data.expect_image_size=64"),
         "latent cache {cache} holds latents of 32x32 images, but this run expects 64x64"),
    Case("DiT on a cache of another autoencoder kind", dit(2, "--data.expect_autoencoder.kind=dcae"),
         "latent cache {cache} was made by tcae 'TC-AE-T/p4-c16'"),
    Case("DiT on a cache of the same preset, other weights",
         _with(dit(2), "--data.expect_autoencoder.path={ae}", "--data.expect_autoencoder.path={other_ae}"),
         "differs in ['weights: encoder_hash"),
    Case("misspelt key under expect_autoencoder (config)",
         dit(2, "--data.expect_autoencoder={kind: tcae, nmae: TC-AE-T}"), "Unexpected keys: {'nmae'}", SystemExit),
    Case("misspelt key under expect_autoencoder (Python)",
         lambda p: LatentDataModule(p["cache"], expect_autoencoder={"kind": "tcae", "nmae": "TC-AE-T"}),
         "expect_autoencoder has unknown keys ['nmae']; it takes ['kind', 'name', 'config_hash'"),
    Case("caching into a finished cache again", lambda p: cache_latents(
        {"kind": "tcae", "path": p["ae"]}, _images(), p["cache"], accelerator="cpu"),
         "latent cache folder {cache} already holds a complete cache (16 latents made by tcae"),
    Case("caching into a folder of other .safetensors files", lambda p: cache_latents(
        {"kind": "tcae", "path": p["ae"]}, _images(), p["foreign"], accelerator="cpu", overwrite=True),
         "latent cache folder {foreign} holds other .safetensors files (model.safetensors, ...)"),
    Case("a cache dtype that does not exist", lambda p: LatentCacheWriter(p["root"], dtype="fp16"),
         "cache dtype must be one of ['bf16', 'fp32'], got 'fp16'"),
    Case("a latent stream without max_steps", dit(2, "--trainer.max_steps=-1"),
         "LatentDataModule streams the cache without epochs: set trainer.max_steps"),
    # --- what a run needs
    Case("generation callback without its reference statistics",
         _with(dit(2), callbacks_arg(1), callbacks_arg(1, {"reference_stats": "{root}/none.npz", "features": "random"})),
         "GenerationEvalCallback.reference_stats {root}/none.npz does not exist"),
    Case("an image folder that does not exist", lambda p: ImageFolderDataModule(p["root"] + "/imagenet").setup("fit"),
         "image folder '{root}/imagenet/train' does not exist"),
    Case("an unreadable image", lambda p: ImageFolderDataModule(p["images"], image_size=32).setup("fit") or
         _first_image(p["images"]), "cannot read image {images}/train/a/broken.jpg"),
    Case("a patch size that does not divide the image", lambda p: create_tcae("TC-AE-T/p4-c16", image_size=30),
         "image_size=30 is not divisible by patch_size=4"),
    Case("an unknown TC-AE preset", lambda p: create_tcae("TC-AE-Q/p4-c16"), "unknown TC-AE preset 'TC-AE-Q/p4-c16'"),
    Case("iBOT on a convolutional DC-AE", lambda p: AutoencoderModule(net="DC-AE-T/f16c16", ssl=SSLConfig()),
         "iBOT reads the tokens of a ViT encoder; DC-AE-T/f16c16 is a convolutional DC-AE: set model.ssl to null"),
    Case("an unknown autoencoder kind", lambda p: load_autoencoder("vae", p["ae"]),
         "autoencoder kind must be 'tcae', 'dcae' or 'sdvae', got 'vae'"),
    Case("DiT arguments that come from the cache", lambda p: DiffusionModule(dit="DiT-T/1", dit_args={"in_channels": 4}),
         "dit_args ['in_channels'] come from the latent cache"),
    Case("an unknown FID network", lambda p: build_feature_extractor("inceptoin"),
         "unknown FID feature network 'inceptoin'"),
    Case("Inception weights missing", lambda p: build_feature_extractor("inception", p["root"] + "/inc.pth"),
         "FID with Inception (weights-inception-2015-12-05-6726825d.pth) needs the weight file {root}/inc.pth"),
    Case("VGG16 weights of LPIPS missing", lambda p: build_lpips(p["root"] + "/vgg16.pth"),
         "LPIPS (its VGG16 trunk) needs the weight file {root}/vgg16.pth"),
]


def _images():
    from tcae_ldm.data.demo import DemoPhotosDataModule

    return DemoPhotosDataModule(image_size=32, train_per_class=2, val_per_class=1)


def _first_image(root):
    dm = ImageFolderDataModule(root, image_size=32)
    dm.setup("fit")
    return [dm.train_set[i] for i in range(len(dm.train_set))]


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_inputs")
    ae, cache = tiny_latent_cache(str(root))
    p = {"root": str(root), "ae": ae, "cache": cache, "other_ae": tiny_tcae_checkpoint(root / "other.ckpt", seed=1)}

    def copy(name, damage):
        shutil.copytree(cache, root / name)
        damage(root / name)
        p[name] = str(root / name)

    shard = "shard-r0-00000.safetensors"
    copy("cache_truncated", lambda d: (d / shard).write_bytes((d / shard).read_bytes()[:-64]))
    copy("cache_missing", lambda d: os.remove(d / shard))
    copy("cache_unfinished", lambda d: os.remove(d / "metadata.json"))
    copy("cache_miscount", lambda d: (d / "metadata.json").write_text(
        json.dumps({**json.loads((d / "metadata.json").read_text()), "count": 17})))

    def garble(d):
        data = bytearray((d / shard).read_bytes())
        data[-8] ^= 0x40  # one bit of the last stored value: same size, valid header
        (d / shard).write_bytes(bytes(data))
    copy("cache_garbled", garble)

    os.makedirs(root / "dit")
    old = os.getcwd()
    try:
        os.chdir(root / "dit")
        main([re.sub(r"\{(\w+)\}", lambda m: p.get(m[1], m[0]), a) for a in dit(2)])
    finally:
        os.chdir(old)
    os.makedirs(root / "damaged")
    last = (root / "dit" / "runs" / "demo" / "dit_tcae" / "checkpoints" / "last.ckpt").read_bytes()
    (root / "damaged" / "last.ckpt").write_bytes(last[: len(last) // 3])
    (root / "empty").mkdir()
    (root / "empty" / "last.ckpt").write_bytes(b"")
    (root / "ae_truncated.ckpt").write_bytes(open(ae, "rb").read()[:500])
    p.update(dit_truncated=str(root / "damaged" / "last.ckpt"), empty_ckpt=str(root / "empty" / "last.ckpt"),
             ae_truncated=str(root / "ae_truncated.ckpt"), images=str(root / "images"))
    os.makedirs(root / "foreign")
    (root / "foreign" / "model.safetensors").write_bytes(b"weights of something else")
    p["foreign"] = str(root / "foreign")
    os.makedirs(root / "images" / "train" / "a")
    (root / "images" / "train" / "a" / "broken.jpg").write_text("not a jpeg")
    os.makedirs(root / "images" / "val" / "a")
    from PIL import Image
    Image.new("RGB", (40, 40)).save(root / "images" / "val" / "a" / "ok.png")
    return p


def outcome(run, paths, capsys) -> tuple[str, BaseException | None]:
    """(the error text a user sees, the exception) of one case; ('ACCEPTED', None) when nothing complained."""
    fill = lambda s: re.sub(r"\{(\w+)\}", lambda m: paths.get(m[1], m[0]), s)  # noqa: E731
    try:
        if callable(run):
            run(paths)
        else:
            main([fill(a) for a in run])
    except SystemExit as e:
        return capsys.readouterr().err, e
    except Exception as e:
        return f"{type(e).__name__}: {e}", e
    return "ACCEPTED", None


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_gets_one_clear_line(case, paths, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    text, err = outcome(case.run, paths, capsys)
    expected = re.sub(r"\{(\w+)\}", lambda m: paths.get(m[1], m[0]), case.message)
    assert err is not None, f"accepted silently: {case.name}"
    assert isinstance(err, case.error), text
    assert expected in text, text
    if not isinstance(err, SystemExit):
        assert "\n" not in str(err), f"more than one line: {err}"
