"""What `--ckpt_path FILE` may change in a run's config: nothing.

LightningCLI replaces the model's config by the hyper-parameters stored in an explicit checkpoint file (not with
`--ckpt_path last`), so `--model.*` values on the command line were silently dropped while `--print_config` showed
them, and a checkpoint of the other module kind rebuilt the model as that kind and rewrote the run's config.
Here the config and command line decide the model with a file exactly as with `last` (the checkpoint gives
weights, optimizer and loop state only): the stored values that differ are listed in one log line, and a
checkpoint of the other module kind is refused before anything is built or written.
"""
from __future__ import annotations

import logging

from tcae_ldm.utils.checkpoints import load_torch_file

log = logging.getLogger(__name__)

# the two LightningModules of the project: the class a config names -> the kind of checkpoint it restores from
MODULE_KINDS = {"AutoencoderModule": "autoencoder", "DiffusionModule": "diffusion"}
KIND_NAME = {"autoencoder": "an autoencoder", "diffusion": "a DiT"}
KIND_HINT = {"autoencoder": "an autoencoder config (configs/tcae.yaml, configs/dcae.yaml, ...)",
             "diffusion": "a DiT config (configs/dit_on_tcae.yaml, ...)"}


class CheckpointKindError(ValueError):
    """A --ckpt_path of the other module kind than the config's model."""


def module_kind(class_path: str | None) -> str | None:
    """'autoencoder' / 'diffusion' for the project's modules (by class name), None for any other class."""
    return MODULE_KINDS.get(str(class_path or "").rsplit(".", 1)[-1])


def stored_hparams(path: str) -> dict:
    """The hyper-parameters stored in a checkpoint (read with weights_only=True: nothing in it is executed)."""
    import tcae_ldm.lit.loading  # noqa: F401  (registers both modules' config types as safe to read)

    ckpt = load_torch_file(path, "--ckpt_path", mmap=True, archive=True)  # refuses foreign pickles in one line
    hp = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    return dict(hp) if isinstance(hp, dict) else {}


def stored_kind(hp: dict) -> str | None:
    """The module kind a checkpoint's hyper-parameters were saved by (the CLI records the class; older files are
    recognised by their keys)."""
    if "_class_path" in hp:
        return module_kind(hp["_class_path"])
    if "dit" in hp:
        return "diffusion"
    if "net" in hp:
        return "autoencoder"
    return None


def _plain(value):
    """A config value as plain data, to compare a Namespace / dataclass with the dict a checkpoint stores."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    elif hasattr(value, "__dataclass_fields__"):
        import dataclasses

        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def differing_keys(hp: dict, init_args: dict) -> list[str]:
    """Keys whose stored value differs from the config's (mappings compared key by key, nested keys dotted)."""
    out = []

    def walk(stored, configured, prefix):
        if isinstance(stored, dict) and isinstance(configured, dict):
            for k in sorted(set(stored) & set(configured)):
                walk(stored[k], configured[k], f"{prefix}{k}.")
        elif stored != configured:
            out.append(prefix[:-1])

    stored = {k: _plain(v) for k, v in hp.items() if not k.startswith("_")}
    walk(stored, _plain(dict(init_args)), "")
    return out


def check_checkpoint_for_config(path: str, class_path: str | None, init_args: dict | None, command: str) -> None:
    """CheckpointKindError when the checkpoint was saved by the other module than the config's; otherwise log, in
    one line, the stored hyper-parameters that the config overrides."""
    hp = stored_hparams(path)
    want, have = module_kind(class_path), stored_kind(hp)
    if want and have and want != have:
        raise CheckpointKindError(f"--ckpt_path {path} is {KIND_NAME[have]} checkpoint but the config's model is "
                                  f"{class_path.rsplit('.', 1)[-1]}: give `tcae-ldm {command}` {KIND_HINT[have]} "
                                  f"with it, or {KIND_NAME[want]} checkpoint")
    changed = differing_keys(hp, init_args or {})
    if changed:
        log.warning("--ckpt_path %s: the config's values of %s replace the checkpoint's (as with --ckpt_path last)",
                    path, ", ".join(f"model.{k}" for k in changed))
