"""ProgressLine: a line every N steps / batches and one per stage, readable in a log file (no carriage returns)."""
import re

import lightning as L
import torch
from torch.utils.data import DataLoader

from tcae_ldm.lit.progress import ProgressLine
from tcae_ldm.utils.progress import Progress, duration, progress_line
from tests.tiny import tiny_data, tiny_module


def test_fit_prints_steps_validation_and_the_end(tmp_path, capsys):
    module = tiny_module(max_steps=4, metrics_fid="random")
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=-1, logger=False, enable_model_summary=False,
                        enable_checkpointing=False, callbacks=[ProgressLine(every_n_steps=2)],
                        default_root_dir=str(tmp_path), check_val_every_n_epoch=2, num_sanity_val_steps=1)
    trainer.fit(module, tiny_data())
    out = capsys.readouterr().out
    assert "\r" not in out
    lines = [ln for ln in out.splitlines() if ln.startswith(("fit", "validate"))]
    assert [ln.split(" |")[0] for ln in lines if ln.startswith("fit step")] == \
        ["fit step 2/4 steps (50%)", "fit step 4/4 steps (100%)"]  # generator steps, not trainer.global_step
    assert re.search(r"fit step 2/4 steps \(50%\) \| [\d.]+ steps/s, \d+:\d\d left \| epoch 1 \| loss [\d.]+", lines[0])
    val = [ln for ln in lines if ln.startswith("validate")]
    assert len(val) == 2 and val[0].startswith("validate at step 2: 1 batches in ")  # not the sanity check
    assert "val/psnr" in val[0] and "val/rfid_random" in val[0]
    assert lines[-1].startswith("fit done at step 4 in ")


class _Predict(L.LightningModule):
    def predict_step(self, batch, batch_idx):
        return batch * 2


def test_predict_prints_every_n_batches(capsys):
    trainer = L.Trainer(accelerator="cpu", logger=False, callbacks=[ProgressLine(every_n_steps=3)])
    trainer.predict(_Predict(), DataLoader(torch.arange(14.0), batch_size=2), return_predictions=False)
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split(" |")[0] for ln in lines if ln.startswith("predict ")] == ["predict 3/7 batches (43%)",
                                                                               "predict 6/7 batches (86%)"]
    assert lines[-1].startswith("predict: 7 batches in ")


def test_progress_lines_of_plain_loops(capsys):
    assert [duration(s) for s in (42, 723, 7509)] == ["0:42", "12:03", "2:05:09"]
    assert progress_line("encode", 5, 20, 2.5) == "encode 5/20 batches (25%) | 2.5 batches/s, 0:06 left"
    assert progress_line("encode", 5, None, 0.0) == "encode 5 batches"
    assert list(Progress(range(5), "encode", every=2)) == [0, 1, 2, 3, 4]
    err = capsys.readouterr().err.splitlines()
    assert [ln.split(" |")[0] for ln in err[:2]] == ["encode 2/5 batches (40%)", "encode 4/5 batches (80%)"]
    assert err[2].startswith("encode: 5 batches in 0:0")
