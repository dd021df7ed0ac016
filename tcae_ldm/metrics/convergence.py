"""The convergence format: what the generation callback logs during DiT training and `tcae-ldm compare` reads.

A run's metrics.csv (Lightning's CSVLogger) holds, at the trainer's global step (the `step` column):
    gen/gfid_<network>   gFID-N with the named feature network (tcae_ldm.metrics.features)
    gen/images_seen      training images seen so far, summed over ranks
    gen/wall_time_s      training seconds since the run began, evaluation time excluded
    gen/num_samples      how many generated images the FID used (FID depends on it)
    gen/compute_gmacs    the DiT's training compute so far (GMACs, all ranks), as train/compute_gmacs at that step

and, at every training step (both training modules, tcae_ldm.lit.compute counts them):
    train/compute_gmacs  cumulative training compute in GMACs (multiply-accumulates) summed over ranks; kept in
                         checkpoints, so a resumed run continues it
    train/wall_time_s    (autoencoder runs) cumulative seconds spent in training steps, also kept across resumes
"""
from __future__ import annotations

import csv
import math
import os

import numpy as np

from tcae_ldm.utils.files import lookup, read_lenient_yaml

GEN_PREFIX = "gen/"
STEP_COLUMN = "step"                            # Lightning's column: trainer.global_step (optimizer steps)
GFID_COLUMN = GEN_PREFIX + "gfid_{net}"         # gFID measured with feature network {net} (metrics.features)
IMAGES_SEEN_COLUMN = GEN_PREFIX + "images_seen"  # training images seen so far, summed over ranks
WALL_TIME_COLUMN = GEN_PREFIX + "wall_time_s"   # training seconds since the run began, eval time excluded
NUM_SAMPLES_COLUMN = GEN_PREFIX + "num_samples"  # optional: generated images per FID (FID depends on it)
COMPUTE_COLUMN = GEN_PREFIX + "compute_gmacs"    # optional: the DiT's training GMACs so far, all ranks
TRAIN_COMPUTE_COLUMN = "train/compute_gmacs"     # cumulative training GMACs of any run, all ranks
TRAIN_TIME_COLUMN = "train/wall_time_s"          # cumulative training-step seconds of an autoencoder run
METRICS_FILE = "metrics.csv"


def read_metrics(path: str) -> dict[int, dict[str, float]]:
    """step -> {column: value}, merging the rows logged at one step (the last non-empty value wins,
    which also keeps the re-logged values of a resumed run)."""
    by_step: dict[int, dict[str, float]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if not row.get(STEP_COLUMN):
                continue
            vals = by_step.setdefault(int(float(row[STEP_COLUMN])), {})
            for k, v in row.items():
                if k and v not in (None, "") and k != STEP_COLUMN:
                    try:
                        vals[k] = float(v)
                    except ValueError:
                        pass
    return dict(sorted(by_step.items()))


def steps_to_reach(steps: np.ndarray, values: np.ndarray, level: float) -> float | None:
    """First training step at which the curve reaches gFID <= level, linearly interpolated; None if never."""
    hit = np.flatnonzero(values <= level)
    if not len(hit):
        return None
    i = hit[0]
    if i == 0:
        return float(steps[0])
    s0, s1, v0, v1 = steps[i - 1], steps[i], values[i - 1], values[i]
    return float(s0 + (v0 - level) / (v0 - v1) * (s1 - s0))


def auto_levels(steps: np.ndarray, gfid: np.ndarray) -> list[float]:
    """The baseline's best gFID so far at 25%, 50% and 100% of its training, rounded up to 0.01 (so it
    reaches them): 'how many steps does each run need to match what the baseline had by then'."""
    best = np.minimum.accumulate(gfid)
    levels = {math.ceil(best[np.flatnonzero(steps <= f * steps[-1])[-1]] * 100 - 1e-9) / 100
              for f in (0.25, 0.5, 1.0) if (steps <= f * steps[-1]).any()}
    return sorted(levels, reverse=True)


def find_metrics(run_dir: str) -> str:
    """RUN_DIR/metrics.csv, or that of its only version_N folder; FileNotFoundError naming what is wrong."""
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"{run_dir} is not a folder" if os.path.exists(run_dir) else f"{run_dir} does not exist")
    direct = os.path.join(run_dir, METRICS_FILE)
    if os.path.isfile(direct):
        return direct
    subdirs = sorted(os.listdir(run_dir)) if os.path.isdir(run_dir) else []
    nested = [p for p in (os.path.join(run_dir, d, METRICS_FILE) for d in subdirs) if os.path.isfile(p)]
    if len(nested) == 1:  # a logger folder holding a single version_N
        return nested[0]
    raise FileNotFoundError(f"{run_dir}: no {METRICS_FILE} (expected a Lightning CSVLogger run folder"
                            + (f"; found several: {nested}, pass one" if nested else "") + ")")


def checkpoint_training_gmacs(path: str, depth: int = 0) -> float | None:
    """run_training_gmacs of the run folder holding this checkpoint: its folder or one or two above."""
    folder = os.path.dirname(os.path.abspath(path))
    for candidate in (folder, os.path.dirname(folder), os.path.dirname(os.path.dirname(folder))):
        if os.path.isfile(os.path.join(candidate, METRICS_FILE)):
            return run_training_gmacs(candidate, depth)
    return None


def run_training_gmacs(folder: str, depth: int = 0) -> float | None:
    """An autoencoder run's last train/compute_gmacs, plus that of the run it started from (model.init_args.init_from:
    decoder finetuning's joint run), so a finetuned autoencoder's cost includes both phases. None: not logged."""
    values = [v[TRAIN_COMPUTE_COLUMN] for v in read_metrics(os.path.join(folder, METRICS_FILE)).values()
              if TRAIN_COMPUTE_COLUMN in v]
    if not values:
        return None
    parent = lookup(read_lenient_yaml(os.path.join(folder, "config.yaml")), "model.init_args.init_from")
    if isinstance(parent, str) and parent:
        before = checkpoint_training_gmacs(parent, depth + 1) if depth < 3 else None  # a chain, not a cycle
        return None if before is None else values[-1] + before
    return values[-1]
