"""The battery of bad inputs: each row runs one bad input through the public entry point a user would call (the
`tcae-ldm` command line, tcae_ldm.cli.main, or the Python API) and asserts the one clear line it must get.

Adding a case is one row: Case(name, what to run, the text the error must contain). `what to run` is either the
arguments of `tcae-ldm` or a function of the fixture paths; "{name}" in an argument or in the expected text stands
for a path of the `paths` fixture below. A case whose error is SystemExit runs as the `tcae-ldm` executable does
(tcae_ldm.cli.run: what the user's terminal shows), and an expected text that ends in a newline is its whole
stderr (a tiny autoencoder checkpoint, a latent cache and damaged copies of both,
a finished DiT run). Every case runs in its own empty working directory.
"""
import json
import os
import re
import shutil
from dataclasses import dataclass
from typing import Callable
from unittest import mock

import pytest
import torch

from tcae_ldm.cli import main, run
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
from tests.tiny import REPO, TINY, callbacks_arg, dit_argv, tiny_latent_cache, tiny_tcae_checkpoint


@dataclass
class Case:
    name: str
    run: list[str] | Callable[[dict], object]  # tcae-ldm arguments, or a function of the fixture paths
    message: str                                # what the error must say ("{name}": a fixture path)
    error: type = Exception                     # and its type (SystemExit: a command-line error on stderr)


def dit(max_steps=2, *extra):
    """`tcae-ldm fit` of the tiny DiT on {cache} (made by {ae})."""
    return dit_argv("{cache}", "{ae}", max_steps, callbacks_arg(1), *extra)


def ae(*extra):
    """`tcae-ldm fit` of the demo TC-AE config shrunk to a TC-AE-T on 32x32 crops."""
    return ["fit", "--config", os.path.join(REPO, "configs", "demo", "tcae.yaml"), *TINY, *extra]


def without_gpu(argv):
    """The command line on a machine without CUDA (or MPS), whatever this one has."""
    with mock.patch("torch.cuda.is_available", return_value=False), \
            mock.patch("torch.backends.mps.is_available", return_value=False):
        return run(argv)


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
         dit(2, "--data.expect_autoencoder={kind: tcae, nmae: TC-AE-T}"),
         "tcae-ldm fit: error: data.expect_autoencoder: unknown key(s) 'nmae'\n", SystemExit),
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
    # --- values of the wrong type and unknown keys, at any depth of a config
    Case("a value of the wrong type inside net_args", ae("--model.init_args.net_args={image_size: 32, latent_size: two}"),
         "tcae-ldm fit: error: model.net_args.latent_size: expected int, got 'two' (str)\n", SystemExit),
    Case("a value of the wrong type inside net_args (Python)",
         lambda p: AutoencoderModule(net="TC-AE-T/p4-c16", net_args={"qk_norm": "yes"}),
         "TypeError: model.net_args.qk_norm: expected bool, got 'yes' (str)"),
    Case("a value of the wrong type inside dit_args", dit(2, "--model.dit_args={depth: deep}"),
         "tcae-ldm fit: error: model.dit_args.depth: expected int, got 'deep' (str)\n", SystemExit),
    Case("an unknown key inside objective_args", dit(2, "--model.objective_args={time_smapling: uniform}"),
         "tcae-ldm fit: error: model.objective_args: unknown key(s) 'time_smapling'\n", SystemExit),
    Case("objective_args of the other objective", dit(2, "--model.objective_args={num_timesteps: 10}"),
         "tcae-ldm fit: error: objective 'flow' does not take ['num_timesteps'] (objective_args); it takes "
         "['logit_mean', 'logit_std', 'time_sampling']\n", SystemExit),
    Case("a value of the wrong type inside objective_args", dit(2, "--model.objective_args={logit_std: wide}"),
         "tcae-ldm fit: error: model.objective_args.logit_std: expected float, got 'wide' (str)\n", SystemExit),
    Case("a value of the wrong type inside loss", ae("--model.init_args.loss.gan_weight=strong", "--print_config"),
         "tcae-ldm fit: error: model.loss.gan_weight: expected float, got strong\n", SystemExit),
    Case("a value of the wrong type inside ssl", ae("--model.init_args.ssl.out_dim=many", "--print_config"),
         "tcae-ldm fit: error: model.ssl.out_dim: expected int, got many\n", SystemExit),
    Case("an unknown key inside views", ae("--data.init_args.views={global_sise: 32}", "--print_config"),
         "tcae-ldm fit: error: data.views: unknown key 'global_sise'\n", SystemExit),
    Case("a value of the wrong type in a callback", dit(2, "--trainer.callbacks.init_args.every_n_train_steps=often",
                                                        "--print_config"),
         "tcae-ldm fit: error: trainer.callbacks.every_n_train_steps: expected int, got often\n", SystemExit),
    Case("a value of the wrong type inside a typed mapping", dit(2, "--model.autoencoder={kind: tcae, path: a.ckpt, "
                                                                    "dtype: fp16}"),
         "tcae-ldm fit: error: model.autoencoder.dtype: expected one of 'fp32', 'bf16', got fp16\n", SystemExit),
    Case("a required key missing from a typed mapping", dit(2, "--model.autoencoder={kind: tcae, pth: a.ckpt}"),
         "tcae-ldm fit: error: model.autoencoder: missing required key(s) 'path'\n", SystemExit),
    Case("a value that fits no member of a union", ae("--model.init_args.compile=maybe", "--print_config"),
         "tcae-ldm fit: error: model.compile: expected bool or dict, got maybe\n", SystemExit),
    # --- config files
    Case("an empty config file", ["fit", "--config", "{empty_yaml}"],
         "tcae-ldm fit: error: config file {empty_yaml} is empty: a config is a mapping of keys to values (trainer:, "
         "model:, data:, ...)\n", SystemExit),
    Case("a config file that holds a list", ae("--config", "{list_yaml}"),
         "tcae-ldm fit: error: config file {list_yaml} holds a list, not a mapping of keys to values", SystemExit),
    # --- trainer settings the run cannot honour
    Case("the paper's GPU config on a machine without a GPU",
         lambda p: without_gpu(["fit", "--config", os.path.join(REPO, "configs", "tcae.yaml")]),
         "tcae-ldm fit: error: this config runs on a GPU (trainer.accelerator=gpu, trainer.precision=bf16-mixed) and "
         "this machine has no CUDA device; to run it on the CPU add --trainer.accelerator cpu --trainer.precision "
         "32-true --trainer.devices 1 --trainer.strategy auto (slow at full scale: configs/demo/ holds CPU-sized "
         "runs)\n", SystemExit),
    Case("Lightning's gradient clipping on the autoencoder", ae("--trainer.gradient_clip_val=0.5"),
         "tcae-ldm fit: error: trainer.gradient_clip_val=0.5: AutoencoderModule cannot honour it; use "
         "model.init_args.grad_clip (norm clipping per group: encoder, decoder, iBOT heads, critic)\n", SystemExit),
    Case("gradient accumulation on the autoencoder", ae("--trainer.accumulate_grad_batches=4"),
         "AutoencoderModule cannot honour it; use a larger data.init_args.global_batch_size", SystemExit),
    Case("clipping by value on the DiT", dit(2, "--trainer.gradient_clip_algorithm=value"),
         "tcae-ldm fit: error: trainer.gradient_clip_algorithm=value: DiffusionModule cannot honour it; use "
         "model.init_args.grad_clip or trainer.gradient_clip_val, which clip by norm\n", SystemExit),
    # --- where the run writes
    Case("a run folder where a file is", dit(2, "--trainer.logger.init_args.save_dir={a_file}/runs"),
         "the run's folder {a_file}/runs/dit_tcae cannot be written: {a_file} is a file, not a folder", SystemExit),
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
    (root / "empty.yaml").write_text("# nothing but a comment\n")
    (root / "list.yaml").write_text("- trainer\n- model\n")
    (root / "a_file").write_text("where a folder should be")
    p.update(empty_yaml=str(root / "empty.yaml"), list_yaml=str(root / "list.yaml"), a_file=str(root / "a_file"))
    os.makedirs(root / "foreign")
    (root / "foreign" / "model.safetensors").write_bytes(b"weights of something else")
    p["foreign"] = str(root / "foreign")
    os.makedirs(root / "images" / "train" / "a")
    (root / "images" / "train" / "a" / "broken.jpg").write_text("not a jpeg")
    os.makedirs(root / "images" / "val" / "a")
    from PIL import Image
    Image.new("RGB", (40, 40)).save(root / "images" / "val" / "a" / "ok.png")
    return p


def outcome(case, paths, capsys) -> tuple[str, BaseException | None]:
    """(the error text a user sees, the exception) of one case; ('ACCEPTED', None) when nothing complained."""
    fill = lambda s: re.sub(r"\{(\w+)\}", lambda m: paths.get(m[1], m[0]), s)  # noqa: E731
    try:
        if callable(case.run):
            case.run(paths)
        else:
            (run if case.error is SystemExit else main)([fill(a) for a in case.run])
    except SystemExit as e:
        return capsys.readouterr().err, e
    except Exception as e:
        return f"{type(e).__name__}: {e}", e
    return "ACCEPTED", None


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_gets_one_clear_line(case, paths, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    text, err = outcome(case, paths, capsys)
    expected = re.sub(r"\{(\w+)\}", lambda m: paths.get(m[1], m[0]), case.message)
    assert err is not None, f"accepted silently: {case.name}"
    assert isinstance(err, case.error), text
    assert text == expected if expected.endswith("\n") else expected in text, text
    if isinstance(err, SystemExit):
        assert len(text.splitlines()) == 1 and text.startswith("tcae-ldm "), f"not one line: {text}"
    else:
        assert "\n" not in str(err), f"more than one line: {err}"
