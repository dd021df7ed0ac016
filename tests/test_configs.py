"""Every shipped config parses and resolves; the small ones also build their model."""
import glob
import os

import pytest
import torch

from tcae_ldm.cli import lightning_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASES = {"configs/ablations": "configs/tcae.yaml", "configs/ablations/demo": "configs/demo/tcae.yaml"}


def _stack(path):
    """Overlays (configs/ablations/...) are used on top of their base config."""
    rel = os.path.relpath(path, REPO)
    base = BASES.get(os.path.dirname(rel))
    return (["--config", os.path.join(REPO, base)] if base else []) + ["--config", path]


def _subcommand(path):
    return "predict" if "cache_latents" in os.path.basename(path) else "fit"


CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.relpath(p, REPO))
def test_config_parses_and_prints(path, capsys):
    with pytest.raises(SystemExit) as exit_:
        lightning_main([_subcommand(path), *_stack(path), "--print_config"])
    assert exit_.value.code in (0, None)
    assert "class_path" in capsys.readouterr().out


@pytest.mark.parametrize("path", [p for p in CONFIGS if "/ablations/" in p or p.endswith(("configs/tcae.yaml",
                                                                                            "tcae_decoder_ft.yaml"))],
                         ids=lambda p: os.path.relpath(p, REPO))
def test_autoencoder_configs_build_their_model(path):
    """Instantiate the module on the meta device (no memory, no init cost): geometry errors surface here."""
    with torch.device("meta"):
        cli = lightning_main([*_stack(path), "--model.init_args.loss.lpips_weight=0",
                              "--model.init_args.metrics_lpips=null", "--model.init_args.metrics_fid=null",
                              "--model.init_args.init_from=null",
                              "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto",
                              "--trainer.precision=32-true"], run=False)
    net = cli.model.net
    c, h, w = net.latent_shape()
    assert h == w == net.latent_size


@pytest.mark.slow
@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "configs", "ablations", "demo", "*.yaml"))),
                         ids=os.path.basename)
def test_demo_ablation_twins_train_through_the_cli(path, tmp_path):
    """Each demo twin of the ablation grid trains two steps through the CLI (tiny data, same overlays)."""
    out = str(tmp_path)
    lightning_main(["fit", *_stack(path), "--model.init_args.max_steps=2", "--data.init_args.train_per_class=2",
                    "--data.init_args.val_per_class=1", "--data.init_args.global_batch_size=8",
                    "--model.init_args.metrics_fid=random", "--trainer.check_val_every_n_epoch=1", f"--trainer.logger.init_args.save_dir={out}"])
    name = os.path.splitext(os.path.basename(path))[0]
    ckpt = torch.load(os.path.join(out, f"ablation_{name}", "checkpoints", "last.ckpt"), weights_only=False)
    assert ckpt["step_count"] == 2
    has_ssl = any(k.startswith("ssl.") for k in ckpt["state_dict"])
    assert has_ssl == (name not in ("stc_only", "none"))
