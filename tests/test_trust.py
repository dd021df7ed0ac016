"""Files are data, never code: a checkpoint-shaped file whose pickle would create a file when unpickled is sent
through every entry point that loads a file; the sentinel never appears and each refusal is one line naming the
file. Only utils/checkpoints.py calls torch.load, so a new entry point cannot forget."""
import ast
import hashlib
import json
import os
import re
import shutil

import lightning
import pytest
import torch

from tcae_ldm.cli import main, run
from tcae_ldm.utils.checkpoints import (
    TRUST_ENV,
    CorruptCheckpointError,
    UntrustedFileError,
    checked,
    load_torch_file,
    read_checkpoint,
)
from tests.tiny import REPO, TINY, Touch, tiny_data, tiny_dit_checkpoint, tiny_latent_cache, tiny_module, tiny_trainer

PACKAGE = os.path.join(REPO, "tcae_ldm")
LOADER = os.path.join(PACKAGE, "utils", "checkpoints.py")
REFUSED = "holds pickled objects that loading would have to run code to build ("


def evil_checkpoint(path, sentinel, legacy=False, **contents):
    """A file shaped like an AutoencoderModule checkpoint (or `contents`) that carries a Touch(sentinel)."""
    ckpt = contents or {"hyper_parameters": {"net": "TC-AE-T/p4-c16"}, "state_dict": {"net.w": torch.zeros(2)},
                        "global_step": 7}
    torch.save({**ckpt, "payload": Touch(sentinel)}, path, _use_new_zipfile_serialization=not legacy)
    return str(path)


def _unpickling_calls(path):
    """Lines of a file that call torch.load, pickle.load(s) or torch.serialization.load (comments do not count)."""
    lines = []
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("load", "loads"):
            owner = ast.unparse(node.func.value)
            if owner in ("torch", "pickle", "torch.serialization", "cPickle", "dill"):
                lines.append(f"{os.path.relpath(path, REPO)}:{node.lineno}")
    return lines


def test_only_the_loader_unpickles():
    calls = [line for root, _, files in os.walk(PACKAGE) for f in files if f.endswith(".py")
             and os.path.join(root, f) != LOADER for line in _unpickling_calls(os.path.join(root, f))]
    assert calls == [], f"unpickling outside tcae_ldm/utils/checkpoints.py (use load_torch_file): {calls}"
    assert _unpickling_calls(LOADER)  # the scan finds the loader's own call


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A real tiny latent cache (and its autoencoder) and a tiny DiT checkpoint to point the evil files from."""
    root = tmp_path_factory.mktemp("made")
    ae, cache = tiny_latent_cache(str(root))
    dit = tiny_dit_checkpoint(root / "dit.ckpt")
    torch.save({**torch.load(dit, weights_only=True), "pytorch-lightning_version": lightning.__version__}, dit)
    return {"ae": ae, "cache": cache, "dit": dit}


def _evil_cache(made, root, evil):
    """A copy of the cache whose metadata.json names `evil` as the autoencoder that made it."""
    cache = str(root / "cache")
    shutil.copytree(made["cache"], cache)
    meta = json.loads(open(os.path.join(cache, "metadata.json")).read())
    meta["autoencoder_spec"]["path"] = evil
    meta["autoencoder"]["path"] = evil
    with open(os.path.join(cache, "metadata.json"), "w") as f:
        json.dump(meta, f)
    return cache


def _cli(argv):
    run(argv)  # the one-line error goes to stderr, then SystemExit(1)


def _entry_points():
    """name -> f(evil, made, tmp_path): load `evil` through that entry point (it must raise)."""
    tcae = os.path.join(REPO, "configs", "demo", "tcae.yaml")

    def lightning(sub):
        return lambda evil, made, tmp: _cli([sub, "--config", tcae, *TINY, f"--ckpt_path={evil}"])

    def fit_api(evil, made, tmp):
        tiny_trainer(str(tmp), max_steps=1).fit(tiny_module(), tiny_data(), ckpt_path=evil)

    def init_from(evil, made, tmp):
        tiny_trainer(str(tmp), max_steps=1).fit(tiny_module(init_from=evil), tiny_data())

    def cache_run(evil, made, tmp):
        from tcae_ldm.data.demo import DemoPhotosDataModule
        from tcae_ldm.lit.caching import cache_latents

        cache_latents({"kind": "tcae", "path": evil}, DemoPhotosDataModule(image_size=32, train_per_class=1,
                      val_per_class=1), str(tmp / "latents"), accelerator="cpu")

    def expect_autoencoder(evil, made, tmp):
        from tcae_ldm.latents.stream import LatentDataModule

        LatentDataModule(made["cache"], expect_autoencoder={"kind": "tcae", "path": evil}).setup("fit")

    def metadata_grid(evil, made, tmp):  # what a DiT run's sample grids decode with
        from tcae_ldm.lit.diffusion import DiffusionModule

        module = DiffusionModule(dit="DiT-T/1", latent_shape=(16, 4, 4), num_classes=8)
        module.set_decoder(cache_dir=_evil_cache(made, tmp, evil))
        module.autoencoder  # noqa: B018  (loaded on first use)

    def stats(evil, made, tmp):
        from tcae_ldm.latents.cache import read_stats

        cache = str(tmp / "cache")
        shutil.copytree(made["cache"], cache)
        shutil.copy(evil, os.path.join(cache, "latents_stats.pt"))
        _record_stats_checksum(cache)  # whoever rewrote the file rewrote its checksum too
        read_stats(cache)

    def weights(kind):
        def load(evil, made, tmp):
            if kind == "lpips":
                from tcae_ldm.losses.lpips import build_lpips
                build_lpips(evil)
            else:
                from tcae_ldm.metrics.features import DemoClassifierFeatures, InceptionFeatures
                (InceptionFeatures if kind == "inception" else DemoClassifierFeatures.load)(evil)
        return load

    def damaged_probe(evil, made, tmp):  # the newest checkpoint beside a damaged one is read for its global step
        folder = tmp / "ckpts"
        folder.mkdir()
        os.utime(shutil.copy(evil, folder / "step7.ckpt"), (1, 1))
        (folder / "last.ckpt").write_bytes(b"PK\x03\x04 cut short")
        read_checkpoint(str(folder / "last.ckpt"))

    def command(*argv, cache_metadata=False):
        def call(evil, made, tmp):
            args = [a.format(evil=evil, dit=made["dit"], out=tmp / "out") for a in argv]
            if cache_metadata:
                args += ["--cache-dir", _evil_cache(made, tmp, evil)]
            _cli(args)
        return call

    return {
        "fit --ckpt_path": lightning("fit"), "validate --ckpt_path": lightning("validate"),
        "test --ckpt_path": lightning("test"), "predict --ckpt_path": lightning("predict"),
        "Trainer.fit(ckpt_path)": fit_api, "model.init_args.init_from": init_from,
        "cache autoencoder.path": cache_run, "data.expect_autoencoder.path": expect_autoencoder,
        "metadata.json autoencoder (sample grids)": metadata_grid, "latents_stats.pt": stats,
        "metrics_lpips file": weights("lpips"), "inception weights": weights("inception"),
        "demo-classifier weights": weights("demo-classifier"), "damaged-checkpoint probe": damaged_probe,
        "sample --ckpt": command("sample", "--ckpt", "{evil}", "--out", "{out}"),
        "sample --autoencoder-path": command("sample", "--ckpt", "{dit}", "--autoencoder-kind", "tcae",
                                             "--autoencoder-path", "{evil}", "--out", "{out}"),
        "sample --cache-dir (metadata.json autoencoder)": command("sample", "--ckpt", "{dit}", "--out", "{out}",
                                                                  cache_metadata=True),
        "export": command("export", "--ckpt", "{evil}", "--out", "{out}"),
        "diagnose": command("diagnose", "--ckpt", "{evil}", "--out", "{out}"),
        "ae-report": command("ae-report", "--ckpt", "{evil}", "--out", "{out}"),
    }


def _record_stats_checksum(cache):
    meta = json.loads(open(os.path.join(cache, "metadata.json")).read())
    meta["stats_sha256"] = hashlib.sha256(open(os.path.join(cache, "latents_stats.pt"), "rb").read()).hexdigest()
    with open(os.path.join(cache, "metadata.json"), "w") as f:
        json.dump(meta, f)


ENTRY_POINTS = _entry_points()


@pytest.mark.parametrize("name", list(ENTRY_POINTS))
def test_no_entry_point_executes_a_pickle(name, made, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(TRUST_ENV, raising=False)
    monkeypatch.chdir(tmp_path)  # the demo configs' relative run folders land here
    sentinel = tmp_path / "SENTINEL"
    evil = evil_checkpoint(tmp_path / "shared.ckpt", sentinel)
    with pytest.raises((UntrustedFileError, CorruptCheckpointError, SystemExit)) as err:
        ENTRY_POINTS[name](evil, made, tmp_path)
    assert not sentinel.exists(), f"{name} ran the pickle"
    said_on_stderr = err.type is SystemExit and isinstance(err.value.code, int)  # LightningCLI's and run()'s way
    message = capsys.readouterr().err.strip() if said_on_stderr else str(err.value)
    if name == "damaged-checkpoint probe":  # the foreign file is not offered as the one to resume from
        assert "no intact checkpoint is left beside it" in message and "step7" not in message
        return
    named = str(tmp_path / "cache" / "latents_stats.pt") if name == "latents_stats.pt" else evil  # a copy there
    assert REFUSED in message and "pathlib.Path" in message and named in message, message
    assert f"{TRUST_ENV}=1" in message
    assert "\n" not in message and "Traceback" not in message
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_legacy_format_is_refused_by_the_load_itself(tmp_path):
    """torch's pre-zip format cannot be scanned statically: the weights_only load refuses it, named."""
    evil = evil_checkpoint(tmp_path / "old.pt", tmp_path / "SENTINEL", legacy=True)
    refused = r"checkpoint .*old\.pt holds pickled objects that loading would have to run code to build \(getattr\)"
    with pytest.raises(UntrustedFileError, match=refused):
        load_torch_file(evil)
    assert not (tmp_path / "SENTINEL").exists()


def test_trusting_a_file_is_an_explicit_opt_in(tmp_path, monkeypatch):
    """With TCAE_LDM_TRUST_PICKLE=1 the same file loads (and runs what it holds), through our loader and through
    Lightning's weights_only loads alike."""
    from lightning.fabric.utilities.cloud_io import _load as lightning_load

    sentinel = tmp_path / "SENTINEL"
    evil = evil_checkpoint(tmp_path / "trusted.ckpt", sentinel)
    monkeypatch.setenv(TRUST_ENV, "1")
    assert read_checkpoint(evil)["global_step"] == 7 and sentinel.exists()
    sentinel.unlink()
    with checked(evil):  # what load_from_checkpoint and --ckpt_path's hyper-parameters go through
        assert lightning_load(evil, map_location="cpu", weights_only=True)["global_step"] == 7
    assert sentinel.exists()
    sentinel.unlink()
    monkeypatch.delenv(TRUST_ENV)
    with pytest.raises(SystemExit, match="holds pickled objects"):
        main(["export", "--ckpt", evil, "--out", str(tmp_path / "out")])
    assert not sentinel.exists()
