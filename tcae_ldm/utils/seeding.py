"""Seeds derived from integers, so that a random draw is a function of (seed, step, rank, index, ...)."""
from __future__ import annotations

import os
from contextlib import contextmanager

import numpy as np
import torch


def seed_of(*parts: int) -> int:
    """A well-mixed 32-bit seed from integers (seed, step, rank, ...): no two tuples share a stream."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def default_seed(seed: int | None) -> int:
    """An explicit seed, else the one seed_everything exported (so one config key seeds every process)."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0)) if seed is None else seed


@contextmanager
def one_thread():
    """Run the block on one intra-op CPU thread: a float reduction then has one order, so a small network trains
    and computes features bit for bit alike on any machine, whatever its thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
