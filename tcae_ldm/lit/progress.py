"""Lightning's progress as a printed line every N steps: readable in a log file, where a redrawn bar is not."""
from __future__ import annotations

import time

import torch
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar

from tcae_ldm.utils.progress import duration, progress_line


def _value(v) -> str:
    v = float(v.item() if isinstance(v, torch.Tensor) else v)
    return f"{v:.4g}"


class ProgressLine(ProgressBar):
    """Training, evaluation and prediction progress as one line per `every_n_steps` steps (batches when
    evaluating or predicting) and one when each stage ends, printed by rank zero:

        fit step 128/384 steps (33%) | 3.1 steps/s, 1:22 left | epoch 2 | loss 0.04123
        validate at step 128: 32 batches in 0:12 | val/psnr 21.34 | val/ssim 0.6123

    Steps are the module's own count when it keeps one (`step_count`: the autoencoder's generator updates, since
    its two optimizers both advance trainer.global_step), else trainer.global_step; the total is the module's
    max_steps, else trainer.max_steps. Rates and time left are measured over the last interval.

    Args:
        every_n_steps: training steps (evaluation / prediction batches) between two lines.
    """

    def __init__(self, every_n_steps: int = 50):
        super().__init__()
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self._enabled = True
        self._mark: dict[str, tuple[float, int]] = {}  # stage -> (time, count) of its last line
        self._start: dict[str, float] = {}
        self._done: dict[str, int] = {}  # evaluation / prediction batches done

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _print(self, trainer, line: str) -> None:
        if self._enabled and trainer.is_global_zero:
            print(line, flush=True)

    def _begin(self, stage: str, count: int = 0) -> None:
        now = time.perf_counter()
        self._start[stage], self._mark[stage], self._done[stage] = now, (now, count), 0

    def _rate(self, stage: str, count: int) -> float:
        """Items per second since the stage's last line; moves the mark to now."""
        now = time.perf_counter()
        then, before = self._mark.get(stage, (now, count))
        self._mark[stage] = (now, count)
        return (count - before) / (now - then) if now > then else 0.0

    @staticmethod
    def steps(trainer, pl_module) -> tuple[int, int | None]:
        """(steps done, total steps or None)."""
        if hasattr(pl_module, "step_count"):
            return int(pl_module.step_count), getattr(pl_module, "max_steps", None)
        return trainer.global_step, trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None

    # ------------------------------------------------------------------ training
    def on_train_start(self, trainer, pl_module):
        self._begin("fit", self.steps(trainer, pl_module)[0])  # a resumed run counts from its checkpoint's step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step, total = self.steps(trainer, pl_module)
        if step % self.every_n_steps or step == self._mark["fit"][1]:
            return  # once per step, also with gradient accumulation
        metrics = {k: v for k, v in self.get_metrics(trainer, pl_module).items() if k != "v_num"}
        extra = "".join(f" | {k} {_value(v)}" for k, v in metrics.items())
        line = progress_line("fit step", step, total, self._rate("fit", step), "steps")
        self._print(trainer, f"{line} | epoch {trainer.current_epoch}{extra}")

    def on_train_end(self, trainer, pl_module):
        step, _ = self.steps(trainer, pl_module)
        self._print(trainer, f"fit done at step {step} in {duration(time.perf_counter() - self._start['fit'])}")

    # ------------------------------------------------------------------ evaluation and prediction
    def _batch_end(self, trainer, stage: str, batch_idx: int, total) -> None:
        done = self._done[stage] = batch_idx + 1
        if done % self.every_n_steps == 0:
            total = int(total) if total not in (None, float("inf")) else None
            self._print(trainer, progress_line(stage, done, total, self._rate(stage, done)))

    def _stage_end(self, trainer, pl_module, stage: str, prefix: str | None) -> None:
        where = f" at step {self.steps(trainer, pl_module)[0]}" if trainer.state.fn == "fit" else ""
        took = duration(time.perf_counter() - self._start.get(stage, time.perf_counter()))
        line = f"{stage}{where}: {self._done.get(stage, 0)} batches in {took}"
        if prefix:
            metrics = {k: v for k, v in trainer.callback_metrics.items() if k.startswith(prefix) and v.numel() == 1}
            line += "".join(f" | {k} {_value(v)}" for k, v in sorted(metrics.items()))
        self._print(trainer, line)

    def on_validation_start(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self._begin("validate")

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking:
            self._batch_end(trainer, "validate", batch_idx, trainer.num_val_batches[dataloader_idx])

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self._stage_end(trainer, pl_module, "validate", "val/")

    def on_test_start(self, trainer, pl_module):
        self._begin("test")

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._batch_end(trainer, "test", batch_idx, trainer.num_test_batches[dataloader_idx])

    def on_test_end(self, trainer, pl_module):
        self._stage_end(trainer, pl_module, "test", "test/")

    def on_predict_start(self, trainer, pl_module):
        self._begin("predict")

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._batch_end(trainer, "predict", batch_idx, trainer.num_predict_batches[dataloader_idx])

    def on_predict_end(self, trainer, pl_module):
        self._stage_end(trainer, pl_module, "predict", None)
