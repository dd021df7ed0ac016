"""`tcae-ldm ae-report`: a trained autoencoder against the bicubic baseline with the same float budget."""
import json

import pytest

from tcae_ldm.commands.ae_report import main
from tests.tiny import tiny_data, tiny_dit_checkpoint, tiny_module, tiny_trainer


def test_report_on_a_trained_checkpoint(tmp_path):
    module = tiny_module(max_steps=1)
    tiny_trainer(str(tmp_path)).fit(module, tiny_data())
    report = main(["--ckpt", str(tmp_path / "ckpt" / "last.ckpt"), "--out", str(tmp_path / "report"),
                   "--val-per-class", "2"])
    on_disk = json.loads((tmp_path / "report" / "ae_report.json").read_text())
    assert on_disk["images"] == 16 and on_disk["step"] == 1
    assert on_disk["latent_floats"] == 16 * 2 * 2 and on_disk["bicubic_floats"] <= 64
    assert report["bicubic"]["psnr"] > 10 and "| bicubic" in (tmp_path / "report" / "ae_report.md").read_text()



def test_a_dit_checkpoint_or_a_missing_file_fails_on_one_line(tmp_path):
    dit = tiny_dit_checkpoint(tmp_path / "dit.ckpt")
    for path, message in ((dit, "dit.ckpt is a DiffusionModule checkpoint (DiT-T/1); expected an autoencoder "
                                "checkpoint: an AutoencoderModule's .ckpt"),
                          (str(tmp_path / "none.ckpt"), "none.ckpt does not exist; expected an autoencoder checkpoint")):
        with pytest.raises(SystemExit) as err:
            main(["--ckpt", path, "--out", str(tmp_path / "report")])
        assert str(err.value).startswith("tcae-ldm ae-report: error: ") and message in str(err.value)
    assert not (tmp_path / "report").exists()
