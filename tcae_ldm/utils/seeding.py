"""Seeds derived from integers, so that a random draw is a function of (seed, step, rank, index, ...)."""
from __future__ import annotations

import os

import numpy as np


def seed_of(*parts: int) -> int:
    """A well-mixed 32-bit seed from integers (seed, step, rank, ...): no two tuples share a stream."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def default_seed(seed: int | None) -> int:
    """An explicit seed, else the one seed_everything exported (so one config key seeds every process)."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0)) if seed is None else seed
