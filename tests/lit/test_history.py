"""HistoryCSVLogger: an existing metrics.csv is kept and extended, a line cut off by a kill is dropped when a resumed
run settles the history, and a checkpoint written before row counts were recorded resumes by step."""
import csv
import os

import torch

from tcae_ldm.cli import main
from tcae_ldm.lit.history import HistoryCSVLogger
from tests.tiny import callbacks_arg, dit_argv, tiny_latent_cache

HEADER = "epoch,step,train/loss\n"


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_an_existing_history_is_kept_and_extended_with_new_columns(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.csv").write_text(HEADER + "0,0,1.5\n0,1,1.4\n")
    logger = HistoryCSVLogger(str(tmp_path), name="run", version="")
    logger.log_metrics({"val/psnr": 20.0}, step=1)  # e.g. `tcae-ldm validate` in a training run's folder
    logger.save()
    rows = _rows(tmp_path / "run" / "metrics.csv")
    assert [(r["step"], r["train/loss"], r["val/psnr"]) for r in rows] == [("0", "1.5", ""), ("1", "1.4", ""),
                                                                           ("1", "", "20.0")]
    assert logger.experiment.rows == 3


def test_settling_keeps_the_checkpoints_rows_and_drops_a_cut_off_line(tmp_path):
    (tmp_path / "run").mkdir()
    # rows 0-3; the checkpoint of step 2 had seen rows 0 and 1; then a kill cut the last line short
    (tmp_path / "run" / "metrics.csv").write_text(HEADER + "0,0,1.5\n0,1,1.4\n0,2,1.3\n0,3,1.2\n0,4")
    writer = HistoryCSVLogger(str(tmp_path), name="run", version="").experiment
    writer.keep_first(2)
    writer.log_metrics({"train/loss": 1.25}, step=3)  # the resumed run's first row: step 3
    writer.save()
    rows = _rows(tmp_path / "run" / "metrics.csv")
    # row 2 followed the checkpoint but the resumed run does not log it again: kept; the old row 3 is replaced
    assert [(r["step"], r["train/loss"]) for r in rows] == [("0", "1.5"), ("1", "1.4"), ("2", "1.3"), ("3", "1.25")]


def test_a_checkpoint_without_row_counts_resumes_the_history_by_step(tmp_path, monkeypatch):
    ae, cache = tiny_latent_cache(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    main(dit_argv(cache, ae, 3, callbacks_arg(1)))
    last = os.path.join("runs", "demo", "dit_tcae", "checkpoints", "last.ckpt")
    ckpt = torch.load(last, weights_only=False)
    del ckpt["metrics_history"]  # as written before this entry existed
    torch.save(ckpt, last)
    main(dit_argv(cache, ae, 5, callbacks_arg(1), "--ckpt_path=last"))
    assert [r["step"] for r in _rows(os.path.join("runs", "demo", "dit_tcae", "metrics.csv"))] == ["0", "1", "2", "3",
                                                                                                   "4"]
