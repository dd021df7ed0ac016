"""`tcae-ldm export`: TC-AE and DC-AE checkpoints as diffusers folders, a DiT as a folder `sample` reads, model cards,
and the one-line errors."""
import json
import os

import lightning
import numpy as np
import pytest
import torch
from diffusers import AutoencoderDC

from tcae_ldm import AutoencoderTC
from tcae_ldm.cli import main
from tcae_ldm.latents.cache import read_stats
from tcae_ldm.latents.frozen import load_autoencoder
from tcae_ldm.lit.autoencoder import AutoencoderModule
from tcae_ldm.lit.diffusion import DiffusionModule
from tcae_ldm.models.tcae import scalar_latent_scale
from tcae_ldm.losses.reconstruction import ReconstructionLossConfig
from tests.latents.test_frozen import _old_layout_folder
from tests.tiny import TINY_DCAE, tiny_latent_cache

METRICS_CSV = "epoch,step,train/loss_g,val/psnr\n0,3,0.75,\n0,7,0.5,\n0,7,,12.25\n"


def images(n=2, size=32):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1


def _run_checkpoint(root, module, step_count=7, **extra) -> str:
    """An AutoencoderModule / DiffusionModule checkpoint at root/run/checkpoints/last.ckpt, with a metrics.csv beside
    checkpoints/ as the configs' CSV logger leaves it."""
    os.makedirs(root / "run" / "checkpoints")
    (root / "run" / "metrics.csv").write_text(METRICS_CSV)
    path = root / "run" / "checkpoints" / "last.ckpt"
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict(), "step_count": step_count,
                "pytorch-lightning_version": lightning.__version__, **extra}, path)
    return str(path)


def _ema_module(net, **kw):
    """An AutoencoderModule whose EMA weights differ from its online ones."""
    torch.manual_seed(0)
    module = AutoencoderModule(net=net, metrics_lpips=None, ema_decay=0.99,
                               loss=ReconstructionLossConfig(lpips_weight=0.0, gan_weight=0.0), **kw)
    with torch.no_grad():
        for p in module.ema.module.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return module


def test_tc_ae_export_is_a_diffusers_folder_of_the_ema_weights_with_a_card(tmp_path):
    module = _ema_module("TC-AE-T/p4-c16", net_args={"image_size": 32, "latent_size": 4})
    ckpt = _run_checkpoint(tmp_path, module)
    main(["export", "--ckpt", ckpt, "--out", str(tmp_path / "tc")])
    assert sorted(os.listdir(tmp_path / "tc")) == ["README.md", "config.json", "diffusion_pytorch_model.safetensors",
                                                   "tcae.py"]
    ae = AutoencoderTC.from_pretrained(tmp_path / "tc")
    x = images()
    with torch.no_grad():
        z = ae.encode(x).latent
        assert torch.equal(z, module.ema.module.eval().encode(x).latent)   # the EMA weights, bit for bit
        assert torch.equal(ae.decode(z).sample, module.ema.module.decode(z).sample)
    assert ae.config.latents_mean is None and load_autoencoder("tcae", str(tmp_path / "tc")).name == "TC-AE-T/p4-c16"
    card = (tmp_path / "tc" / "README.md").read_text()
    assert "# TC-AE-T/p4-c16 (AutoencoderTC)" in card and 'AutoencoderTC.from_pretrained("tc")' in card
    assert f"| parameters | {sum(p.numel() for p in ae.parameters()) / 1e6:.2f} M |" in card
    assert "| training steps | 7 |" in card and "(EMA weights)" in card and "width=32, num_heads=2" in card
    assert "| val/psnr | 12.25 | 7 | 1 |" in card and "| train/loss_g | 0.5 | 7 | 2 |" in card
    assert "not set (export with --cache CACHE_DIR)" in card
    # the Hub reads the metadata block at the top; a published folder is world-readable
    assert card.startswith("---\nlicense: mit\nlibrary_name: diffusers\ntags:\n- tcae-ldm\n- autoencoder\n- tcae\n---\n# ")
    modes = {f: os.stat(tmp_path / "tc" / f).st_mode & 0o777 for f in os.listdir(tmp_path / "tc")}
    assert set(modes.values()) == {0o644} and os.stat(tmp_path / "tc").st_mode & 0o777 == 0o755


def test_cache_statistics_go_into_the_config_and_a_foreign_cache_is_refused(tmp_path, capsys):
    ckpt, cache = tiny_latent_cache(str(tmp_path))
    main(["export", "--ckpt", ckpt, "--out", str(tmp_path / "tc"), "--cache", cache])
    ae = AutoencoderTC.from_pretrained(tmp_path / "tc")
    mean, std = read_stats(cache)
    assert ae.config.latents_mean == mean.tolist() and ae.config.latents_std == std.tolist()
    assert torch.equal(torch.tensor(ae.config.latents_std), std)  # float32 survives the JSON round trip
    # what diffusers' pipelines read: the pooled scalar version of the same statistics
    assert (ae.config.shift_factor, ae.config.scaling_factor) == scalar_latent_scale(mean.tolist(), std.tolist())
    card = (tmp_path / "tc" / "README.md").read_text()
    assert f"from the latent cache `{cache}` (16 images and their flips)" in card
    # the export's latent space is the cache's: a DiT trained on that cache decodes with it
    assert load_autoencoder("tcae", str(tmp_path / "tc")).identity()["encoder_hash"] == \
        json.load(open(os.path.join(cache, "metadata.json")))["autoencoder"]["encoder_hash"]

    other = _run_checkpoint(tmp_path, _ema_module("TC-AE-T/p4-c16", net_args={"image_size": 32, "latent_size": 4}))
    with pytest.raises(SystemExit) as err:
        main(["export", "--ckpt", other, "--out", str(tmp_path / "other"), "--cache", cache])
    assert f"latent cache {cache} was made by tcae 'TC-AE-T/p4-c16'" in str(err.value)
    assert "its statistics describe other latents" in str(err.value) and "\n" not in str(err.value)
    assert not os.path.exists(tmp_path / "other") and [p for p in os.listdir(tmp_path) if "partial" in p] == []


def test_dc_ae_export_is_an_autoencoder_dc_folder(tmp_path):
    from tcae_ldm.data.demo import DemoPhotosDataModule
    from tcae_ldm.lit.caching import cache_latents

    module = _ema_module(TINY_DCAE)
    # Lightning's layout: global_step counts both optimizers' steps, metrics.csv the batches that stepped (3)
    ckpt = _run_checkpoint(tmp_path, module, step_count=3, global_step=14,
                           loops={"fit_loop": {"epoch_loop.state_dict": {"_batches_that_stepped": 3}}})
    cache = cache_latents({"kind": "dcae", "path": ckpt}, DemoPhotosDataModule(image_size=32, train_per_class=1,
                                                                             val_per_class=1),
                          str(tmp_path / "latents"), accelerator="cpu")
    main(["export", "--ckpt", ckpt, "--out", str(tmp_path / "dc"), "--cache", cache])
    # requires_grad as the EMA copy's: CPU convolutions of weights that require grad take another kernel path
    ae = AutoencoderDC.from_pretrained(tmp_path / "dc").requires_grad_(False)
    assert all(torch.equal(v, module.ema.module.state_dict()[k]) for k, v in ae.state_dict().items())
    x = images()
    with torch.no_grad():
        assert torch.equal(ae.encode(x).latent, module.ema.module.eval().encode(x).latent)
    card = (tmp_path / "dc" / "README.md").read_text()
    assert f"# {TINY_DCAE} (AutoencoderDC)" in card and "from diffusers import AutoencoderDC" in card
    assert "| training steps | 3 |" in card and "encoder_block_out_channels=[8, 16, 32, 32, 64]" in card
    assert ae.config.latents_mean == read_stats(cache)[0].tolist()  # kept in the config, beside diffusers' own keys
    assert "(8 images and their flips)" in card
    assert "| train/loss_g | 0.75 | 3 | 1 |" in card and "val/psnr" not in card  # nothing logged after step 3


def test_a_folder_of_the_earlier_layout_is_converted(tmp_path):
    module = _ema_module("TC-AE-T/p4-c16", net_args={"image_size": 32, "latent_size": 4})
    old = _old_layout_folder(load_autoencoder("tcae", _run_checkpoint(tmp_path, module)), tmp_path / "old")
    main(["export", "--ckpt", old, "--out", str(tmp_path / "new")])
    ae = AutoencoderTC.from_pretrained(tmp_path / "new")
    with torch.no_grad():
        assert torch.equal(ae.encode(images()).latent, module.ema.module.eval().encode(images()).latent)
    assert "not recorded in a folder" in (tmp_path / "new" / "README.md").read_text()


@pytest.fixture
def dit_run(tmp_path):
    """A DiffusionModule checkpoint on a tiny TC-AE cache whose EMA weights differ from its online ones."""
    _, cache = tiny_latent_cache(str(tmp_path))
    torch.manual_seed(0)
    module = DiffusionModule(dit="DiT-T/1", dit_args={"class_dropout_prob": 0.1}, latent_shape=(16, 4, 4),
                             num_classes=8, sample_steps=2, ema_decay=0.9)
    module.set_decoder(cache_dir=cache)  # its statistics and metadata, as configure_model takes them from the cache
    with torch.no_grad():
        for p in module.ema.module.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return _run_checkpoint(tmp_path, module, latent_cache=module.cache_info, global_step=5, images_seen=40), module


def test_a_dit_export_stands_alone_and_samples_as_its_checkpoint_does(dit_run, tmp_path):
    """The export holds a copy of its decoder, named relatively: moved to another place, and with the decoder it
    was trained with gone, it samples with no other flag; the checkpoint itself then names the flag that supplies
    one."""
    ckpt, module = dit_run
    main(["export", "--ckpt", ckpt, "--out", str(tmp_path / "dit")])
    assert sorted(os.listdir(tmp_path / "dit")) == ["README.md", "autoencoder", "config.json", "model.safetensors"]
    assert json.loads((tmp_path / "dit" / "config.json").read_text())["hyper_parameters"]["autoencoder"] == \
        {"kind": "tcae", "path": "autoencoder", "dtype": "fp32"}
    card = (tmp_path / "dit" / "README.md").read_text()
    assert card.startswith("---\nlicense: mit\nlibrary_name: tcae-ldm\ntags:\n- tcae-ldm\n- dit\n")
    assert "# DiT-T/1 on 16x4x4 latents" in card and "| training steps | 5 (40 images seen) |" in card
    assert "(EMA weights)" in card and "tcae 'TC-AE-T/p4-c16'" in card and "| decoder | `autoencoder/`" in card
    # only what was logged at or before the exported step 5: train/loss_g of step 3, no val/psnr (step 7)
    assert "| train/loss_g | 0.75 | 3 | 1 |" in card and "val/psnr" not in card and "at or before step 5" in card
    modes = {os.stat(os.path.join(r, f)).st_mode & 0o777 for r, _, fs in os.walk(tmp_path / "dit") for f in fs}
    assert modes == {0o644}

    common = ["--num", "3", "--labels", "1,2", "--steps", "2", "--batch-size", "2"]
    main(["sample", "--ckpt", ckpt, "--out", str(tmp_path / "a"), *common])
    os.rename(tmp_path / "ae.ckpt", tmp_path / "elsewhere.ckpt")  # the training machine's decoder is not here
    os.makedirs(tmp_path / "machine2")
    os.rename(tmp_path / "dit", tmp_path / "machine2" / "dit")
    main(["sample", "--ckpt", str(tmp_path / "machine2" / "dit"), "--out", str(tmp_path / "b"), *common])
    a, b = (np.load(tmp_path / d / "samples_3x32x32x3.npz") for d in ("a", "b"))
    assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["labels"], b["labels"])
    assert a["arr_0"].std() > 0
    with pytest.raises(SystemExit) as err:
        main(["sample", "--ckpt", ckpt, "--out", str(tmp_path / "c"), *common])
    assert f"the decoder of these latents (tcae {tmp_path / 'ae.ckpt'}) is not here" in str(err.value)
    assert "give it with --autoencoder-kind tcae --autoencoder-path PATH" in str(err.value)
    with pytest.raises(SystemExit) as err:  # nor can it be exported without one
        main(["export", "--ckpt", ckpt, "--out", str(tmp_path / "dit2")])
    assert "--autoencoder-kind tcae --autoencoder-path PATH" in str(err.value) and not os.path.exists(tmp_path / "dit2")
    main(["export", "--ckpt", ckpt, "--out", str(tmp_path / "dit2"), "--autoencoder-kind", "tcae",
          "--autoencoder-path", str(tmp_path / "elsewhere.ckpt")])
    assert os.path.isdir(tmp_path / "dit2" / "autoencoder")


def test_errors_are_one_line_and_keep_what_exists(dit_run, tmp_path, capsys):
    ckpt, _ = dit_run
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit) as err:
        main(["export", "--ckpt", ckpt, "--out", str(tmp_path / "full")])
    assert str(err.value) == (f"tcae-ldm export: error: {tmp_path / 'full'} already exists and is not empty: choose "
                              f"another --out or pass --overwrite")
    assert os.listdir(tmp_path / "full") == ["keep.txt"]
    with pytest.raises(SystemExit) as err:
        main(["export", "--ckpt", ckpt, "--out", str(tmp_path / "x"), "--cache", str(tmp_path)])
    assert "--cache is for autoencoders" in str(err.value)
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit) as err:
        main(["export", "--ckpt", str(tmp_path / "junk.ckpt"), "--out", str(tmp_path / "x")])
    assert "junk.ckpt cannot be read as a checkpoint" in str(err.value) and not os.path.exists(tmp_path / "x")
    main(["export", "--ckpt", ckpt, "--out", str(tmp_path / "full"), "--overwrite"])  # replaced once complete
    assert "keep.txt" not in os.listdir(tmp_path / "full")

    (tmp_path / "full" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderTC"}))
    with pytest.raises(SystemExit) as err:
        main(["sample", "--ckpt", str(tmp_path / "full"), "--out", str(tmp_path / "s")])
    assert "holds a AutoencoderTC, not an exported DiT" in str(err.value)


def test_export_never_deletes_a_checkpoint(tmp_path):
    """--out that holds the checkpoint being exported, or any .ckpt, is refused even with --overwrite."""
    ckpts = tmp_path / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    ckpt = ckpts / "last.ckpt"
    ckpt.write_bytes(b"weights")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "sub").mkdir()
    (tmp_path / "old" / "sub" / "best.ckpt").write_bytes(b"other weights")
    for out, why in [(ckpts, f"holds the checkpoint being exported ({ckpt})"),
                     (tmp_path / "run", f"holds the checkpoint being exported ({ckpt})"),
                     (tmp_path / "old", f"holds a checkpoint ({tmp_path / 'old' / 'sub' / 'best.ckpt'})")]:
        with pytest.raises(SystemExit) as err:
            main(["export", "--ckpt", str(ckpt), "--out", str(out), "--overwrite"])
        assert str(err.value) == (f"tcae-ldm export: error: --out {out} {why}, which replacing the folder would "
                                  f"delete: choose an --out that holds no checkpoint")
    assert ckpt.read_bytes() == b"weights" and (tmp_path / "old" / "sub" / "best.ckpt").read_bytes() == b"other weights"
