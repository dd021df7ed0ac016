"""Reading checkpoint files with one clear error for a missing, empty, truncated or garbled file.

torch.load reports a truncated file as a zip-reader or EOF error that does not name it, and loads a garbled one
silently (it does not check the archive's CRCs). Here every file is checked first (about 0.2 s per 400 MB) and a
damaged one gets one line naming it and the newest intact checkpoint beside it, or saying that there is none.
"""
from __future__ import annotations

import glob
import os
import zipfile

import torch


class CorruptCheckpointError(ValueError):
    """A checkpoint file that exists but cannot be read: empty, truncated or garbled."""


def checkpoint_damage(path: str) -> str | None:
    """Why the file at `path` is not an intact torch checkpoint (None when it is): every member of the zip
    archive torch.save writes is read back and its CRC checked."""
    size = os.path.getsize(path)
    if size == 0:
        return "it is empty (0 bytes)"
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        return f"it is truncated or not a checkpoint ({size} bytes; {e})"
    except Exception as e:  # zlib / struct errors inside a garbled archive
        return f"it is garbled ({type(e).__name__}: {e})"
    return None if bad is None else f"it is garbled (member {bad} fails its CRC check)"


def _step_of(path: str) -> int | None:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception:
        return None
    return ckpt.get("global_step")


def previous_intact_checkpoint(path: str) -> str | None:
    """The newest other intact *.ckpt in the folder of `path`, or None."""
    others = [p for p in glob.glob(os.path.join(os.path.dirname(os.path.abspath(path)), "*.ckpt"))
              if os.path.abspath(p) != os.path.abspath(path)]
    for p in sorted(others, key=os.path.getmtime, reverse=True):
        if checkpoint_damage(p) is None:
            return p
    return None


def damaged_checkpoint_message(path: str, why: str) -> str:
    """'checkpoint X cannot be read: <why>; <what to resume from>' in one line."""
    prev = previous_intact_checkpoint(path)
    if prev is None:
        hint = "no intact checkpoint is left beside it, so the run must start again without --ckpt_path"
    else:
        step = _step_of(prev)
        hint = (f"the newest intact checkpoint beside it is {prev}" + (f" (global step {step})" if step is not None
                else "") + f": resume with --ckpt_path {prev}")
    return f"checkpoint {path} cannot be read: {why}; {hint}"


def check_checkpoint_file(path: str) -> None:
    """CorruptCheckpointError (one line: the file, what is wrong, what to resume from) when `path` is damaged."""
    why = checkpoint_damage(path)
    if why is not None:
        raise CorruptCheckpointError(damaged_checkpoint_message(path, why))


def read_checkpoint(path: str, map_location="cpu", weights_only: bool | None = False, what: str = "checkpoint") -> dict:
    """torch.load of a checkpoint file, with one line naming the file when it is missing or damaged.

    weights_only=False is for the project's own training checkpoints (trusted files whose hyper-parameters hold
    config objects)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path} does not exist")
    check_checkpoint_file(path)  # torch.load does not check the CRCs: a garbled tensor would load silently
    return torch.load(path, map_location=map_location, weights_only=weights_only)
