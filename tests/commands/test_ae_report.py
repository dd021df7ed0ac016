"""`tcae-ldm ae-report`: a trained autoencoder against the bicubic baseline with the same float budget."""
import json

from tcae_ldm.commands.ae_report import main
from tests.tiny import tiny_data, tiny_module, tiny_trainer


def test_report_on_a_trained_checkpoint(tmp_path):
    module = tiny_module(max_steps=1)
    tiny_trainer(str(tmp_path)).fit(module, tiny_data())
    report = main(["--ckpt", str(tmp_path / "ckpt" / "last.ckpt"), "--out", str(tmp_path / "report"),
                   "--val-per-class", "2"])
    on_disk = json.loads((tmp_path / "report" / "ae_report.json").read_text())
    assert on_disk["images"] == 16 and on_disk["step"] == 1
    assert on_disk["latent_floats"] == 16 * 2 * 2 and on_disk["bicubic_floats"] <= 64
    assert report["bicubic"]["psnr"] > 10 and "| bicubic" in (tmp_path / "report" / "ae_report.md").read_text()

