"""The convergence format: reading metrics.csv, steps to reach a gFID level, the levels a comparison uses."""
import numpy as np
import pytest

from tcae_ldm.metrics.convergence import auto_levels, read_metrics, steps_to_reach


def test_steps_to_reach_interpolates_between_logged_points():
    steps, values = np.array([10.0, 20.0, 30.0]), np.array([60.0, 40.0, 30.0])
    assert steps_to_reach(steps, values, 50) == pytest.approx(15.0)
    assert steps_to_reach(steps, values, 70) == 10.0  # already below at the first point
    assert steps_to_reach(steps, values, 30) == pytest.approx(30.0)
    assert steps_to_reach(steps, values, 29.9) is None



def test_read_metrics_merges_the_rows_of_a_step_and_keeps_the_last_value(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("step,train/loss,gen/gfid_random,note\n"
                    "3,0.5,,\n"
                    "3.0,,40.0,text\n"       # the same step (Lightning may write it as a float): merged, text dropped
                    ",0.1,,\n"               # no step: not a training row
                    "1,0.9,,\n"
                    "3,0.4,,\n")             # a resumed run re-logs step 3: the last value wins
    got = read_metrics(str(path))
    assert list(got) == [1, 3]               # sorted by step
    assert got == {1: {"train/loss": 0.9}, 3: {"train/loss": 0.4, "gen/gfid_random": 40.0}}


@pytest.mark.parametrize("steps, gfid, levels", [
    ([10, 25, 50, 75, 100], [50.0, 40.004, 45.0, 30.0, 31.0], [40.01, 30.0]),  # best so far, rounded up
    ([50, 100], [20.001, 10.0], [20.01, 10.0]),                                 # no point by 25%: no level
    ([0, 100], [7.0, 7.5], [7.0]),                                              # levels are distinct
    ([25, 50, 100], [9.0, 8.0, 7.0], [9.0, 8.0, 7.0]),                           # a level from each fraction
])
def test_auto_levels_are_the_baselines_best_at_a_quarter_half_and_end(steps, gfid, levels):
    got = auto_levels(np.array(steps, dtype=float), np.array(gfid))
    assert got == pytest.approx(levels, abs=1e-12) and len(got) == len(levels)
