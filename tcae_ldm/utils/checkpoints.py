"""The one place where files are unpickled: checkpoints, weight files and statistics that a user, a config or another
file names. Loading never executes code, and a missing, damaged or foreign file is one line naming it.

torch.load runs with weights_only=True: only tensors, plain Python values and the globals registered as safe (the
project's config dataclasses register themselves where they are defined) are rebuilt; any other pickled global is
refused before anything in the file is built. A file from a source the user trusts can be loaded anyway with the
environment variable TCAE_LDM_TRUST_PICKLE=1 (docs/trust.md). Lightning's own loads (load_from_checkpoint, the
hyper-parameters of --ckpt_path) read with weights_only=True too and go through `checked` first.

torch.load also reports a truncated file as a zip-reader or EOF error that does not name it, and loads a garbled one
silently (it does not check the archive's CRCs). Every file is checked first (about 0.2 s per 400 MB) and a
damaged one gets one line naming it and the newest intact checkpoint beside it, or saying that there is none.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import os
import pickle
import re
import zipfile

import torch

TRUST_ENV = "TCAE_LDM_TRUST_PICKLE"
# facebookresearch/DiT's train.py saves its argparse arguments: a Namespace only sets attributes
torch.serialization.add_safe_globals([argparse.Namespace])


class CorruptCheckpointError(ValueError):
    """A checkpoint file that exists but cannot be read: empty, truncated or garbled."""


class UntrustedFileError(ValueError):
    """A file that holds pickled objects which loading would have to build by running code; it was not loaded."""


def trust_pickles() -> bool:
    """Whether the user opted in to unpickling anything (TCAE_LDM_TRUST_PICKLE=1)."""
    return os.environ.get(TRUST_ENV, "").strip().lower() in ("1", "true", "yes")


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


def foreign_globals(path: str) -> list[str]:
    """The pickled globals in a torch.save archive that weights_only loading does not allow, read without
    unpickling anything ([] for a file in torch's legacy format: its load refuses them just the same)."""
    try:
        return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # noqa: BLE001  (not a zip archive, or one whose pickle cannot be disassembled)
        return []


def refusal_message(path: str, what: str, refused: list[str] | str) -> str:
    """One line: the file, what it holds that was refused, and how to convert or trust it."""
    names = ", ".join(refused) if isinstance(refused, list) else refused
    return (f"{what} {path} holds pickled objects that loading would have to run code to build ({names}); it was "
            f"not loaded. Re-save it with only tensors and plain values (a state_dict) where you trust it, or, if "
            f"you trust its source, set {TRUST_ENV}=1 to load it anyway (docs/trust.md)")


def _refused_global(error: Exception) -> str | None:
    """The global or call that torch's weights_only unpickler refused, from its message (None: another error)."""
    for pattern in (r"GLOBAL ([\w.]+)", r"unrecognized function <function ([\w.]+)", r"call reduce for ([^\n]+)"):
        found = re.search(pattern, str(error))
        if found:
            return found.group(1).strip()
    return None


def _first_reason(error: Exception) -> str:
    """The line of torch's long weights_only message that says what is wrong."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    told = [ln for ln in lines if not ln.startswith(("Weights only load failed", "Please file", "Check the doc"))
            and not ln.endswith(":")]
    return (told or lines or [type(error).__name__])[0][:160]


def check_file(path: str, what: str = "checkpoint", archive: bool = False) -> None:
    """The checks before any load: the file exists, is intact (CRCs; archive: it must be a torch.save archive, as
    every checkpoint of Lightning is) and holds no foreign pickled objects (UntrustedFileError unless trusted)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path} does not exist")
    if archive or zipfile.is_zipfile(path) or os.path.getsize(path) == 0:
        check_checkpoint_file(path)  # torch.load does not check the CRCs: a garbled tensor would load silently
    foreign = foreign_globals(path)
    if foreign and not trust_pickles():
        raise UntrustedFileError(refusal_message(path, what, foreign))


@contextlib.contextmanager
def checked(path: str, what: str = "checkpoint"):
    """Around a load that Lightning does with weights_only=True (load_from_checkpoint, the hyper-parameters of
    --ckpt_path): the checkpoint is checked first; a file the user trusts is unpickled in full."""
    check_file(path, what, archive=True)
    if not trust_pickles():
        yield
        return
    load = torch.load  # Lightning passes weights_only=True itself: the user's opt-in overrides it for this load

    def trusting_load(f, *args, **kwargs):
        return load(f, *args, **{**kwargs, "weights_only": False})

    torch.load = trusting_load
    try:
        yield
    finally:
        torch.load = load


def load_torch_file(path: str, what: str = "checkpoint", map_location="cpu", mmap: bool = False, archive: bool = False):
    """torch.load of a file a user, a config or another file names, without executing code (module docstring).
    mmap: map the tensors instead of reading them (where the format allows it)."""
    check_file(path, what, archive)
    trusted = trust_pickles()
    try:
        return torch.load(path, map_location=map_location, weights_only=not trusted,
                          mmap=mmap and zipfile.is_zipfile(path))  # torch's legacy format cannot be mapped
    except pickle.UnpicklingError as e:
        refused = _refused_global(e)
        if refused:  # a global the static scan could not see (torch's legacy format)
            raise UntrustedFileError(refusal_message(path, what, refused)) from None
        raise ValueError(f"{what} {path} cannot be read as a file of torch.save ({_first_reason(e)})") from None


def _step_of(path: str) -> int | None:
    try:
        ckpt = load_torch_file(path, mmap=True, archive=True)
    except Exception:  # noqa: BLE001  (a file that cannot be read has no step to report)
        return None
    return ckpt.get("global_step") if isinstance(ckpt, dict) else None


def previous_intact_checkpoint(path: str) -> str | None:
    """The newest other intact *.ckpt in the folder of `path` that loads without foreign objects, or None."""
    others = [p for p in glob.glob(os.path.join(os.path.dirname(os.path.abspath(path)), "*.ckpt"))
              if os.path.abspath(p) != os.path.abspath(path)]
    for p in sorted(others, key=os.path.getmtime, reverse=True):
        if checkpoint_damage(p) is None and (trust_pickles() or not foreign_globals(p)):
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


def read_checkpoint(path: str, map_location="cpu", what: str = "checkpoint") -> dict:
    """A checkpoint dictionary (load_torch_file; one line naming the file when it holds something else)."""
    ckpt = load_torch_file(path, what, map_location=map_location, archive=True)
    if not isinstance(ckpt, dict):
        raise CorruptCheckpointError(f"{what} {path} holds a {type(ckpt).__name__}, not a checkpoint dictionary")
    return ckpt
