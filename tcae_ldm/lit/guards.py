"""Guards a training step passes before it updates anything."""
from __future__ import annotations


class NonFiniteLossError(FloatingPointError):
    """A training loss became NaN or inf; the run stops before the update, so nothing bad is saved."""
