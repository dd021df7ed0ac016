"""The convergence format: steps to reach a gFID level."""
import pytest

from tcae_ldm.metrics.convergence import steps_to_reach


def test_steps_to_reach_interpolates_between_logged_points():
    import numpy as np

    steps, values = np.array([10.0, 20.0, 30.0]), np.array([60.0, 40.0, 30.0])
    assert steps_to_reach(steps, values, 50) == pytest.approx(15.0)
    assert steps_to_reach(steps, values, 70) == 10.0  # already below at the first point
    assert steps_to_reach(steps, values, 30) == pytest.approx(30.0)
    assert steps_to_reach(steps, values, 29.9) is None

