import json

import torch

from tcae_ldm.metrics.ae_report import bicubic_roundtrip, bicubic_side, main
from tests.test_autoencoder_module import _data, _module, _trainer


def test_bicubic_baseline_keeps_no_more_floats_than_the_latent():
    assert bicubic_side(32 * 4 * 4) == 13  # 507 <= 512 floats
    assert bicubic_side(128 * 8 * 8) == 52  # paper scale: 8112 <= 8192
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    assert bicubic_roundtrip(x, 13).shape == x.shape
    flat = torch.zeros(1, 3, 64, 64)
    assert torch.allclose(bicubic_roundtrip(flat, 13), flat)


def test_report_on_a_trained_checkpoint(tmp_path):
    module = _module(max_steps=1)
    _trainer(str(tmp_path)).fit(module, _data())
    report = main(["--ckpt", str(tmp_path / "ckpt" / "last.ckpt"), "--out", str(tmp_path / "report"),
                   "--val-per-class", "2"])
    on_disk = json.loads((tmp_path / "report" / "ae_report.json").read_text())
    assert on_disk["images"] == 16 and on_disk["step"] == 1
    assert on_disk["latent_floats"] == 16 * 2 * 2 and on_disk["bicubic_floats"] <= 64
    assert report["bicubic"]["psnr"] > 10 and "| bicubic" in (tmp_path / "report" / "ae_report.md").read_text()
