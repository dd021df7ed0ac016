"""`tcae-ldm ae-report`: a trained autoencoder against the bicubic baseline with the same float budget."""
import json

import pytest

from tcae_ldm.commands.ae_report import main
from tests.tiny import REPO, tiny_data, tiny_dit_checkpoint, tiny_module, tiny_trainer


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


def test_any_image_folder_or_a_configs_datamodule(tmp_path):
    """--images scores the ADM centre crops of any folder (here: PNGs of the crops a direct call scores, so the
    numbers must agree exactly); --data-config scores the validation split of a training config's datamodule (the
    demo config's: the same crops as the default demo route)."""
    import numpy as np
    import torch
    from PIL import Image

    from tcae_ldm.metrics.reconstruction import evaluate_against_bicubic

    module = tiny_module(max_steps=1)
    tiny_trainer(str(tmp_path)).fit(module, tiny_data())
    ckpt = str(tmp_path / "ckpt" / "last.ckpt")
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    for i, crop in enumerate(crops):
        Image.fromarray(crop).save(tmp_path / "imgs" / ("sub" if i % 2 else "") / f"{i}.png")
    report = main(["--ckpt", ckpt, "--out", str(tmp_path / "folder"), "--images", str(tmp_path / "imgs"),
                   "--batch-size", "2"])
    order = sorted(range(5), key=lambda i: str(tmp_path / "imgs" / ("sub" if i % 2 else "") / f"{i}.png"))
    x = torch.from_numpy(crops[order]).permute(0, 3, 1, 2).float() / 127.5 - 1
    direct = evaluate_against_bicubic(_reloaded(ckpt), [{"image": x}], 32)  # the checkpoint's weights
    assert report["images"] == 5 and report["autoencoder"] == direct["autoencoder"]
    assert report["bicubic"] == direct["bicubic"] and report["images_from"] == str(tmp_path / "imgs")

    demo = main(["--ckpt", ckpt, "--out", str(tmp_path / "demo")])
    config = main(["--ckpt", ckpt, "--out", str(tmp_path / "config"), "--data-config", f"{REPO}/configs/demo/tcae.yaml"])
    assert config["images"] == demo["images"] == 512 and config["autoencoder"] == demo["autoencoder"]
    with pytest.raises(SystemExit, match="no `data:` section naming a datamodule of tcae_ldm.data"):
        main(["--ckpt", ckpt, "--out", str(tmp_path / "x"), "--data-config", f"{REPO}/configs/overlays/wandb.yaml"])


def _reloaded(ckpt):
    from tcae_ldm.lit.loading import load_autoencoder_module

    return load_autoencoder_module(ckpt, metrics_lpips=None, metrics_fid=None).eval_net
