"""`tcae-ldm sample`: PNGs, a grid and the ADM-style .npz from a DiT checkpoint."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from tcae_ldm.cli import main
from tcae_ldm.commands.fid import NpzImages
from tcae_ldm.data.demo import DemoPhotosDataModule
from tcae_ldm.data.transforms import to_uint8
from tcae_ldm.diffusion import DDPM
from tcae_ldm.lit.caching import cache_latents
from tcae_ldm.lit.loading import load_diffusion_module
from tests.latents.test_frozen import TINY_SDVAE
from tests.models.test_dit import NUM_CLASSES, official_checkpoint
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
    assert npz["labels"].tolist() == [1, 2, 1, 2, 1] and npz["arr_1"].tolist() == [1, 2, 1, 2, 1]  # ADM's name
    assert sorted(npz.keys()) == ["arr_0", "arr_1", "labels"]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a" / "images" / "000003.png")), npz["arr_0"][3])
    streamed = torch.cat(list(NpzImages(str(tmp_path / "a" / "samples_5x32x32x3.npz"), batch_size=2)))  # what fid reads
    assert np.array_equal(streamed.permute(0, 2, 3, 1).numpy(), npz["arr_0"])

    # The same decoder and stats given explicitly give the same samples; a foreign decoder is refused.
    main(common + ["--out", str(tmp_path / "b"), "--autoencoder-kind", "tcae", "--autoencoder-path", runs["ae"],
                   "--cache-dir", runs["cache"]])
    assert np.array_equal(np.load(tmp_path / "b" / "samples_5x32x32x3.npz")["arr_0"], npz["arr_0"])
    other = tiny_tcae_checkpoint(tmp_path / "other.ckpt", seed=1)
    with pytest.raises(SystemExit, match="would give wrong images"):
        main(common + ["--out", str(tmp_path / "c"), "--autoencoder-kind", "tcae", "--autoencoder-path", other])
    finetuned = torch.load(runs["ae"], weights_only=True)  # same encoder (latent space), another decoder
    finetuned["state_dict"]["net.decoder.to_pixels.bias"] += 0.5
    torch.save(finetuned, tmp_path / "decoder_ft.ckpt")
    main(common + ["--out", str(tmp_path / "e"), "--autoencoder-kind", "tcae", "--autoencoder-path",
                   str(tmp_path / "decoder_ft.ckpt")])
    assert not np.array_equal(np.load(tmp_path / "e" / "samples_5x32x32x3.npz")["arr_0"], npz["arr_0"])
    with pytest.raises(SystemExit, match=r"class indices must lie in \[0, 8\)"):
        main(["sample", "--ckpt", ckpt, "--out", str(tmp_path / "d"), "--labels", "9"])



def test_balanced_labels_by_default(runs, tmp_path):
    ckpt = str(runs["straight"] / "checkpoints" / "last.ckpt")
    main(["sample", "--ckpt", ckpt, "--num", "10", "--steps", "1", "--batch-size", "4", "--out", str(tmp_path)])
    assert np.load(tmp_path / "samples_10x32x32x3.npz")["labels"].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 0, 1]


def test_uniform_labels_are_seeded_draws(runs, tmp_path):
    """--labels uniform: the classes drawn uniformly from --seed (as DiT's sample_ddp.py draws them), the same for
    the same seed, others for another; the written labels are the ones the samples were conditioned on."""
    ckpt = str(runs["straight"] / "checkpoints" / "last.ckpt")
    got = {}
    for seed in (3, 3, 4):
        out = tmp_path / f"s{seed}-{len(got)}"
        main(["sample", "--ckpt", ckpt, "--num", "12", "--steps", "1", "--batch-size", "6", "--labels", "uniform",
              "--seed", str(seed), "--out", str(out)])
        got[len(got)] = np.load(out / "samples_12x32x32x3.npz")["labels"].tolist()
    expected = torch.randint(8, (12,), generator=torch.Generator().manual_seed(3)).tolist()
    assert got[0] == got[1] == expected and got[2] != got[0]
    assert expected != [0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3] and all(0 <= y < 8 for y in got[2])


class Opaque:
    """A pickled object of a type no checkpoint holds."""


def test_wrong_files_and_settings_fail_on_one_line(runs, tmp_path):
    ckpt = str(runs["straight"] / "checkpoints" / "last.ckpt")
    (tmp_path / "empty.ckpt").write_bytes(b"")
    (tmp_path / "truncated.ckpt").write_bytes(open(ckpt, "rb").read()[:4096])
    (tmp_path / "text.ckpt").write_text("not a checkpoint")
    torch.save({"thing": Opaque()}, tmp_path / "opaque.ckpt")
    ae_module = os.path.join(REPO, "tests", "fixtures", "pre_layout_autoencoder.ckpt")  # written by AutoencoderModule
    dit = "expected a DiT checkpoint: a DiffusionModule's .ckpt"
    cases = [
        (["--ckpt", str(tmp_path / "missing.ckpt")], f"missing.ckpt does not exist; {dit}"),
        (["--ckpt", runs["ae"]], f"is an AutoencoderModule checkpoint (TC-AE-T/p4-c16); {dit}"),
        (["--ckpt", ae_module], f"is an AutoencoderModule checkpoint (TC-AE-T/p4-c16); {dit}"),
        (["--ckpt", str(tmp_path / "empty.ckpt")], f"empty.ckpt is empty (0 bytes); {dit}"),
        (["--ckpt", str(tmp_path / "truncated.ckpt")], "truncated.ckpt cannot be read as a checkpoint (truncated"),
        (["--ckpt", str(tmp_path / "text.ckpt")], "text.ckpt cannot be read as a checkpoint (truncated"),
        (["--ckpt", str(tmp_path / "opaque.ckpt")], "opaque.ckpt holds pickled objects that loading would have to run code to build (tests.commands.test_sample.Opaque); it was not loaded"),
        (["--ckpt", str(tmp_path)], f"is a folder without config.json and model.safetensors; {dit}"),
        (["--ckpt", ckpt, "--num", "0"], "--num must be at least 1, got 0"),
        (["--ckpt", ckpt, "--batch-size", "-2"], "--batch-size must be at least 1, got -2"),
        (["--ckpt", ckpt, "--sampler", "ddim"], "sampler 'ddim' does not fit the flow objective: choose one of"),
        (["--ckpt", ckpt, "--steps", "0"], "0 sampling steps: the flow objective takes at least 1"),
        (["--ckpt", ckpt, "--autoencoder-kind", "sdvae"], "--autoencoder-kind and --autoencoder-path go together"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as err:
            main(["sample", "--out", str(tmp_path / "out"), *args])
        text = str(err.value)
        assert text.startswith("tcae-ldm sample: error: ") and message in text and "\n" not in text, (args, text)
    assert not os.path.exists(tmp_path / "out")  # nothing written before the inputs are checked


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """A facebookresearch/DiT-layout checkpoint of a random DiT-T/2 on 4x16x16 latents and a tiny SD-VAE folder."""
    from diffusers import AutoencoderKL

    root = tmp_path_factory.mktemp("official")
    model, state = official_checkpoint(input_size=16)
    torch.save(state, root / "DiT-T-2.pt")
    torch.manual_seed(0)
    vae = AutoencoderKL(**TINY_SDVAE).eval()
    vae.save_pretrained(root / "vae")
    return {"ckpt": str(root / "DiT-T-2.pt"), "vae": str(root / "vae"), "model": model.eval(), "vaemodel": vae}


def test_official_dit_is_sampled_as_dit_does(official, tmp_path):
    module = load_diffusion_module(official["ckpt"], autoencoder={"kind": "sdvae", "path": official["vae"]})
    hp = module.hparams
    assert (hp.objective, module.sampler, hp.sample_steps, hp.cfg_scale, hp.cfg_channels) == ("ddpm", "ddpm", 250, 1.5, 3)
    main(["sample", "--ckpt", official["ckpt"], "--out", str(tmp_path), "--num", "3", "--labels", "1,2,3",
                "--steps", "3", "--batch-size", "3", "--autoencoder-kind", "sdvae", "--autoencoder-path",
                official["vae"], "--seed", "5"])
    arr = np.load(tmp_path / "samples_3x32x32x3.npz")["arr_0"]
    # DiT's own recipe by hand: CFG 1.5 on 3 of 4 channels, 3 respaced DDPM steps, decode z / 0.18215
    g = torch.Generator().manual_seed(5)
    noise = torch.randn((3, 4, 16, 16), generator=g)
    with torch.no_grad():
        z = DDPM().sample(official["model"], noise, torch.tensor([1, 2, 3]), steps=3, cfg_scale=1.5,
                          null_label=NUM_CLASSES, generator=g, guide_channels=3)
        images = official["vaemodel"].decode(z / 0.18215).sample.clamp(-1, 1)
    expected = to_uint8(images).permute(0, 2, 3, 1).numpy()
    assert np.abs(arr.astype(int) - expected.astype(int)).max() <= 1  # 1/0.18215 vs / 0.18215 rounding


def test_official_dit_without_its_vae_fails_on_one_line(official, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(SystemExit) as err:
        main(["sample", "--ckpt", official["ckpt"], "--out", str(tmp_path / "o"), "--num", "1"])
    assert "SD-VAE 'stabilityai/sd-vae-ft-ema' could not be loaded offline" in str(err.value)
    assert "hf download stabilityai/sd-vae-ft-ema" in str(err.value)


@pytest.mark.slow
def test_two_gloo_processes_write_every_index_once(runs, tmp_path, one_thread):
    """`sample` on 2 CPU processes (DDP, gloo): 7 samples in 4 chunks of 2, two chunks per rank, every index
    written once, and the same images as one process draws (one thread everywhere: the same float sums)."""
    ckpt = str(runs["straight"] / "checkpoints" / "last.ckpt")
    common = ["sample", "--ckpt", ckpt, "--num", "7", "--batch-size", "2", "--steps", "2"]
    main(common + ["--out", str(tmp_path / "one")])
    env = {**os.environ, "PYTHONPATH": REPO, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "tcae_ldm.cli", *common, "--out", str(tmp_path / "two"),
                          "--accelerator", "cpu", "--devices", "2"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(os.listdir(tmp_path / "two" / "images")) == [f"{i:06d}.png" for i in range(7)]
    assert "2/2" in res.stderr and "4/4" not in res.stderr  # rank 0's progress bar: half of the 4 chunks
    one, two = (np.load(tmp_path / d / "samples_7x32x32x3.npz") for d in ("one", "two"))
    assert np.array_equal(one["arr_0"], two["arr_0"]) and np.array_equal(one["labels"], two["labels"])
