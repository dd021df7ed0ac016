"""Preflight: before the first training step, check everything a long run will need and report ALL that is missing
in one message, instead of one failure per restart (some of them hours into the run).

Checked: pretrained weight files (LPIPS' VGG16, the FID networks of validation and of the generation callback,
DC-AE), the generation callback's reference statistics, init_from, the data root or the latent cache (metadata
and shards), the autoencoder a DiT run decodes with or expects, that the run's folder and its checkpoint folders
can be written, and free disk for the checkpoints the run will keep at its configured frequency. The modules call preflight() from prepare_data, which Lightning runs before
any datamodule or module setup.
"""
from __future__ import annotations

import inspect
import os
import shutil
import tempfile

import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from tcae_ldm.latents.cache import read_metadata
from tcae_ldm.latents.checks import cache_problems
from tcae_ldm.lit.outputs import log_dir
from tcae_ldm.losses.lpips import default_vgg16_path
from tcae_ldm.metrics.features import DEMO_CLASSIFIER_FILE, INCEPTION_FILE
from tcae_ldm.utils.checkpoints import checkpoint_damage
from tcae_ldm.utils.files import torch_hub_file

FEATURE_FILES = {"inception": INCEPTION_FILE, "inception-v3-compat": INCEPTION_FILE, "inception-v3": INCEPTION_FILE,
                 "demo-classifier": DEMO_CLASSIFIER_FILE}


class PreflightError(RuntimeError):
    """What a run needs and does not have, all of it, found before the first step."""


def preflight(trainer) -> None:
    """Raise PreflightError listing every problem of a `fit` run (other stages report their own errors)."""
    if trainer is None or trainer.state.fn != "fit":
        return
    problems = run_problems(trainer)
    if problems:
        items = "; ".join(f"({i}) {p}" for i, p in enumerate(problems, 1))
        raise PreflightError(f"this run cannot start, {len(problems)} problem(s) found before the first step: {items}")


def run_problems(trainer) -> list[str]:
    module, dm = trainer.lightning_module, trainer.datamodule
    problems = _module_problems(module) + _data_problems(dm)
    for cb in trainer.callbacks:
        if hasattr(cb, "reference_stats") and hasattr(cb, "features"):  # GenerationEvalCallback
            name = type(cb).__name__
            if not os.path.isfile(cb.reference_stats):
                problems.append(f"{name}.reference_stats {cb.reference_stats} does not exist (make it with "
                                f"`tcae-ldm fid-stats`)")
            problems += _feature_problem(cb.features, cb.features_weights, f"{name}.features_weights")
    problems += _disk_problems(trainer, module, dm)
    return problems


# ---------------------------------------------------------------------------------------------------- files
def _weights_problem(path: str, what: str) -> list[str]:
    return [] if os.path.isfile(path) else [f"{what} needs the weight file {path}, which does not exist"]


def _feature_problem(name: str | None, weights: str | None, key: str) -> list[str]:
    if not name or name not in FEATURE_FILES:
        return []
    return _weights_problem(weights or torch_hub_file(FEATURE_FILES[name]), f"the {name} FID network ({key})")


def _lpips_problem(trunk: str | None, key: str) -> list[str]:
    if not trunk or trunk == "random":
        return []
    return _weights_problem(default_vgg16_path() if trunk == "pretrained" else trunk, f"LPIPS ({key})")


def _checkpoint_problem(path: str, key: str) -> list[str]:
    if not os.path.isfile(path):
        return [f"{key} {path} does not exist"]
    why = checkpoint_damage(path)
    return [] if why is None else [f"{key} {path} cannot be read: {why}"]


def _autoencoder_problem(spec: dict | None, key: str) -> list[str]:
    """A frozen autoencoder {kind, path}: a checkpoint file or folder, or (DC-AE) a Hub id in the local cache."""
    if not spec or not spec.get("path"):
        return []
    path = str(spec["path"])
    if os.path.isfile(path):
        return _checkpoint_problem(path, key) if path.endswith(".ckpt") else []
    if os.path.isdir(path) or spec.get("kind") != "dcae" or os.path.isabs(path) or path.startswith("."):
        return [] if os.path.exists(path) else [f"{key} {path} does not exist"]
    return _hub_problem(path, key)


def _hub_problem(repo_id: str, key: str) -> list[str]:
    from huggingface_hub import try_to_load_from_cache

    from tcae_ldm.models.dcae import hf_offline

    if not hf_offline() or isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
        return []
    return [f"{key} {repo_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set "
            f"(`hf download {repo_id}` where the Hub is reachable, or give a local folder)"]


def _module_problems(module) -> list[str]:
    hp = getattr(module, "hparams", {})
    problems = []
    if "metrics_lpips" in hp:  # AutoencoderModule
        # The built loss, not hparams["loss"]: from a config that is a dict, and absent it means the defaults.
        loss = getattr(module, "loss", None)
        if getattr(loss, "lpips_weight", 0) > 0:
            problems += _lpips_problem(loss.cfg.lpips_trunk, "model.loss.lpips_trunk")
        problems += _lpips_problem(hp.get("metrics_lpips"), "model.metrics_lpips")
        problems += _feature_problem(hp.get("metrics_fid"), hp.get("metrics_fid_weights"), "model.metrics_fid_weights")
        if hp.get("init_from"):
            problems += _checkpoint_problem(hp["init_from"], "model.init_from")
        pretrained = (hp.get("net_args") or {}).get("pretrained")
        if pretrained:
            problems += _autoencoder_problem({"kind": "dcae", "path": pretrained}, "model.net_args.pretrained")
    if "autoencoder" in hp:  # DiffusionModule: the decoder of its sample grids and generation evaluations
        problems += _autoencoder_problem(hp.get("autoencoder"), "model.autoencoder.path")
    return problems


def _data_problems(dm) -> list[str]:
    if dm is None:
        return []
    if hasattr(dm, "cache_dir"):  # LatentDataModule
        try:
            meta = read_metadata(dm.cache_dir)
        except (FileNotFoundError, ValueError) as e:
            return [str(e)]
        problems = cache_problems(dm.cache_dir, meta)
        problems += _autoencoder_problem(getattr(dm, "expect_autoencoder", None), "data.expect_autoencoder.path")
        problems += _autoencoder_problem(meta.get("autoencoder_spec"), f"the autoencoder recorded in {dm.cache_dir}")
        return problems
    root = getattr(dm, "root", None)
    if root is not None:  # an image folder
        if not os.path.isdir(root):
            return [f"data root {root} does not exist"]
        train = os.path.join(root, getattr(dm, "train_dir", "train"))
        if not os.path.isdir(train):
            return [f"data root {root} has no {os.path.basename(train)}/ folder"]
    return []


# ---------------------------------------------------------------------------------------------------- disk
def _state_nbytes(module) -> tuple[int, int]:
    """(bytes of the state_dict, bytes of the trainable parameters) of a module."""
    state = sum(t.numel() * t.element_size() for t in module.state_dict().values() if isinstance(t, torch.Tensor))
    trainable = sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)
    return state, trainable


def estimate_checkpoint_bytes(module, dm=None) -> int | None:
    """About the size of one checkpoint: the state_dict plus two AdamW moments per trainable parameter. A module
    whose networks are built later (DiffusionModule.configure_model) is sized from a twin on the meta device."""
    state, trainable = _state_nbytes(module)
    if state == 0 and hasattr(dm, "cache_dir"):
        try:
            meta = read_metadata(dm.cache_dir)
            params = inspect.signature(type(module).__init__).parameters
            kwargs = {k: v for k, v in module.hparams.items() if k in params}
            with torch.device("meta"):
                twin = type(module)(**{**kwargs, "latent_shape": tuple(meta["latent_shape"]),
                                       "num_classes": int(meta["num_classes"])})
            state, trainable = _state_nbytes(twin)
        except Exception:  # a missing cache is reported by the data checks
            return None
    return state + 2 * trainable if state else None


def _checkpoint_slots(cb: ModelCheckpoint, max_steps: int) -> int:
    """How many checkpoint files a ModelCheckpoint keeps at once, plus the temporary of the one being written."""
    if cb.save_top_k >= 0:
        kept = cb.save_top_k
    elif cb._every_n_train_steps and max_steps > 0:
        kept = max_steps // cb._every_n_train_steps
    else:
        kept = 1
    return kept + (1 if cb.save_last else 0) + 1


def _existing_folder(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.isdir(path):
        path = os.path.dirname(path)
    return path


def _unwritable(path: str) -> str | None:
    """Why files cannot be created in the folder `path` (made later, if need be), or None. A real write, not
    os.access: permission bits do not show a read-only mount or a full disk, and root passes every access test."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"{existing} is a file, not a folder"
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".tcae-ldm-write-test-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        return f"{existing}: {e.strerror or e}"
    return None


def _folder_problems(trainer) -> list[str]:
    folders = {"the run's folder": os.path.normpath(log_dir(trainer))}
    for cb in trainer.callbacks:
        if isinstance(cb, ModelCheckpoint):
            folder = cb.dirpath or os.path.join(log_dir(trainer), "checkpoints")
            folders.setdefault(f"checkpoints in {folder}", folder)
    problems = []
    for what, folder in folders.items():
        why = _unwritable(folder) if folder and "://" not in str(folder) else None
        if why is not None:
            name = what if what.startswith("checkpoints") else f"{what} {folder}"
            problems.append(f"{name} cannot be written: {why}")
    return problems


def _disk_problems(trainer, module, dm) -> list[str]:
    problems = _folder_problems(trainer)
    callbacks = [cb for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint)]
    if problems or not callbacks:
        return problems
    size = estimate_checkpoint_bytes(module, dm)
    if not size:
        return []
    max_steps = getattr(module, "max_steps", None) or trainer.max_steps
    for cb in callbacks:
        folder = cb.dirpath or os.path.join(log_dir(trainer), "checkpoints")
        slots = _checkpoint_slots(cb, max_steps)
        existing = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)
                       if f.endswith(".ckpt")) if os.path.isdir(folder) else 0
        need = max(size, slots * size - existing)  # files already there are replaced in place
        free = shutil.disk_usage(_existing_folder(folder)).free
        if free < need:
            problems.append(f"checkpoints in {folder} need about {need / 1e9:.2f} GB more ({slots} files of about "
                            f"{size / 1e9:.2f} GB, one of them the temporary of a write) but only "
                            f"{free / 1e9:.2f} GB are free")
    return problems
