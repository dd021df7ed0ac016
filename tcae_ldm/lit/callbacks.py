"""Lightning callbacks shared by the training configs."""
from __future__ import annotations

import logging

import lightning as L

from tcae_ldm.metrics.diagnostics import diagnose

log = logging.getLogger(__name__)


class LatentDiagnosticsCallback(L.Callback):
    """Linear probes and effective rank of the eval network's latents, logged as diag/* at validation end.

    Runs on rank zero only, at most once per `every_n_steps` generator updates (the module's `step_count`
    when it has one, else trainer.global_step), on a seeded subset of at most `max_images` images per split
    of the trainer's datamodule. It leaves the RNG and the network's train/eval mode as they were.

    Args:
        every_n_steps: generator steps between two diagnoses.
        max_images: images per split in the probes' seeded subset (null: all).
        tokens: image tokens probed for A1: 'fine' (stage 1, as the paper measures them) or 'coarse'.
        batch_size: images per encoding batch.
    """

    def __init__(self, every_n_steps: int = 5000, max_images: int | None = 2048, tokens: str = "fine",
                 batch_size: int = 64):
        super().__init__()
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps, self.max_images = every_n_steps, max_images
        self.tokens, self.batch_size = tokens, batch_size
        self.last_step: int | None = None

    @staticmethod
    def _step(trainer, pl_module) -> int:
        return int(getattr(pl_module, "step_count", trainer.global_step))

    def on_validation_epoch_end(self, trainer, pl_module):
        # Lightning allows self.log in on_validation_epoch_end, not in on_validation_end.
        if trainer.sanity_checking:
            return
        step = self._step(trainer, pl_module)
        if self.last_step is not None and step - self.last_step < self.every_n_steps:
            return
        self.last_step = step  # every rank, so that all agree on when the next run is due
        if not trainer.is_global_zero:
            return
        if trainer.datamodule is None:
            log.warning("LatentDiagnosticsCallback needs a datamodule with train_set / val_set; skipping")
            return
        res = diagnose(pl_module, trainer.datamodule, tokens=self.tokens, max_images=self.max_images,
                       batch_size=self.batch_size)
        logs = {"diag/probe_latent": res["probe_latent"], "diag/effective_rank": res["spectrum"]["effective_rank"],
                "diag/effective_rank_ratio": res["spectrum"]["effective_rank_ratio"]}
        if res["probe_tokens"] is not None:
            logs["diag/probe_tokens"] = res["probe_tokens"]
        pl_module.log_dict({k: float(v) for k, v in logs.items()}, rank_zero_only=True)

    def state_dict(self):
        return {"last_step": self.last_step}

    def load_state_dict(self, state_dict):
        self.last_step = state_dict.get("last_step")
