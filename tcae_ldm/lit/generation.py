"""Generation quality during DiT training: sample -> decode -> FID against reference statistics.

Every `every_n_steps` optimizer steps the callback draws `num_samples` images with the module's EMA DiT
(fixed seeds and class labels, so successive evaluations differ only by the weights), scores them with a
named feature network and logs, at Lightning's `step`:

    gen/gfid_<network>   gen/images_seen   gen/wall_time_s   gen/num_samples   gen/compute_gmacs

which is the format `tcae-ldm compare` reads (tcae_ldm.metrics.convergence). Wall time counts training
only: evaluation time is excluded, so runs with different evaluation settings stay comparable. Under DDP
each rank samples its share and the feature statistics are all-reduced.
"""
from __future__ import annotations

import time

import lightning as L
import torch
from tqdm.auto import tqdm

from tcae_ldm.lit.progress import ProgressLine
from tcae_ldm.lit.sampling import balanced_labels
from tcae_ldm.metrics.convergence import (
    COMPUTE_COLUMN,
    GEN_PREFIX,
    IMAGES_SEEN_COLUMN,
    NUM_SAMPLES_COLUMN,
    WALL_TIME_COLUMN,
)
from tcae_ldm.metrics.features import build_feature_extractor
from tcae_ldm.metrics.fid import FIDMetric


class GenerationEvalCallback(L.Callback):
    """gFID-N of the EMA DiT every K steps (and once at the end of training).

    Args:
        reference_stats: reference statistics .npz of the same feature network (ADM's, or `tcae-ldm fid-stats`).
        every_n_steps: optimizer steps between two evaluations.
        num_samples: samples per evaluation (the N of FID-N), balanced over the classes.
        features: feature network: 'inception' (the ADM evaluator's), 'demo-classifier' (offline proxy), 'random'.
        features_weights: weight file of that network (default: its standard location).
        batch_size: samples per sampling call and device.
        cfg_scale: classifier-free guidance scale; 1 is none (the paper's gFID).
        sample_steps: sampling steps (default: the module's sample_steps).
        sampler: sampler (default: the module's).
        seed: seed of the samples' noise; chunk i uses seed + i, so the samples do not depend on the GPU count.
        eval_at_end: evaluate once more when training ends.
    """

    def __init__(self, reference_stats: str, every_n_steps: int = 10000, num_samples: int = 10000,
                 features: str = "inception", features_weights: str | None = None, batch_size: int = 125,
                 cfg_scale: float = 1.0, sample_steps: int | None = None, sampler: str | None = None,
                 seed: int = 0, eval_at_end: bool = True):
        self.reference_stats, self.every, self.num_samples = reference_stats, every_n_steps, num_samples
        self.features, self.features_weights, self.batch_size = features, features_weights, batch_size
        self.cfg_scale, self.sample_steps, self.sampler = cfg_scale, sample_steps, sampler
        self.seed, self.eval_at_end = seed, eval_at_end
        self.metric: FIDMetric | None = None
        self._train_time, self._last_tick, self._last_eval_step = 0.0, None, -1

    # ------------------------------------------------------------------ timing
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._last_tick = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._last_tick is not None:
            self._train_time += time.perf_counter() - self._last_tick
        step = trainer.global_step
        if self.every and step % self.every == 0 and step > 0:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        if self.eval_at_end:
            self.evaluate(trainer, pl_module)

    # ------------------------------------------------------------------ evaluation
    def _labels(self, num_classes: int) -> torch.Tensor:
        return balanced_labels(self.num_samples, num_classes)  # the same at every evaluation

    @torch.no_grad()
    def evaluate(self, trainer, pl_module) -> float | None:
        step = trainer.global_step
        if step == self._last_eval_step:  # at most once per step (the end of training may coincide with K)
            return None
        self._last_eval_step = step
        if self.metric is None:
            extractor = build_feature_extractor(self.features, weights_path=self.features_weights)
            self.metric = FIDMetric(extractor, self.reference_stats, kind="gfid")
        self.metric.reset()
        labels = self._labels(pl_module.num_classes)
        chunks = list(torch.split(torch.arange(self.num_samples), self.batch_size))
        # Chunk i is drawn with seed (seed + i) on whichever rank owns it: samples do not depend on world size.
        mine = range(trainer.global_rank, len(chunks), trainer.world_size)
        # As the trainer's own bars: none without one, and none beside a ProgressLine, which writes log-file lines.
        quiet = (not trainer.is_global_zero or trainer.progress_bar_callback is None
                 or isinstance(trainer.progress_bar_callback, ProgressLine))
        for i in tqdm(mine, desc=f"gFID-{self.num_samples} samples (rank 0's chunks)", leave=False, disable=quiet):
            images = pl_module.sample(labels[chunks[i]], seed=self.seed + i, steps=self.sample_steps,
                                      sampler=self.sampler, cfg_scale=self.cfg_scale)
            self.metric.update(images)
        fid = self.metric.compute()  # every rank: it all-reduces the feature statistics
        metrics = {f"{GEN_PREFIX}{self.metric.name}": fid, IMAGES_SEEN_COLUMN: float(pl_module.images_seen),
                   WALL_TIME_COLUMN: self._train_time, NUM_SAMPLES_COLUMN: float(self.num_samples)}
        if hasattr(pl_module, "compute_gmacs"):
            metrics[COMPUTE_COLUMN] = float(pl_module.compute_gmacs)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        return fid

    # ------------------------------------------------------------------ resume
    def state_dict(self):
        return {"train_time": self._train_time}

    def load_state_dict(self, state_dict):
        self._train_time = state_dict.get("train_time", 0.0)
