"""`tcae-ldm sample`: PNGs, a grid and the ADM-style .npz from a DiT checkpoint."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from tcae_ldm.cli import main
from tcae_ldm.data.demo import DemoPhotosDataModule
from tcae_ldm.lit.caching import cache_latents
from tests.tiny import REPO, callbacks_arg, tiny_tcae_checkpoint

DEMO = os.path.join(REPO, "configs", "demo", "dit_on_tcae.yaml")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 16-image cache of 16x4x4 latents, then DiT-T/1 runs from the demo config: 5 steps straight, and
    3 steps + resume from `last` to 5 (batch 8: the resume falls in the middle of a pass over the cache)."""
    root = tmp_path_factory.mktemp("dit")
    ckpt = tiny_tcae_checkpoint(root / "ae.ckpt", seed=0)
    images = DemoPhotosDataModule(image_size=32, train_per_class=2, val_per_class=1)
    cache = cache_latents({"kind": "tcae", "path": ckpt}, images, str(root / "latents"), accelerator="cpu")
    old = os.getcwd()
    out = {"root": root, "ae": ckpt, "cache": cache}
    try:
        for name, phases in (("straight", [5]), ("resumed", [3, 5])):
            os.makedirs(root / name)
            os.chdir(root / name)  # the demo config's relative runs/demo/... paths land here
            for i, steps in enumerate(phases):
                main(["fit", "--config", DEMO, f"--data.cache_dir={cache}", "--data.expect_image_size=32",
                      "--data.expect_autoencoder.name=TC-AE-T/p4-c16", f"--data.expect_autoencoder.path={ckpt}",
                      "--data.global_batch_size=8",
                      "--model.dit=DiT-T/1", "--model.dit_args={class_dropout_prob: 0.1}", "--model.sample_steps=2",
                      "--model.sample_every_n_steps=2", "--model.sample_grid_size=4", "--model.warmup_steps=3",
                      callbacks_arg(), "--trainer.log_every_n_steps=1",
                      f"--trainer.max_steps={steps}"] + (["--ckpt_path=last"] if i else []))
            out[name] = root / name / "runs" / "demo" / "dit_tcae"
    finally:
        os.chdir(old)
    return out


def test_sample_command_writes_pngs_grid_npz(runs, tmp_path):
    ckpt = str(runs["straight"] / "checkpoints" / "last.ckpt")
    common = ["sample", "--ckpt", ckpt, "--num", "5", "--labels", "1,2", "--steps", "2", "--batch-size", "2"]
    main(common + ["--out", str(tmp_path / "a")])
    files = sorted(os.listdir(tmp_path / "a"))
    assert files == ["grid.png", "images", "samples_5x32x32x3.npz"]
    assert sorted(os.listdir(tmp_path / "a" / "images")) == [f"{i:06d}.png" for i in range(5)]
    npz = np.load(tmp_path / "a" / "samples_5x32x32x3.npz")
    assert npz["arr_0"].shape == (5, 32, 32, 3) and npz["arr_0"].dtype == np.uint8
    assert npz["labels"].tolist() == [1, 2, 1, 2, 1]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a" / "images" / "000003.png")), npz["arr_0"][3])

    # The same decoder and stats given explicitly give the same samples; a foreign decoder is refused.
    main(common + ["--out", str(tmp_path / "b"), "--autoencoder-kind", "tcae", "--autoencoder-path", runs["ae"],
                   "--cache-dir", runs["cache"]])
    assert np.array_equal(np.load(tmp_path / "b" / "samples_5x32x32x3.npz")["arr_0"], npz["arr_0"])
    other = tiny_tcae_checkpoint(tmp_path / "other.ckpt", seed=1)
    with pytest.raises(ValueError, match="would give wrong images"):
        main(common + ["--out", str(tmp_path / "c"), "--autoencoder-kind", "tcae", "--autoencoder-path", other])
    finetuned = torch.load(runs["ae"], weights_only=True)  # same encoder (latent space), another decoder
    finetuned["state_dict"]["net.decoder.to_pixels.bias"] += 0.5
    torch.save(finetuned, tmp_path / "decoder_ft.ckpt")
    main(common + ["--out", str(tmp_path / "e"), "--autoencoder-kind", "tcae", "--autoencoder-path",
                   str(tmp_path / "decoder_ft.ckpt")])
    assert not np.array_equal(np.load(tmp_path / "e" / "samples_5x32x32x3.npz")["arr_0"], npz["arr_0"])
    with pytest.raises(ValueError, match=r"class indices must lie in \[0, 8\)"):
        main(["sample", "--ckpt", ckpt, "--out", str(tmp_path / "d"), "--labels", "9"])

