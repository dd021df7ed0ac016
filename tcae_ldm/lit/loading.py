"""Loading the modules that a command is given: what a checkpoint file holds, and one clear line when it is not
what the command needs (damaged files are named by tcae_ldm.utils.checkpoints).

Files are read by the project's one loader (tcae_ldm.utils.checkpoints): nothing pickled in them is built unless it
is a tensor, a plain value or a type registered as safe; anything else is refused in one line without being
unpickled (TCAE_LDM_TRUST_PICKLE=1 loads a file the user trusts).

    kind            what it is                                       read by
    "diffusion"     a DiffusionModule checkpoint (tcae-ldm fit on a DiT config)      sample, export
    (a folder)      a DiT written by `tcae-ldm export`: config.json + model.safetensors (EMA weights)   sample
    "official-dit"  a facebookresearch/DiT release (DiT-XL-2-256x256.pt) or train.py checkpoint   sample
    "autoencoder"   an AutoencoderModule checkpoint (TC-AE or DC-AE)   ae-report, diagnose, export
"""
from __future__ import annotations

import json
import os
import zipfile

import torch
from safetensors.torch import load_file, save_file

# importing the autoencoder module registers its config dataclasses as safe to unpickle
from tcae_ldm.lit.autoencoder import AutoencoderModule
from tcae_ldm.lit.diffusion import DiffusionModule
from tcae_ldm.utils.checkpoints import (
    CorruptCheckpointError,
    UntrustedFileError,
    checked,
    checkpoint_damage,
    load_torch_file,
)

DIT_EXPECTED = ("a DiT checkpoint: a DiffusionModule's .ckpt (runs/.../dit_*/checkpoints/last.ckpt), a folder of "
                "`tcae-ldm export` or a facebookresearch/DiT release such as DiT-XL-2-256x256.pt")
DIT_EXPORT_CLASS = "DiffusionModule"  # _class_name in the config.json of an exported DiT
DIT_EXPORT_WEIGHTS = "model.safetensors"
AUTOENCODER_EXPECTED = "an autoencoder checkpoint: an AutoencoderModule's .ckpt (runs/.../tcae/checkpoints/last.ckpt)"


class CheckpointError(ValueError):
    """A checkpoint file that is missing, unreadable or of another kind; the message is one line naming it."""


def read_expected_checkpoint(path: str, expected: str) -> dict:
    """The checkpoint's contents (tensors memory-mapped where possible), or CheckpointError saying what is wrong
    with the file and what `expected` it should have been."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path} does not exist; expected {expected}")
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a folder; expected {expected}")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path} is empty (0 bytes); expected {expected}")
    if zipfile.is_zipfile(path):  # torch.save's archive: its CRCs catch a garbled file that torch.load would accept
        damage = checkpoint_damage(path)
        if damage:
            raise CheckpointError(f"{path} cannot be read: {damage}; expected {expected}")
    try:
        ckpt = load_torch_file(path, what="checkpoint", mmap=True)
    except (UntrustedFileError, CorruptCheckpointError):
        raise
    except Exception as e:  # noqa: BLE001  (whatever torch's readers raise, the file is not a complete torch.save)
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"{path} cannot be read as a checkpoint (truncated, or not written by torch.save: "
                              f"{type(e).__name__}: {reason}); expected {expected}") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint dictionary; expected {expected}")
    return ckpt


def checkpoint_kind(ckpt: dict) -> tuple[str, str]:
    """(kind, a few words on it): 'diffusion', 'official-dit', 'autoencoder' or 'unknown'."""
    hp = ckpt.get("hyper_parameters") or {}
    if "state_dict" in ckpt and "dit" in hp:
        return "diffusion", f"a DiffusionModule checkpoint ({hp['dit']})"
    if "state_dict" in ckpt and "net" in hp:
        return "autoencoder", f"an AutoencoderModule checkpoint ({hp['net']})"
    weights = ckpt.get("ema", ckpt)
    if isinstance(weights, dict) and "x_embedder.proj.weight" in weights:
        return "official-dit", "a facebookresearch/DiT checkpoint"
    keys = sorted(map(str, ckpt))[:5]
    return "unknown", f"a file of neither kind (top-level keys {keys})"


def load_diffusion_module(path: str, autoencoder: dict | None = None) -> DiffusionModule:
    """The DiffusionModule of a DiT checkpoint of this project, of a folder it exported or of a facebookresearch/DiT
    checkpoint; autoencoder: the decoder of an official DiT (default: sd-vae-ft-ema)."""
    if os.path.isdir(path):
        return load_diffusion_export(path)
    ckpt = read_expected_checkpoint(path, DIT_EXPECTED)
    kind, what = checkpoint_kind(ckpt)
    if kind == "official-dit":
        try:
            return DiffusionModule.from_official_dit(ckpt, autoencoder)
        except (KeyError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{path} looks like a facebookresearch/DiT checkpoint but does not load: {e}") from None
    if kind != "diffusion":
        raise CheckpointError(f"{path} is {what}; expected {DIT_EXPECTED}")
    del ckpt
    with checked(path):
        return DiffusionModule.load_from_checkpoint(path, map_location="cpu", weights_only=True)


def load_autoencoder_module(path: str, **overrides) -> AutoencoderModule:
    """The AutoencoderModule of an autoencoder checkpoint; overrides go to load_from_checkpoint (metrics_*...)."""
    kind, what = checkpoint_kind(read_expected_checkpoint(path, AUTOENCODER_EXPECTED))
    if kind != "autoencoder":
        raise CheckpointError(f"{path} is {what}; expected {AUTOENCODER_EXPECTED}")
    with checked(path):
        return AutoencoderModule.load_from_checkpoint(path, map_location="cpu", weights_only=True, **overrides)


#################################################################################
#                           A DiT exported for sampling                         #
#################################################################################

def export_diffusion_module(module: DiffusionModule, folder: str, extra: dict | None = None) -> dict:
    """Write what sampling needs into folder: model.safetensors (the EMA weights, DiT's own keys) and config.json
    (hyper-parameters, the latent statistics, the latent cache's metadata with its autoencoder); returns the config."""
    runtime = ("compile", "compile_decoder", "ema_decay", "ema_warmup")  # training / machine choices, not the model's
    hp = {k: v for k, v in module.hparams.items() if k not in runtime}
    config = {"_class_name": DIT_EXPORT_CLASS, "hyper_parameters": hp,
              "latents_mean": module.normalizer.mean.tolist(), "latents_std": module.normalizer.std.tolist(),
              "latent_cache": module.cache_info, **(extra or {})}
    os.makedirs(folder, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in module.eval_net.state_dict().items()},
              os.path.join(folder, DIT_EXPORT_WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return config


def load_diffusion_export(folder: str) -> DiffusionModule:
    """The DiffusionModule of a folder written by export_diffusion_module (no EMA: its weights are the EMA's)."""
    config_file, weights = os.path.join(folder, "config.json"), os.path.join(folder, DIT_EXPORT_WEIGHTS)
    if not os.path.isfile(config_file) or not os.path.isfile(weights):
        raise CheckpointError(f"{folder} is a folder without config.json and {DIT_EXPORT_WEIGHTS}; expected "
                              f"{DIT_EXPECTED}")
    try:
        with open(config_file) as f:
            config = json.load(f)
    except ValueError as e:
        raise CheckpointError(f"{config_file} is not valid JSON ({e}); expected {DIT_EXPECTED}") from None
    if not isinstance(config, dict) or config.get("_class_name") != DIT_EXPORT_CLASS:
        found = config.get("_class_name") if isinstance(config, dict) else None
        raise CheckpointError(f"{folder} holds a {found or 'model of another kind'}, not an exported DiT; expected "
                              f"{DIT_EXPECTED}")
    hp = dict(config["hyper_parameters"])
    decoder = hp.get("autoencoder")
    if decoder and not os.path.isabs(decoder["path"]) and os.path.exists(os.path.join(folder, decoder["path"])):
        hp["autoencoder"] = {**decoder, "path": os.path.join(os.path.abspath(folder), decoder["path"])}  # its copy
    module = DiffusionModule(**hp, ema_decay=None)
    try:
        module.dit.load_state_dict(load_file(weights))
    except (RuntimeError, OSError) as e:
        raise CheckpointError(f"{weights} does not fit {config['hyper_parameters'].get('dit')} "
                              f"({str(e).strip().splitlines()[0][:200]})") from None
    module.normalizer.mean.copy_(torch.tensor(config["latents_mean"]))
    module.normalizer.std.copy_(torch.tensor(config["latents_std"]))
    module.cache_info = config.get("latent_cache") or {}
    return module
