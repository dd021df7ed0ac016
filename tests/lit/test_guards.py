"""What a stopped run names to resume from: after a divergence, the newest checkpoint of this run saved before it
with finite weights; after a failed write (a full disk), the last complete checkpoint."""
import errno
import os
import types

import pytest
import torch

from tcae_ldm.cli import run
from tcae_ldm.lit.checkpointing import AtomicCheckpointIO
from tcae_ldm.lit.guards import good_checkpoint, write_failure_message
from tests.tiny import tiny_data, tiny_module, tiny_trainer


def _ckpt(path, step, value=1.0):
    torch.save({"global_step": step, "state_dict": {"w": torch.full((3,), value), "n": torch.tensor(7)}}, path)
    return str(path)


def _trainer(*folders):
    return types.SimpleNamespace(checkpoint_callbacks=[types.SimpleNamespace(dirpath=str(f)) for f in folders])


def test_the_named_checkpoint_is_of_this_run_before_the_divergence_and_finite(tmp_path):
    run_dir, other_run = tmp_path / "run", tmp_path / "other"
    run_dir.mkdir(), other_run.mkdir()
    good = _ckpt(run_dir / "a.ckpt", 2)
    _ckpt(run_dir / "b.ckpt", 4, float("nan"))    # newer, but its weights are not finite
    _ckpt(run_dir / "last.ckpt", 6)                # saved at the divergence step: the weights that diverged
    _ckpt(run_dir / "later.ckpt", 9)               # of a longer, earlier attempt in the same folder
    (run_dir / "broken.ckpt").write_bytes(b"PK\x03\x04 half a file")
    _ckpt(other_run / "x.ckpt", 5)                 # another run's folder
    assert good_checkpoint(_trainer(run_dir), before_step=6) == (good, 2)
    assert good_checkpoint(_trainer(run_dir, other_run), before_step=6) == (str(other_run / "x.ckpt"), 5)
    assert good_checkpoint(_trainer(run_dir), before_step=2) is None  # nothing saved before step 2


def test_a_full_disk_mid_run_names_the_last_complete_checkpoint(tmp_path, monkeypatch, capsys):
    real, saves = AtomicCheckpointIO.save_checkpoint, []

    def fill_the_disk(self, checkpoint, path, storage_options=None):
        saves.append(path)
        if len(saves) > 2:  # the third write finds the disk full
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(self, checkpoint, path, storage_options)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", fill_the_disk)
    with pytest.raises(OSError) as err:
        tiny_trainer(str(tmp_path)).fit(tiny_module(max_steps=4), tiny_data())
    last = tmp_path / "ckpt" / "last.ckpt"
    assert err.value.last_checkpoint == f"the last complete checkpoint is {last} (global step 2)"
    assert write_failure_message(err.value) == (f"writing {saves[-1]} failed: No space left on device; the last "
                                                f"complete checkpoint is {last} (global step 2)")
    assert not [f for f in os.listdir(tmp_path / "ckpt") if f.endswith(".tmp")]

    def main(argv):  # the command line prints it as one line
        raise err.value

    monkeypatch.setattr("tcae_ldm.cli.main", main)
    with pytest.raises(SystemExit):
        run(["fit"])
    assert capsys.readouterr().err == f"tcae-ldm fit: error: {write_failure_message(err.value)}\n"


def test_other_os_errors_are_not_write_failures():
    assert write_failure_message(FileNotFoundError(errno.ENOENT, "No such file", "x")) is None
    assert write_failure_message(ValueError("x")) is None


def test_a_failed_metrics_write_names_the_last_complete_checkpoint(tmp_path, monkeypatch):
    from tcae_ldm.lit.history import HistoryCSVLogger, HistoryWriter

    real = HistoryWriter.save

    def full_disk(self):
        if (tmp_path / "ckpt" / "last.ckpt").exists():  # the disk fills once a checkpoint is saved
            raise OSError(errno.EDQUOT, "Disk quota exceeded", self.metrics_file_path)
        real(self)

    monkeypatch.setattr(HistoryWriter, "save", full_disk)
    logger = HistoryCSVLogger(str(tmp_path), name="run", version="", flush_logs_every_n_steps=1)
    with pytest.raises(OSError) as err:
        tiny_trainer(str(tmp_path), logger=logger, log_every_n_steps=1).fit(tiny_module(max_steps=4), tiny_data())
    assert write_failure_message(err.value) == (
        f"writing {tmp_path / 'run' / 'metrics.csv'} failed: Disk quota exceeded; the last complete checkpoint is "
        f"{tmp_path / 'ckpt' / 'last.ckpt'} (global step 2)")
