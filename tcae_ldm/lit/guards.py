"""Guards a training step passes before it updates anything, and what a stopped run names to resume from."""
from __future__ import annotations

import errno
import glob
import os

import lightning as L
import torch

from tcae_ldm.utils.checkpoints import checkpoint_damage, read_checkpoint

# Errors of a write that the user fixes outside the run (space, quota, permissions), not bugs of the run.
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


class NonFiniteLossError(FloatingPointError):
    """A training loss became NaN or inf, or diverged past the module's `max_loss`; the run stops before the update,
    so nothing bad is saved."""


def _finite(tree) -> bool:
    if isinstance(tree, torch.Tensor):
        return not tree.is_floating_point() or bool(torch.isfinite(tree).all())
    if isinstance(tree, dict):
        return all(_finite(v) for v in tree.values())
    return True


def run_checkpoints(trainer) -> list[str]:
    """The intact *.ckpt files in this run's checkpoint folders (its ModelCheckpoint callbacks' dirpath), newest
    file first."""
    found = set()
    for cb in getattr(trainer, "checkpoint_callbacks", []):
        folder = getattr(cb, "dirpath", None)
        if folder and os.path.isdir(folder):
            found |= {os.path.abspath(p) for p in glob.glob(os.path.join(folder, "*.ckpt"))}
    intact = [p for p in found if checkpoint_damage(p) is None]
    return sorted(intact, key=lambda p: (os.path.getmtime(p), p), reverse=True)


def good_checkpoint(trainer, before_step: int) -> tuple[str, int] | None:
    """(path, global step) of the newest checkpoint of this run saved before global step `before_step` whose
    weights are all finite, or None. A checkpoint of step `before_step` itself holds the weights that diverged."""
    best = None
    for path in run_checkpoints(trainer):
        try:
            ckpt = read_checkpoint(path)
        except Exception:  # unreadable as a checkpoint: not one to resume from
            continue
        step = ckpt.get("global_step")
        if isinstance(step, int) and step < before_step and _finite(ckpt.get("state_dict", {})):
            if best is None or step > best[1]:
                best = (path, step)
    return best


def check_loss(loss: torch.Tensor, step: int, max_loss: float | None, trainer=None, terms: dict | None = None) -> None:
    """Raise NonFiniteLossError when `loss` is NaN / inf or above `max_loss` (a divergence): one line with the step,
    the value (and its `terms`) and the newest checkpoint of this run saved before the divergence with finite
    weights, or that there is none."""
    bad = ~torch.isfinite(loss)
    if max_loss is not None:
        bad = bad | (loss > max_loss)
    if not bool(bad):  # one host sync per step, as a plain isfinite check
        return
    value = float(loss)
    detail = f"; terms { {k: round(float(v), 6) for k, v in terms.items()} }" if terms else ""
    what = "non-finite loss" if not torch.isfinite(loss) else f"loss above the divergence bound max_loss={max_loss:g}"
    saved = good_checkpoint(trainer, trainer.global_step) if trainer is not None else None
    if saved is None:
        kept = "no checkpoint of this run was saved before the divergence with finite weights"
    else:
        kept = (f"the newest checkpoint saved before the divergence with finite weights is {saved[0]} (global step "
                f"{saved[1]}): resume with --ckpt_path {saved[0]}")
    raise NonFiniteLossError(f"{what} at step {step} ({value:g}{detail}); stopping before the update, so nothing "
                             f"bad is saved; {kept}")


def last_complete_checkpoint(trainer) -> str:
    """'the last complete checkpoint is X (global step N)', or that there is none: what a run stopped by a failed
    write can resume from."""
    for path in run_checkpoints(trainer):
        try:
            step = read_checkpoint(path).get("global_step")
        except Exception:
            continue
        return f"the last complete checkpoint is {path}" + (f" (global step {step})" if step is not None else "")
    return "no complete checkpoint of this run is on disk"


class WriteFailureNote(L.Callback):
    """A write that fails mid-run (a full disk, a quota, a folder made read-only) ends the run with the OSError;
    this adds to it, as a note, the last complete checkpoint of the run, which the command line prints in the
    same line."""

    def on_exception(self, trainer, pl_module, exception):
        if isinstance(exception, OSError) and exception.errno in WRITE_ERRNOS and trainer.is_global_zero:
            exception.last_checkpoint = last_complete_checkpoint(trainer)
            if hasattr(exception, "add_note"):  # Python >= 3.11: also shown under a traceback
                exception.add_note(exception.last_checkpoint)


def write_failure_message(exc: BaseException) -> str | None:
    """One line for an OSError of a failed write (None for any other error): the file, the reason and the last
    complete checkpoint when the run named it."""
    if not isinstance(exc, OSError) or exc.errno not in WRITE_ERRNOS:
        return None
    target = exc.filename or "a file"
    kept, seen = None, exc
    while seen is not None and kept is None:  # Lightning's logger.finalize may fail again after the note was made
        kept, seen = getattr(seen, "last_checkpoint", None), seen.__cause__ or seen.__context__
    return f"writing {target} failed: {exc.strerror or exc}" + (f"; {kept}" if kept else "")
