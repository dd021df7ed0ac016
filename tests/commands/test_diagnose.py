"""`tcae-ldm diagnose` end to end on a trained checkpoint."""
import json

import pytest
import torch

from tcae_ldm.cli import main as cli_main
from tests.models.test_dit import official_checkpoint
from tests.tiny import tiny_data, tiny_dit_checkpoint, tiny_module, tiny_trainer


def test_diagnose_command_end_to_end(tmp_path):
    torch.manual_seed(0)
    module = tiny_module(max_steps=1)
    tiny_trainer(str(tmp_path / "run")).fit(module, tiny_data())
    out = tmp_path / "diag"
    cli_main(["diagnose", "--ckpt", str(tmp_path / "run" / "ckpt" / "last.ckpt"), "--out", str(out),
              "--train-per-class", "3", "--val-per-class", "2", "--tokens", "coarse", "--batch-size", "16"])
    res = json.loads((out / "diagnostics.json").read_text())
    assert res["step"] == 1 and res["tokens"] == "coarse"
    assert (res["train_images"], res["val_images"]) == (24, 16)
    assert res["latent_shape"] == [16, 2, 2] and len(res["spectrum"]["eigenvalues"]) == 16
    assert 1.0 <= res["spectrum"]["effective_rank"] <= 16.0
    md = (out / "diagnostics.md").read_text()
    for row in ("A1: linear probe", "A2: linear probe", "chance", "effective rank / c", "90% / 99%"):
        assert row in md
    assert "12.5%" in md  # chance for the 8 demo classes
    from PIL import Image

    for name in ("spectrum.png", "probes.png"):  # the figures beside the numbers, small
        with Image.open(out / name) as img:
            assert img.format == "PNG" and img.size[0] >= 300 and (out / name).stat().st_size < 100_000



def test_a_dit_checkpoint_fails_on_one_line(tmp_path):
    torch.save(official_checkpoint()[1], tmp_path / "DiT-T-2.pt")  # a facebookresearch/DiT release's layout
    cases = [(tiny_dit_checkpoint(tmp_path / "dit.ckpt"), "is a DiffusionModule checkpoint (DiT-T/1)"),
             (str(tmp_path / "DiT-T-2.pt"), "is a facebookresearch/DiT checkpoint")]
    for path, message in cases:
        with pytest.raises(SystemExit) as err:
            cli_main(["diagnose", "--ckpt", path, "--out", str(tmp_path / "diag")])
        text = str(err.value)
        assert text.startswith("tcae-ldm diagnose: error: ") and message in text
        assert "expected an autoencoder checkpoint" in text and "\n" not in text
