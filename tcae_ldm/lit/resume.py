"""SafeResume: the callback both training modules install (configure_callbacks) so that a run can always resume.

- checkpoints are written atomically and read with a clear error (tcae_ldm.lit.checkpointing); temporaries that a
  killed run left beside them are removed when the next run starts;
- the metrics history continues: each checkpoint records how many rows every HistoryCSVLogger had written when
  it was saved; a run resumed from it keeps those rows and the later ones it will not log again, and replaces
  the rest (HistoryWriter.settle); a fresh run moves an existing history aside;
- a learning rate changed on the command line of a resume is applied (Lightning would silently keep the
  checkpoint's), and the change is logged in one line.
"""
from __future__ import annotations

import logging
import math

import lightning as L

from tcae_ldm.lit.checkpointing import (
    clean_checkpoint_folders,
    install_atomic_checkpoints,
)
from tcae_ldm.lit.history import HistoryCSVLogger

log = logging.getLogger(__name__)

HISTORY_KEY = "metrics_history"  # checkpoint entry: rows written by each HistoryCSVLogger at save time


def _history_loggers(trainer) -> list[HistoryCSVLogger]:
    return [lg for lg in trainer.loggers if isinstance(lg, HistoryCSVLogger)]


def _base_lr(group: dict) -> float:
    """The configured LR of a param group: schedules here scale it (base_lr: set_lr; initial_lr: torch schedulers)."""
    return group.get("base_lr", group.get("initial_lr", group["lr"]))


class SafeResume(L.Callback):
    """Atomic checkpoints, a metrics history that survives resumes, and learning rates changed on a resume."""

    def __init__(self):
        self._resumed_rows: list[int] | None = None
        self._resumed = False
        self._configured_lrs: list[list[float]] = []

    # ------------------------------------------------------------------ checkpoints
    def setup(self, trainer, pl_module, stage: str) -> None:
        install_atomic_checkpoints(trainer)  # before Lightning restores a checkpoint through it

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if trainer.is_global_zero:
            rows = []
            for lg in _history_loggers(trainer):
                if lg.experiment.unsettled:  # resumed, nothing logged yet
                    lg.experiment.settle(trainer.fit_loop.epoch_loop._batches_that_stepped)
                lg.save()  # rows logged before this checkpoint are on disk before it is
                rows.append(lg.experiment.rows)
            checkpoint[HISTORY_KEY] = rows

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        self._resumed = True
        self._resumed_rows = checkpoint.get(HISTORY_KEY)

    # ------------------------------------------------------------------ fit
    def on_fit_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            clean_checkpoint_folders(trainer)
        # before Lightning restores the optimizer states: the learning rates this run was configured with
        self._configured_lrs = [[_base_lr(g) for g in opt.param_groups] for opt in trainer.optimizers]

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            self._continue_history(trainer)
        if self._resumed:
            self._apply_configured_lrs(trainer)

    def _continue_history(self, trainer) -> None:
        for i, lg in enumerate(_history_loggers(trainer)):
            writer = lg.experiment
            if not self._resumed:
                moved = writer.move_aside()
                if moved:
                    log.warning("%s held the history of an earlier run; it was moved to %s and this fresh run "
                                "starts a new one (resume with --ckpt_path to continue it instead)",
                                writer.metrics_file_path, moved)
            else:  # a checkpoint written before row counts were recorded: 0, then the later rows are kept by step
                writer.keep_first(self._resumed_rows[i] if self._resumed_rows and i < len(self._resumed_rows) else 0)

    def _apply_configured_lrs(self, trainer) -> None:
        for i, (opt, configured) in enumerate(zip(trainer.optimizers, self._configured_lrs)):
            for j, (group, new) in enumerate(zip(opt.param_groups, configured)):
                old = _base_lr(group)
                if math.isclose(old, new, rel_tol=1e-9, abs_tol=0.0):
                    continue
                group["lr"] = group["lr"] * new / old if old else new
                for key in ("base_lr", "initial_lr"):
                    if key in group:
                        group[key] = new
                for cfg in trainer.lr_scheduler_configs:
                    if cfg.scheduler.optimizer is opt:
                        cfg.scheduler.base_lrs[j] = new
                if j == 0:
                    log.warning("optimizer %d: learning rate %g from this run's config replaces the checkpoint's %g "
                                "from global step %d on", i, new, old, trainer.global_step)
