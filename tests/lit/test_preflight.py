"""Preflight: everything a long run lacks is reported at once, in one message, before the first step."""
import collections
import errno
import os

import pytest
import torch

from tcae_ldm.cli import main
from tcae_ldm.data.images import ImageFolderDataModule
from tcae_ldm.lit.preflight import PreflightError, estimate_checkpoint_bytes
from tests.tiny import (
    REPO,
    TINY,
    callbacks_arg,
    dit_argv,
    tiny_latent_cache,
    tiny_module,
    tiny_trainer,
)

Usage = collections.namedtuple("Usage", "total used free")


@pytest.fixture
def no_disk(monkeypatch):
    monkeypatch.setattr("tcae_ldm.lit.preflight.shutil.disk_usage", lambda path: Usage(10**12, 10**12 - 1000, 1000))


def test_a_dit_run_reports_every_missing_item_at_once(tmp_path, monkeypatch, no_disk):
    ae, cache = tiny_latent_cache(str(tmp_path))
    shard = os.path.join(cache, "shard-r0-00000.safetensors")
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) - 16)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    monkeypatch.chdir(tmp_path)
    gen = {"reference_stats": "missing_ref.npz", "features": "inception", "features_weights": None,
           "every_n_steps": 1000}
    argv = dit_argv(cache, ae, 4, callbacks_arg(1, gen))
    argv[argv.index(f"--data.expect_autoencoder.path={ae}")] = "--data.expect_autoencoder.path=gone/ae.ckpt"
    with pytest.raises(PreflightError) as err:
        main(argv)
    msg = str(err.value)
    assert msg.startswith("this run cannot start, 5 problem(s) found before the first step: (1) ")
    for part in (f"cache shard {shard} is truncated or padded",
                 "data.expect_autoencoder.path gone/ae.ckpt does not exist",
                 "GenerationEvalCallback.reference_stats missing_ref.npz does not exist",
                 f"the inception FID network (GenerationEvalCallback.features_weights) needs the weight file "
                 f"{tmp_path / 'empty_torch_home' / 'hub' / 'checkpoints'}",
                 "runs/demo/dit_tcae/checkpoints need about"):
        assert part in msg, part
    assert "\n" not in msg and not os.path.exists("runs/demo/dit_tcae/checkpoints")  # nothing trained or saved


def test_an_autoencoder_run_reports_its_data_root_init_checkpoint_and_disk(tmp_path, no_disk):
    module = tiny_module(init_from=str(tmp_path / "joint.ckpt"))
    data = ImageFolderDataModule(str(tmp_path / "imagenet"), image_size=32, num_workers=0)
    with pytest.raises(PreflightError) as err:
        tiny_trainer(str(tmp_path)).fit(module, data)
    msg = str(err.value)
    assert f"(1) model.init_from {tmp_path / 'joint.ckpt'} does not exist" in msg
    assert f"(2) data root {tmp_path / 'imagenet'} does not exist" in msg
    assert f"(3) checkpoints in {tmp_path / 'ckpt'} need about" in msg and "only 0.00 GB are free" in msg


def test_checkpoint_size_estimate_counts_weights_and_adam_moments(tmp_path):
    module = tiny_module()
    state = sum(t.numel() * t.element_size() for t in module.state_dict().values())
    trainable = sum(p.numel() * 4 for p in module.parameters() if p.requires_grad)
    assert estimate_checkpoint_bytes(module) == state + 2 * trainable
    tiny_trainer(str(tmp_path)).fit(module, __import__("tests.tiny").tiny.tiny_data())
    path = tmp_path / "ckpt" / "last.ckpt"
    assert 0.9 < os.path.getsize(path) / estimate_checkpoint_bytes(module) < 1.2  # against a real checkpoint
    torch.load(path, weights_only=False)


def test_the_command_line_lists_the_lpips_trunk_with_every_other_missing_file(tmp_path, monkeypatch):
    """model.loss reaches the module as a dict from a config: the LPIPS file is still in the one message."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.chdir(tmp_path)
    argv = ["fit", "--config", os.path.join(REPO, "configs", "demo", "tcae.yaml"), *TINY,
            "--model.init_args.loss.lpips_weight=0.5", "--model.init_args.metrics_fid=inception",
            f"--model.init_args.metrics_fid_weights={tmp_path / 'inception.pth'}"]
    with pytest.raises(PreflightError) as err:
        main(argv)
    vgg = tmp_path / "torch" / "hub" / "checkpoints" / "vgg16-397923af.pth"
    assert str(err.value) == (
        f"this run cannot start, 2 problem(s) found before the first step: (1) LPIPS (model.loss.lpips_trunk) needs "
        f"the weight file {vgg}, which does not exist; (2) the inception FID network (model.metrics_fid_weights) "
        f"needs the weight file {tmp_path / 'inception.pth'}, which does not exist")
    assert not (tmp_path / "runs").exists()  # found before anything was written


def test_an_output_folder_that_cannot_be_written_is_named_before_the_first_step(tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("in the way of the run's folder")
    data = ImageFolderDataModule(str(tmp_path), image_size=32, num_workers=0)
    os.makedirs(tmp_path / "train" / "a")
    with pytest.raises(PreflightError) as err:  # a file where the folder should be
        tiny_trainer(str(tmp_path / "a_file" / "run")).fit(tiny_module(), data)
    assert str(err.value) == (
        f"this run cannot start, 2 problem(s) found before the first step: (1) the run's folder "
        f"{tmp_path / 'a_file' / 'run'} cannot be written: {tmp_path / 'a_file'} is a file, not a folder; "
        f"(2) checkpoints in {tmp_path / 'a_file' / 'run' / 'ckpt'} cannot be written: {tmp_path / 'a_file'} is a "
        f"file, not a folder")

    def read_only(dir, prefix):  # what a read-only mount answers (root passes every permission check)
        raise OSError(errno.EROFS, "Read-only file system", dir)

    monkeypatch.setattr("tcae_ldm.lit.preflight.tempfile.mkstemp", read_only)
    with pytest.raises(PreflightError) as err:
        tiny_trainer(str(tmp_path / "ro")).fit(tiny_module(), data)
    assert f"(1) the run's folder {tmp_path / 'ro'} cannot be written: {tmp_path}: Read-only file system" in str(err.value)


def test_a_dcae_hub_id_is_looked_up_in_the_local_hugging_face_cache(tmp_path, monkeypatch):
    """Offline, a DC-AE named by its Hub id must be in the local cache (the snapshot that refs/main names);
    online, it may be downloaded; a local folder or checkpoint is checked as a path."""
    from tcae_ldm.lit.preflight import _autoencoder_problem

    repo, key = "mit-han-lab/dc-ae-f32c32-in-1.0-diffusers", "data.autoencoder"
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert _autoencoder_problem({"kind": "dcae", "path": repo}, key) == [
        f"{key} {repo!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set (`hf download {repo}` "
        f"where the Hub is reachable, or give a local folder)"]
    cached = tmp_path / "hub" / "models--mit-han-lab--dc-ae-f32c32-in-1.0-diffusers"
    (cached / "snapshots" / "abc123").mkdir(parents=True)
    (cached / "refs").mkdir()
    (cached / "refs" / "main").write_text("abc123")
    assert len(_autoencoder_problem({"kind": "dcae", "path": repo}, key)) == 1  # a snapshot without config.json
    (cached / "snapshots" / "abc123" / "config.json").write_text("{}")
    assert _autoencoder_problem({"kind": "dcae", "path": repo}, key) == []

    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert _autoencoder_problem({"kind": "dcae", "path": repo}, key) == []  # online: from_pretrained downloads it
    assert _autoencoder_problem({"kind": "dcae", "path": "./dcae_local"}, key) == [f"{key} ./dcae_local does not exist"]
    assert _autoencoder_problem({"kind": "tcae", "path": repo}, key) == [f"{key} {repo} does not exist"]
