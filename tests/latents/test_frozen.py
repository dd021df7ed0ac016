"""The frozen-autoencoder interface: TC-AE export / import, EMA preference, DC-AE wrapper, identities."""
import importlib.metadata
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from tcae_ldm.latents.frozen import (
    DCAEAutoencoder,
    TCAEAutoencoder,
    identity_mismatch,
    load_autoencoder,
    tcae_config,
)
from tcae_ldm.models.tcae import AutoencoderTC

NET, NET_ARGS = "TC-AE-T/p4-c16", {"image_size": 32, "latent_size": 4}


TINY_DCAE = dict(latent_channels=8, attention_head_dim=8, encoder_block_types=("ResBlock", "EfficientViTBlock"),
                 decoder_block_types=("ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(16, 32),
                 decoder_block_out_channels=(16, 32), encoder_layers_per_block=(1, 1),
                 decoder_layers_per_block=(1, 1), encoder_qkv_multiscales=((), (5,)),
                 decoder_qkv_multiscales=((), (5,)), decoder_norm_types="rms_norm", decoder_act_fns="silu",
                 scaling_factor=0.41)


def images(n=2, size=32):
    torch.manual_seed(1)
    return torch.rand(n, 3, size, size) * 2 - 1


@pytest.fixture
def module_checkpoint(tmp_path):
    """A real AutoencoderModule's hyper-parameters and state dict, with EMA weights unlike the online ones."""
    from tcae_ldm.lit.autoencoder import AutoencoderModule
    from tcae_ldm.losses.reconstruction import ReconstructionLossConfig

    torch.manual_seed(0)
    module = AutoencoderModule(net=NET, net_args=NET_ARGS, metrics_lpips=None, ema_decay=0.99,
                               loss=ReconstructionLossConfig(lpips_weight=0.0, gan_weight=0.0))
    with torch.no_grad():
        for p in module.ema.module.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = tmp_path / "ae.ckpt"
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}, path)
    return str(path), module


def test_checkpoint_loads_ema_weights_frozen(module_checkpoint):
    path, module = module_checkpoint
    ae = load_autoencoder("tcae", path)
    assert isinstance(ae, TCAEAutoencoder) and ae.name == NET
    x = images()
    torch.testing.assert_close(ae.encode(x), module.ema.module.encode(x).latent)
    assert not torch.allclose(ae.encode(x), module.net.encode(x).latent)
    assert ae.latent_shape(32) == (16, 4, 4) == tuple(ae.encode(x).shape[1:])
    ae.train()
    assert not ae.training and not ae.model.training  # Lightning's .train() does not unfreeze it
    assert not any(p.requires_grad for p in ae.parameters())
    assert not ae.encode(x.requires_grad_()).requires_grad

    state = torch.load(path, weights_only=False)  # without EMA the online weights are used
    state["state_dict"] = {k: v for k, v in state["state_dict"].items() if not k.startswith("ema.")}
    torch.save(state, path)
    torch.testing.assert_close(load_autoencoder("tcae", path).encode(x), module.net.encode(x).latent)


def test_save_pretrained_round_trip(module_checkpoint, tmp_path):
    ae = load_autoencoder("tcae", module_checkpoint[0])
    ae.save_pretrained(tmp_path / "export")
    assert sorted(os.listdir(tmp_path / "export")) == ["config.json", "diffusion_pytorch_model.safetensors", "tcae.py"]
    back = load_autoencoder("tcae", str(tmp_path / "export"))
    x = images()
    assert torch.equal(back.encode(x), ae.encode(x)) and torch.equal(back.decode(ae.encode(x)), ae.decode(ae.encode(x)))
    same = {k: v for k, v in ae.identity().items() if k != "path"}
    assert {k: v for k, v in back.identity().items() if k != "path"} == same and back.name == NET

    # The folder is a plain diffusers model: AutoencoderTC.from_pretrained alone reads it.
    with open(tmp_path / "export" / "config.json") as f:
        config = json.load(f)
    assert config["_class_name"] == "AutoencoderTC" and config["_preset"] == NET
    # ... besides the latent statistics (and the scalars pipelines read) and AutoModel's auto_map
    described = ("latents_mean", "latents_std", "scaling_factor", "shift_factor", "auto_map")
    assert {k: v for k, v in config.items() if not k.startswith("_") and k not in described} == \
        tcae_config(NET, NET_ARGS)
    net = AutoencoderTC.from_pretrained(tmp_path / "export")
    with torch.no_grad():
        assert torch.equal(net.encode(x).latent, ae.encode(x))


def _old_layout_folder(ae, path):
    """A folder as save_pretrained wrote it before AutoencoderTC: config.json (_class_name TCAE) + model.safetensors."""
    os.makedirs(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"_class_name": "TCAE", "_preset": ae.name, **ae.config}, f, indent=2)
    save_file({k: v.contiguous() for k, v in ae.model.state_dict().items()}, os.path.join(path, "model.safetensors"),
              metadata={"format": "pt"})
    return str(path)


def test_folders_of_the_earlier_layout_still_load(module_checkpoint, tmp_path):
    ae = load_autoencoder("tcae", module_checkpoint[0])
    old = _old_layout_folder(ae, tmp_path / "old")
    back = load_autoencoder("tcae", old)
    x = images()
    assert torch.equal(back.encode(x), ae.encode(x)) and back.name == NET
    assert back.identity()["config_hash"] == ae.identity()["config_hash"]
    with pytest.raises(OSError, match=f"convert it with `tcae-ldm export --ckpt {old} --out NEW_FOLDER`"):
        AutoencoderTC.from_pretrained(old)


def test_folders_that_are_not_a_tc_ae_are_one_line(tmp_path):
    DCAEAutoencoder.from_config(TINY_DCAE).save_pretrained(tmp_path / "dcae")
    with pytest.raises(ValueError, match="describes a AutoencoderDC, not a TC-AE .*'dcae' for AutoencoderDC"):
        load_autoencoder("tcae", str(tmp_path / "dcae"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json: expected a TC-AE folder written by `tcae-ldm export`"):
        load_autoencoder("tcae", str(tmp_path / "empty"))
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderTC"}))
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model"):
        load_autoencoder("tcae", str(tmp_path / "noweights"))


def test_bf16_autocast_returns_fp32(module_checkpoint):
    ae = load_autoencoder("tcae", module_checkpoint[0], dtype="bf16")
    z = ae.encode(images())
    assert z.dtype == torch.float32 and ae.decode(z).dtype == torch.float32
    torch.testing.assert_close(z, load_autoencoder("tcae", module_checkpoint[0]).encode(images()), atol=0.1, rtol=0.1)
    with pytest.raises(ValueError, match="dtype"):
        load_autoencoder("tcae", module_checkpoint[0], dtype="fp16")


def test_dcae_wrapper_from_config():
    torch.manual_seed(0)
    ae = DCAEAutoencoder.from_config(TINY_DCAE)
    x = images()
    z = ae.encode(x)
    assert ae.latent_shape(32) == (8, 16, 16) == tuple(z.shape[1:])
    assert ae.decode(z).shape == x.shape
    # Raw latents: the published scaling_factor is not applied (cache statistics normalise instead).
    torch.testing.assert_close(z, ae.model.encode(x).latent)
    ident = ae.identity()
    assert ident["kind"] == "dcae" and not any(k.startswith("_") for k in ident["config"])
    with pytest.raises(ValueError, match="not divisible"):
        ae.latent_shape(33)


def test_missing_models_give_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(FileNotFoundError, match="mit-han-lab/dc-ae-f32c32-in-1.0-diffusers") as err:
        load_autoencoder("dcae", "mit-han-lab/dc-ae-f32c32-in-1.0-diffusers")
    assert "`hf download mit-han-lab/dc-ae-f32c32-in-1.0-diffusers`" in str(err.value) and "local folder" in str(err.value)
    hub = importlib.metadata.distribution("huggingface_hub")  # the command the hint names is the installed one's
    assert "hf" in {ep.name for ep in hub.entry_points if ep.group == "console_scripts"}
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_autoencoder("tcae", str(tmp_path / "missing.ckpt"))
    with pytest.raises(ValueError, match="'tcae', 'dcae' or 'sdvae'"):
        load_autoencoder("vqgan", "x")
    with pytest.raises(FileNotFoundError, match="SD-VAE 'stabilityai/sd-vae-ft-ema' could not be loaded offline") as err:
        load_autoencoder("sdvae", "stabilityai/sd-vae-ft-ema")
    assert "hf download stabilityai/sd-vae-ft-ema" in str(err.value) and "local folder" in str(err.value)


TINY_SDVAE = dict(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4, latent_channels=4,
                  sample_size=32)


def test_sdvae_from_a_diffusers_folder(tmp_path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(**TINY_SDVAE).save_pretrained(tmp_path / "vae")
    ae = load_autoencoder("sdvae", str(tmp_path / "vae"))
    x = images()
    z = ae.encode(x)
    assert ae.latent_shape(32) == (4, 16, 16) == tuple(z.shape[1:])  # two blocks: one halving
    torch.testing.assert_close(z, ae.model.encode(x).latent_dist.mean)  # raw latents, deterministic
    assert ae.decode(z).shape == x.shape
    assert ae.identity()["kind"] == "sdvae" and ae.spec()["kind"] == "sdvae"


def test_identity_matching():
    actual = {"kind": "tcae", "name": NET, "config_hash": "a" * 64, "weights_hash": "b" * 64, "path": "/x/ae.ckpt"}
    assert identity_mismatch({"kind": "tcae"}, actual) == []
    assert identity_mismatch({"kind": "tcae", "name": NET, "weights_hash": "b" * 64}, actual) == []
    assert identity_mismatch({"kind": "dcae", "weights_hash": "c" * 64}, actual) == ["kind", "weights_hash"]
    assert identity_mismatch({"path": "/x/other.ckpt"}, actual) == ["path"]

