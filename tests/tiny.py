"""Tiny networks, data, trainers and checkpoints shared by the tests: CPU, offline, seconds."""
import json
import os
import pathlib

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from tcae_ldm.data.demo import DemoPhotosDataModule
from tcae_ldm.lit.autoencoder import AutoencoderModule
from tcae_ldm.losses.reconstruction import ReconstructionLossConfig
from tcae_ldm.models.tcae import create_tcae

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# CLI overrides that shrink configs/demo/tcae.yaml to a TC-AE-T on 32x32 crops.
TINY = ["--model.init_args.net=TC-AE-T/p4-c16",
        "--model.init_args.net_args={image_size: 32, latent_size: 2}",
        "--model.init_args.loss.disc_channels=8", "--model.init_args.loss.disc_layers=2",
        "--data.init_args.image_size=32", "--data.init_args.train_per_class=2",
        "--data.init_args.val_per_class=1", "--data.init_args.global_batch_size=8",
        "--model.init_args.metrics_fid=random"]  # the demo's demo-classifier needs its weight file

TINY_DCAE = "DC-AE-T/f16c16"  # 32x32 images -> 16x2x2 latents

# A TC-AE-T whose 32x32 images give 16x4x4 latents (latent caches, DiTs).
NET_ARGS = {"image_size": 32, "latent_size": 4}


def tiny_module(**kw):
    """An AutoencoderModule with a TC-AE-T on 32x32 images (2x2x16 latents), GAN from step 0, 4 steps."""
    args = dict(net="TC-AE-T/p4-c16", net_args={"image_size": 32, "latent_size": 2},
                loss=ReconstructionLossConfig(lpips_weight=0.0, gan_weight=0.1, disc_start=0, disc_channels=8,
                                              disc_layers=2),
                optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3), disc_optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3),
                max_steps=4, warmup_steps=2, ema_decay=0.9, metrics_lpips=None)
    return AutoencoderModule(**{**args, **kw})


def tiny_data():
    # 16 crops, one full batch per epoch: the shuffle order cannot change a step
    return DemoPhotosDataModule(image_size=32, train_per_class=2, val_per_class=1, global_batch_size=16, hflip=False)


def tiny_trainer(root, **kw):
    ckpt = ModelCheckpoint(dirpath=os.path.join(root, "ckpt"), save_last=True, enable_version_counter=False,
                           save_on_train_epoch_end=True)
    args = dict(accelerator="cpu", devices=1, max_epochs=-1, logger=False, enable_progress_bar=False,
                enable_model_summary=False, callbacks=[ckpt], default_root_dir=root, num_sanity_val_steps=0,
                check_val_every_n_epoch=100)
    return L.Trainer(**{**args, **kw})


def tiny_tcae_checkpoint(path, seed=0):
    """An AutoencoderModule-shaped checkpoint of a random TC-AE-T (16 x 4 x 4 latents of 32 x 32 images)."""
    torch.manual_seed(seed)
    net = create_tcae("TC-AE-T/p4-c16", **NET_ARGS)
    torch.save({"hyper_parameters": {"net": "TC-AE-T/p4-c16", "net_args": NET_ARGS},
                "state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}}, path)
    return str(path)


def callbacks_arg(every_n_train_steps: int = 1, gen_eval: dict | None = None) -> str:
    """--trainer.callbacks replacing the demo config's list: last.ckpt every N steps, and optionally a
    GenerationEvalCallback with the given init_args (the demo's needs the demo-classifier's weight file)."""
    cbs = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"dirpath": "runs/demo/dit_tcae/checkpoints", "every_n_train_steps": every_n_train_steps,
                          "save_top_k": 0, "save_last": True}}]
    if gen_eval is not None:
        cbs.append({"class_path": "tcae_ldm.lit.generation.GenerationEvalCallback", "init_args": gen_eval})
    return f"--trainer.callbacks={json.dumps(cbs)}"


def tiny_latent_cache(root):
    """(autoencoder checkpoint, latent cache dir): a random TC-AE-T's 16x4x4 latents of the 16 tiny demo crops."""
    from tcae_ldm.lit.caching import cache_latents

    ckpt = tiny_tcae_checkpoint(os.path.join(root, "ae.ckpt"), seed=0)
    images = DemoPhotosDataModule(image_size=32, train_per_class=2, val_per_class=1)
    return ckpt, cache_latents({"kind": "tcae", "path": ckpt}, images, os.path.join(root, "latents"), accelerator="cpu")


def dit_argv(cache: str, ae_ckpt: str, max_steps: int, *extra: str) -> list[str]:
    """`tcae-ldm fit` arguments of the demo DiT config shrunk to a DiT-T/1 on a tiny_latent_cache, batch 8, a
    last.ckpt every step, logging every step (in the folder runs/demo/dit_tcae under the working directory)."""
    return ["fit", "--config", os.path.join(REPO, "configs", "demo", "dit_on_tcae.yaml"), f"--data.cache_dir={cache}",
            "--data.expect_image_size=32", "--data.expect_autoencoder.name=TC-AE-T/p4-c16",
            f"--data.expect_autoencoder.path={ae_ckpt}", "--data.global_batch_size=8", "--model.dit=DiT-T/1",
            "--model.sample_steps=2", "--model.sample_every_n_steps=0", "--model.warmup_steps=3",
            "--trainer.log_every_n_steps=1", f"--trainer.max_steps={max_steps}", *extra]


def isolated_env(**extra: str) -> dict:
    """The environment of a child process, independent of the caller's: one OpenMP / MKL thread (forked ranks
    deadlock in OpenMP when the parent set a larger pool), offline, no inherited Lightning / DDP variables, this
    checkout first on the path."""
    inherited = ("OMP_", "MKL_", "KMP_", "GOMP_", "OPENBLAS_", "PL_", "TORCHELASTIC_")
    ddp = {"LOCAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "MASTER_ADDR",
           "MASTER_PORT"}
    env = {k: v for k, v in os.environ.items() if not k.startswith(inherited) and k not in ddp}
    return {**env, "PYTHONPATH": REPO, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **extra}


def tiny_dit_checkpoint(path):
    """A DiffusionModule-shaped checkpoint of a random DiT-T/1 on 16x4x4 latents, 8 classes."""
    from tcae_ldm.lit.diffusion import DiffusionModule

    module = DiffusionModule(dit="DiT-T/1", dit_args={"class_dropout_prob": 0.1}, latent_shape=(16, 4, 4), num_classes=8)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    return str(path)


class Touch:
    """Unpickling this creates `path`: what a malicious file would do instead."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.path),)
