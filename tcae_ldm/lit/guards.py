"""Guards a training step passes before it updates anything."""
from __future__ import annotations

import os

import torch


class NonFiniteLossError(FloatingPointError):
    """A training loss became NaN or inf, or diverged past the module's `max_loss`; the run stops before the update,
    so nothing bad is saved."""


def last_saved_checkpoint(trainer) -> tuple[str, int | None] | None:
    """(path, global step) of the newest checkpoint this run's ModelCheckpoint callbacks have on disk, or None."""
    found = []
    for cb in getattr(trainer, "checkpoint_callbacks", []):
        for path in (getattr(cb, "last_model_path", ""), getattr(cb, "best_model_path", "")):
            if path and os.path.isfile(path):
                found.append((os.path.getmtime(path), path, getattr(cb, "_last_global_step_saved", None)))
    if not found:
        return None
    _, path, step = max(found)
    return path, step


def check_loss(loss: torch.Tensor, step: int, max_loss: float | None, trainer=None, terms: dict | None = None) -> None:
    """Raise NonFiniteLossError when `loss` is NaN / inf or above `max_loss` (a divergence): one line with the step,
    the value (and its `terms`) and which checkpoint is the last good one (only when there is one)."""
    bad = ~torch.isfinite(loss)
    if max_loss is not None:
        bad = bad | (loss > max_loss)
    if not bool(bad):  # one host sync per step, as a plain isfinite check
        return
    value = float(loss)
    detail = f"; terms { {k: round(float(v), 6) for k, v in terms.items()} }" if terms else ""
    what = "non-finite loss" if not torch.isfinite(loss) else f"loss above the divergence bound max_loss={max_loss:g}"
    saved = last_saved_checkpoint(trainer) if trainer is not None else None
    if saved is None:
        kept = "no checkpoint of this run has been saved yet"
    else:
        kept = f"the last good checkpoint is {saved[0]}" + (f" (global step {saved[1]})" if saved[1] else "")
    raise NonFiniteLossError(f"{what} at step {step} ({value:g}{detail}); stopping before the update, so nothing "
                             f"bad is saved: {kept}")
