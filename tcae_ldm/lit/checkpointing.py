"""Checkpoint files that a crash, a kill -9 or a full disk cannot half-write, and that name themselves when damaged.

Lightning's TorchCheckpointIO serialises into memory and moves a temporary from $TMPDIR over the target: on
another filesystem that move is a copy, so a full disk leaves a partial file under the final name and the
temporary behind. AtomicCheckpointIO writes straight into a temporary beside the target, fsyncs and renames it
(tcae_ldm.utils.atomic), and reads through the project's one loader: CRC-checked, never executing code, with
one clear error (tcae_ldm.utils.checkpoints).
"""
from __future__ import annotations

import logging
import os
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io.wrapper import _WrappingCheckpointIO

from tcae_ldm.utils.atomic import atomic_write, remove_stale_temporaries
from tcae_ldm.utils.checkpoints import read_checkpoint, trust_pickles

log = logging.getLogger(__name__)


def _is_local(path) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO with atomic local writes and checked reads; remote paths go to Lightning's own."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        if storage_options is not None or not _is_local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        with atomic_write(str(path)) as f:
            torch.save(checkpoint, f)

    def load_checkpoint(self, path, map_location=lambda storage, loc: storage, weights_only=None) -> dict[str, Any]:
        # whatever Lightning asks for, nothing is unpickled unless the user trusts it (utils.checkpoints)
        if not _is_local(path):
            return super().load_checkpoint(path, map_location, weights_only=not trust_pickles())
        return read_checkpoint(str(path), map_location=map_location)


def install_atomic_checkpoints(trainer) -> None:
    """Make the trainer write checkpoints through AtomicCheckpointIO, unless it was given a custom CheckpointIO."""
    strategy = trainer.strategy
    io = strategy.checkpoint_io
    if type(io) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()
    elif isinstance(io, _WrappingCheckpointIO) and type(io.checkpoint_io) is TorchCheckpointIO:
        io.checkpoint_io = AtomicCheckpointIO()  # e.g. AsyncCheckpointIO: keep the wrapper, write atomically


def clean_checkpoint_folders(trainer) -> None:
    """Remove the temporaries of checkpoint writes that a killed process left in the checkpoint folders."""
    for cb in trainer.checkpoint_callbacks:
        folder = getattr(cb, "dirpath", None)
        if folder and _is_local(folder) and get_filesystem(folder).exists(folder):
            for path in remove_stale_temporaries(os.fspath(folder)):
                log.warning("removed %s, the temporary of a checkpoint write that was interrupted", path)
