"""DC-AE presets: AutoencoderDC's architecture and weights, trained by AutoencoderModule with TC-AE's losses,
loaded frozen for caching, and evaluated by `tcae-ldm validate` / `test` with rFID."""
import csv
import os

import lightning as L
import pytest
import torch
from diffusers import AutoencoderDC

from tcae_ldm.cli import lightning_main
from tcae_ldm.data.demo import DemoPhotosDataModule
from tcae_ldm.lit.autoencoder import AutoencoderModule
from tcae_ldm.losses.reconstruction import ReconstructionLossConfig
from tcae_ldm.metrics.flops import count_params
from tcae_ldm.models.autoencoders import DCAEAutoencoder, load_autoencoder
from tcae_ldm.models.dcae import DCAE_PRESETS, create_dcae
from tcae_ldm.models.zoo import autoencoder_family, create_autoencoder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "DC-AE-T/f16c16"


def test_presets_give_the_papers_latent_shapes():
    net = create_autoencoder("DC-AE-S/f16c32")
    x = torch.randn(2, 3, 64, 64)
    x_rec, z = net(x)
    assert z.shape == (2, 32, 4, 4) and x_rec.shape == x.shape
    assert net.latent_shape(64) == (32, 4, 4)
    with torch.device("meta"):
        big = create_autoencoder("DC-AE/f32c32")
    assert big.latent_shape(256) == (32, 8, 8)                     # the same 8x8x32 latent as TC-AE's 8x8 grid
    assert abs(count_params(big) / 1e6 - 323.4) < 0.1               # the published f32c32's size
    with pytest.raises(ValueError, match="not divisible by DC-AE's downsampling factor 32"):
        big.latent_shape(240)


def test_state_dict_and_maths_are_autoencoder_dc():
    torch.manual_seed(0)
    net = create_dcae(TINY)
    ref = AutoencoderDC(**DCAE_PRESETS[TINY]).eval()
    assert sorted(net.state_dict()) == sorted(ref.state_dict())
    ref.load_state_dict(net.state_dict())
    net.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        z = net.encode(x)
        assert torch.equal(z, ref.encode(x).latent)
        assert torch.equal(net.decode(z), ref.decode(z).sample)
        assert torch.equal(net.to_diffusers().eval().encode(x).latent, z)
    assert net.last_layer is net.decoder.conv_out.conv.weight       # pixel-shuffle output block at f16


def test_pretrained_weights_load_and_a_foreign_config_is_refused(tmp_path):
    torch.manual_seed(0)
    AutoencoderDC(**DCAE_PRESETS[TINY]).save_pretrained(tmp_path / "dcae")
    net = create_dcae(TINY, pretrained=str(tmp_path / "dcae"))
    saved = AutoencoderDC.from_pretrained(tmp_path / "dcae").state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in net.state_dict().items())
    with pytest.raises(ValueError, match=r"does not match preset 'DC-AE-S/f16c32' in \[.*'encoder_block_out_channels'"):
        create_dcae("DC-AE-S/f16c32", pretrained=str(tmp_path / "dcae"))


def test_families_and_bad_names():
    assert autoencoder_family("TC-AE-B/p8-c128") == "tcae" and autoencoder_family("DC-AE/f32c32") == "dcae"
    with pytest.raises(KeyError, match="unknown autoencoder preset 'DC-AE/f64c128'"):
        create_autoencoder("DC-AE/f64c128")
    with pytest.raises(ValueError, match="iBOT reads the tokens of a ViT encoder; DC-AE-T/f16c16 is a convolutional"):
        AutoencoderModule(net=TINY, loss=ReconstructionLossConfig(lpips_weight=0.0), ssl={}, metrics_lpips=None)


def test_module_trains_a_dcae_whose_checkpoint_loads_frozen(tmp_path):
    L.seed_everything(0)
    module = AutoencoderModule(
        net=TINY, loss=ReconstructionLossConfig(lpips_weight=0.0, gan_weight=0.1, disc_start=0, disc_channels=8,
                                                disc_layers=2),
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3), disc_optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3),
        max_steps=2, ema_decay=0.9, metrics_lpips=None, metrics_fid="random")
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=-1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
                        check_val_every_n_epoch=100, default_root_dir=str(tmp_path))
    trainer.fit(module, DemoPhotosDataModule(image_size=32, train_per_class=2, val_per_class=1, global_batch_size=16))
    changed = {k for k, v in module.state_dict().items() if not torch.equal(before[k], v)}
    for part in ("net.encoder.", "net.decoder.", "loss.discriminator.", "ema.module."):
        assert any(k.startswith(part) for k in changed), part     # the same losses train every part
    ckpt = str(tmp_path / "dcae.ckpt")
    trainer.save_checkpoint(ckpt)

    frozen = load_autoencoder("dcae", ckpt)
    assert isinstance(frozen, DCAEAutoencoder) and frozen.name == TINY
    assert frozen.latent_shape(32) == (16, 2, 2)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(frozen.encode(x), module.eval_net.eval().encode(x))  # the EMA weights, as validation
    assert frozen.gmacs(32) > 0
    with pytest.raises(ValueError, match="holds a DC-AE-T/f16c16 autoencoder, not a tcae one: load it with kind 'dcae'"):
        load_autoencoder("tcae", ckpt)


def _read_metrics(path):
    with open(path) as f:
        rows = list(csv.DictReader(f))
    return {k: float(v) for row in rows for k, v in row.items() if v not in ("", None)}


@pytest.mark.parametrize("subcommand", ["validate", "test"])
def test_cli_evaluates_a_pretrained_dcae_with_rfid(subcommand, tmp_path):
    """`tcae-ldm validate|test` on a DC-AE config: rFID (named by its network), PSNR and SSIM, no training."""
    torch.manual_seed(0)
    AutoencoderDC(**DCAE_PRESETS[TINY]).save_pretrained(tmp_path / "dcae")
    lightning_main([subcommand, "--config", os.path.join(REPO, "configs/demo/dcae.yaml"),
                    f"--model.init_args.net={TINY}", f"--model.init_args.net_args={{pretrained: {tmp_path / 'dcae'}}}",
                    "--model.init_args.metrics_fid=random", "--model.init_args.ema_decay=null",
                    "--model.init_args.loss.disc_channels=8", "--data.init_args.image_size=32",
                    "--data.init_args.train_per_class=1", "--data.init_args.val_per_class=2",
                    f"--trainer.logger.init_args.save_dir={tmp_path}"])
    metrics = _read_metrics(tmp_path / "dcae" / "metrics.csv")
    prefix = "val" if subcommand == "validate" else "test"
    assert {f"{prefix}/rfid_random", f"{prefix}/psnr", f"{prefix}/ssim"} <= set(metrics)
    assert metrics[f"{prefix}/rfid_random"] > 0 and 0 < metrics[f"{prefix}/psnr"] < 60
