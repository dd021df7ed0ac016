"""Loading the modules that a command is given: what a checkpoint file holds, and one clear line when it is not
what the command needs (damaged files are named by tcae_ldm.utils.checkpoints).

Files are read with torch.load(weights_only=True): the project's config dataclasses are registered as safe where
they are defined, and facebookresearch/DiT's train.py checkpoints carry an argparse.Namespace, allowed here.
Anything else pickled in the file is refused without being unpickled.

    kind            what it is                                       read by
    "diffusion"     a DiffusionModule checkpoint (tcae-ldm fit on a DiT config)      sample, export
    (a folder)      a DiT written by `tcae-ldm export`: config.json + model.safetensors (EMA weights)   sample
    "official-dit"  a facebookresearch/DiT release (DiT-XL-2-256x256.pt) or train.py checkpoint   sample
    "autoencoder"   an AutoencoderModule checkpoint (TC-AE or DC-AE)   ae-report, diagnose, export
"""
from __future__ import annotations

import argparse
import json
import os
import zipfile

import torch
from safetensors.torch import load_file, save_file

# importing the autoencoder module registers its config dataclasses as safe to unpickle
from tcae_ldm.lit.autoencoder import AutoencoderModule
from tcae_ldm.lit.diffusion import DiffusionModule
from tcae_ldm.utils.checkpoints import checkpoint_damage

ALLOWED_GLOBALS = [argparse.Namespace]  # facebookresearch/DiT train.py saves its args
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
        unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # noqa: BLE001  (whatever torch's readers raise, the file is not a complete torch.save)
        unsafe = None
    allowed = {f"{g.__module__}.{g.__qualname__}" for g in ALLOWED_GLOBALS}
    if unsafe and unsafe - allowed:
        raise CheckpointError(f"{path} holds pickled objects of types {sorted(unsafe - allowed)} that no checkpoint "
                              f"of this project has (it is not loaded); expected {expected}")
    error = None
    for mmap in (True, False):  # files in torch's legacy (non-zip) format cannot be memory-mapped
        try:
            with torch.serialization.safe_globals(ALLOWED_GLOBALS):
                ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            break
        except Exception as e:  # noqa: BLE001
            error = e
    else:
        reason = (str(error).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"{path} cannot be read as a checkpoint (truncated, or not written by torch.save: "
                              f"{type(error).__name__}: {reason}); expected {expected}")
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
    return DiffusionModule.load_from_checkpoint(path, map_location="cpu")


def load_autoencoder_module(path: str, **overrides) -> AutoencoderModule:
    """The AutoencoderModule of an autoencoder checkpoint; overrides go to load_from_checkpoint (metrics_*...)."""
    kind, what = checkpoint_kind(read_expected_checkpoint(path, AUTOENCODER_EXPECTED))
    if kind != "autoencoder":
        raise CheckpointError(f"{path} is {what}; expected {AUTOENCODER_EXPECTED}")
    return AutoencoderModule.load_from_checkpoint(path, map_location="cpu", **overrides)


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
