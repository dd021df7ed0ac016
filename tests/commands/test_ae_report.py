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
    assert not any(k.startswith("rfid_") for k in report["autoencoder"])  # no FID network, no rFID column


def test_rfid_of_both_rows_under_one_network(tmp_path):
    """With --features, the autoencoder and the bicubic baseline get an rFID on the same images by the same network;
    the column names the network and the image count."""
    module = tiny_module(max_steps=1)
    tiny_trainer(str(tmp_path)).fit(module, tiny_data())
    ckpt = str(tmp_path / "ckpt" / "last.ckpt")
    report = main(["--ckpt", ckpt, "--out", str(tmp_path / "report"), "--val-per-class", "2", "--features", "random"])
    ae, bic = report["autoencoder"]["rfid_random"], report["bicubic"]["rfid_random"]
    assert ae > 0 and bic > 0 and ae != bic  # two reconstructions, two distances
    assert "| rfid_random (16 images) |" in (tmp_path / "report" / "ae_report.md").read_text()
    with pytest.raises(SystemExit) as err:
        main(["--ckpt", ckpt, "--out", str(tmp_path / "report"), "--features", "inceptoin"])
    assert "unknown FID feature network 'inceptoin'" in str(err.value)



def test_a_dit_checkpoint_or_a_missing_file_fails_on_one_line(tmp_path):
    dit = tiny_dit_checkpoint(tmp_path / "dit.ckpt")
    for path, message in ((dit, "dit.ckpt is a DiffusionModule checkpoint (DiT-T/1); expected an autoencoder "
                                "checkpoint: an AutoencoderModule's .ckpt"),
                          (str(tmp_path / "none.ckpt"), "none.ckpt does not exist; expected an autoencoder checkpoint")):
        with pytest.raises(SystemExit) as err:
            main(["--ckpt", path, "--out", str(tmp_path / "report")])
        assert str(err.value).startswith("tcae-ldm ae-report: error: ") and message in str(err.value)
    assert not (tmp_path / "report").exists()
