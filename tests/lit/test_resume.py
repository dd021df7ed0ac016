"""Runs that always resume and lose nothing: kill -9 in the middle of checkpoint writes, a full disk while writing,
a truncated last.ckpt, finished runs resumed, the metrics history across resumes, a learning rate changed on a
resume, and the divergence bound."""
import csv
import errno
import io
import json
import logging
import os
import subprocess
import sys
import time

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file

from tcae_ldm.cli import main
from tcae_ldm.commands.fid_stats import main as fid_stats_main
from tcae_ldm.lit.guards import NonFiniteLossError
from tcae_ldm.utils.atomic import TMP_SUFFIX
from tcae_ldm.utils.checkpoints import CorruptCheckpointError, read_checkpoint
from tests.tiny import (
    REPO,
    TINY,
    callbacks_arg,
    dit_argv,
    isolated_env,
    tiny_data,
    tiny_latent_cache,
    tiny_module,
    tiny_trainer,
)

RUN = os.path.join("runs", "demo", "dit_tcae")  # where dit_argv's runs write, under their working directory

# A child `tcae-ldm` whose n-th checkpoint write ($HANG_AT_SAVE) writes half the file, signals the parent
# ($HANG_MARKER) and hangs until it is killed: a kill -9 at the worst moment, made reproducible.
CHILD = r"""
import io, os, sys, time
import torch
real_save, hang_at, seen = torch.save, int(os.environ.get("HANG_AT_SAVE", "0")), [0]
def save(obj, f, *args, **kwargs):
    if ".ckpt." in os.path.basename(str(getattr(f, "name", ""))):  # the temporary of a checkpoint write
        seen[0] += 1
        if seen[0] == hang_at:
            buf = io.BytesIO()
            real_save(obj, buf, *args, **kwargs)
            f.write(buf.getvalue()[: buf.tell() // 2])
            f.flush()
            open(os.environ["HANG_MARKER"], "w").close()
            time.sleep(600)
    return real_save(obj, f, *args, **kwargs)
torch.save = save
from tcae_ldm.cli import main
main(sys.argv[1:])
"""


def run_child(argv, cwd, hang_at=0, timeout=300):
    """Run `tcae-ldm argv` in a fresh process; with hang_at, SIGKILL it while it writes its hang_at-th checkpoint."""
    marker, log = os.path.join(cwd, "hanging"), open(os.path.join(cwd, "child.log"), "w")
    proc = subprocess.Popen([sys.executable, "-c", CHILD, *argv], cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                            env=isolated_env(HANG_AT_SAVE=str(hang_at), HANG_MARKER=marker))
    deadline = time.time() + timeout
    try:
        while hang_at and not os.path.exists(marker) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        if hang_at:
            assert os.path.exists(marker), open(log.name).read()[-3000:]
            proc.kill()  # SIGKILL: no handler, no cleanup
            os.remove(marker)
        proc.wait(timeout=max(1, deadline - time.time()))
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    assert hang_at or proc.returncode == 0, open(log.name).read()[-3000:]


def read_rows(path, drop=("gen/wall_time_s",)):
    """metrics.csv rows without the columns that measure wall time."""
    with open(path, newline="") as f:
        return [{k: v for k, v in r.items() if k not in drop} for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    ae, cache = tiny_latent_cache(str(root))
    stats = str(root / "ref.npz")
    fid_stats_main(["--demo", "--image-size", "32", "--features", "random", "--out", stats])
    return {"ae": ae, "cache": cache, "stats": stats}


@pytest.mark.slow
def test_kill_9_during_checkpoint_writes_resumes_exactly_with_the_whole_history(tiny_cache, tmp_path):
    gen = {"reference_stats": tiny_cache["stats"], "features": "random", "every_n_steps": 3, "num_samples": 8,
           "batch_size": 8, "sample_steps": 2}
    argv = dit_argv(tiny_cache["cache"], tiny_cache["ae"], 8, callbacks_arg(1, gen))
    os.makedirs(tmp_path / "straight")
    run_child(argv, str(tmp_path / "straight"))

    chain = tmp_path / "chain"
    ckpts = chain / RUN / "checkpoints"
    os.makedirs(chain)
    # (the checkpoint write that is killed, counted from the start of that run) -> step of the last complete one
    for i, (hang_at, kept_step) in enumerate([(3, 2), (2, 3), (4, 6)]):
        run_child(argv + (["--ckpt_path=last"] if i else []), str(chain), hang_at=hang_at)
        assert read_checkpoint(str(ckpts / "last.ckpt"))["global_step"] == kept_step
        assert len([f for f in os.listdir(ckpts) if f.endswith(TMP_SUFFIX)]) == 1  # the half-written temporary
    run_child(argv + ["--ckpt_path=last"], str(chain))
    assert [f for f in os.listdir(ckpts) if f.endswith(TMP_SUFFIX)] == []  # removed by the next run

    a = read_checkpoint(str(tmp_path / "straight" / RUN / "checkpoints" / "last.ckpt"))
    b = read_checkpoint(str(ckpts / "last.ckpt"))
    assert a["global_step"] == b["global_step"] == 8
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    straight, resumed = read_rows(tmp_path / "straight" / RUN / "metrics.csv"), read_rows(chain / RUN / "metrics.csv")
    assert [r["step"] for r in straight if r["train/loss"]] == [str(s) for s in range(8)]
    assert len([r for r in straight if r["gen/gfid_random"]]) == 3  # steps 3, 6 and the end, 8
    assert resumed == straight  # every row once, equal values: nothing lost, nothing doubled


def _ae_argv(out):
    """configs/demo/tcae.yaml (iBOT views, the critic from step 2) shrunk: 16 crops / 8 = 2 batches per epoch, 5
    steps, last.ckpt after every step, validation after every epoch, the run's folder `out`."""
    callbacks = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"dirpath": f"{out}/ckpt", "every_n_train_steps": 1, "save_top_k": 0, "save_last": True,
                                "monitor": None}}]
    return ["fit", "--config", os.path.join(REPO, "configs", "demo", "tcae.yaml"), *TINY,
            "--model.init_args.max_steps=5", "--model.init_args.loss.disc_start=2",
            "--model.init_args.ssl.teacher_temp_warmup_steps=4", f"--trainer.logger.init_args.save_dir={out}",
            f"--trainer.callbacks={json.dumps(callbacks)}"]


@pytest.mark.slow
def test_kill_9_of_an_autoencoder_fit_mid_checkpoint_write_resumes_exactly(tmp_path):
    """SIGKILL while the joint TC-AE + iBOT run writes its 3rd checkpoint (after step 3, mid-epoch): last.ckpt is
    still step 2's, whole; `--ckpt_path last` then ends bit for bit where an uninterrupted run ends."""
    for name in ("straight", "chain"):
        os.makedirs(tmp_path / name)
    run_child(_ae_argv(tmp_path / "straight"), str(tmp_path / "straight"))
    chain = tmp_path / "chain"
    run_child(_ae_argv(chain), str(chain), hang_at=3)
    killed = read_checkpoint(str(chain / "ckpt" / "last.ckpt"))
    assert killed["step_count"] == 2
    assert len([f for f in os.listdir(chain / "ckpt") if f.endswith(TMP_SUFFIX)]) == 1
    run_child(_ae_argv(chain) + ["--ckpt_path=last"], str(chain))
    a, b = (read_checkpoint(str(tmp_path / n / "ckpt" / "last.ckpt")) for n in ("straight", "chain"))
    assert a["step_count"] == b["step_count"] == 5
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    for oa, ob in zip(a["optimizer_states"], b["optimizer_states"]):
        for sa, sb in zip(oa["state"].values(), ob["state"].values()):
            assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    assert [f for f in os.listdir(chain / "ckpt") if f.endswith(TMP_SUFFIX)] == []


# A child `tcae-ldm` whose n-th cache shard write ($HANG_AT_SHARD) writes half the shard's temporary, signals the
# parent ($HANG_MARKER) and hangs until it is killed.
CACHE_CHILD = r"""
import os, sys, time
import tcae_ldm.latents.shards as shards
from tcae_ldm.utils.atomic import atomic_write
real, hang_at, seen = shards.write_bytes_atomic, int(os.environ["HANG_AT_SHARD"]), [0]
def write(path, data, group_readable=False):
    seen[0] += 1
    if seen[0] == hang_at:
        with atomic_write(path, "wb", group_readable) as f:
            f.write(data[: len(data) // 2])
            f.flush()
            open(os.environ["HANG_MARKER"], "w").close()
            time.sleep(600)
    return real(path, data, group_readable)
shards.write_bytes_atomic = write
from tcae_ldm.cli import main
main(sys.argv[1:])
"""


@pytest.mark.slow
def test_kill_9_of_a_cache_run_mid_shard_write_is_refused_until_overwritten(tiny_cache, tmp_path):
    """SIGKILL while the 2nd shard of a latent cache is written: the folder holds one whole shard and the half
    temporary, no metadata. The DiT refuses it as unfinished, a rerun refuses to mix into it, and a rerun with
    overwrite: true replaces it with the cache an uninterrupted run makes."""
    from tcae_ldm.latents.cache import read_metadata
    from tcae_ldm.latents.stream import LatentDataModule

    out = tmp_path / "latents"
    argv = ["predict", "--config", os.path.join(REPO, "configs", "demo", "cache_latents_tcae.yaml"),
            f"--model.init_args.autoencoder.path={tiny_cache['ae']}",
            "--data.init_args.images.init_args.image_size=32", "--data.init_args.images.init_args.train_per_class=2",
            "--data.init_args.images.init_args.val_per_class=1", "--data.init_args.batch_size=4",
            f"--trainer.default_root_dir={tmp_path / 'run'}", f"--trainer.callbacks.init_args.output_dir={out}",
            "--trainer.callbacks.init_args.shard_size=8"]
    marker = tmp_path / "hanging"
    env = isolated_env(HANG_AT_SHARD="2", HANG_MARKER=str(marker))
    with open(tmp_path / "child.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-c", CACHE_CHILD, *argv, "--trainer.callbacks.init_args.overwrite="
                                 "false"], cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + 300
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        proc.kill()  # SIGKILL
        proc.wait()
    assert marker.exists(), (tmp_path / "child.log").read_text()[-3000:]
    files = sorted(os.listdir(out))
    assert [f for f in files if f.endswith(".safetensors")] == ["shard-r0-00000.safetensors"]
    assert len([f for f in files if f.endswith(TMP_SUFFIX)]) == 1 and "metadata.json" not in files
    with pytest.raises(FileNotFoundError, match="unfinished caching run"):
        LatentDataModule(str(out)).setup("fit")

    refused = subprocess.run([sys.executable, "-m", "tcae_ldm.cli", *argv, "--trainer.callbacks.init_args.overwrite="
                              "false"], cwd=tmp_path, capture_output=True, text=True, env=isolated_env())
    assert refused.returncode == 1 and "unfinished caching run; choose another output_dir or set overwrite: true" \
        in refused.stderr, refused.stderr[-2000:]
    assert sorted(os.listdir(out)) == files  # nothing touched

    run_child(argv, str(tmp_path))  # the config's overwrite: true
    assert read_metadata(str(out))["count"] == 16
    dm = LatentDataModule(str(out))
    dm.setup("fit")  # every shard whole, the stats written: the stream starts
    made = {k: torch.cat([load_file(os.path.join(out, f))[k] for f in sorted(os.listdir(out))
                          if f.endswith(".safetensors")]) for k in ("latents", "indices")}
    ref = {k: torch.cat([load_file(os.path.join(tiny_cache["cache"], f))[k]
                         for f in sorted(os.listdir(tiny_cache["cache"])) if f.endswith(".safetensors")])
           for k in ("latents", "indices")}
    assert torch.allclose(made["latents"][made["indices"].argsort()], ref["latents"][ref["indices"].argsort()],
                          atol=1e-5)


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_finished_runs_resumed_change_nothing(tiny_cache, tmp_path, monkeypatch):
    L.seed_everything(0)
    done = tiny_module()  # max_steps=4
    tiny_trainer(str(tmp_path / "ae")).fit(done, tiny_data())
    before, last = _state(done), tmp_path / "ae" / "ckpt" / "last.ckpt"
    for _ in range(3):
        again = tiny_module()
        trainer = tiny_trainer(str(tmp_path / "ae"))
        trainer.fit(again, tiny_data(), ckpt_path="last")
        assert again.step_count == 4 and trainer.global_step == read_checkpoint(str(last))["global_step"]
        assert all(torch.equal(v, again.state_dict()[k]) for k, v in before.items())
        assert read_checkpoint(str(last))["step_count"] == 4

    monkeypatch.chdir(tmp_path)
    argv = dit_argv(tiny_cache["cache"], tiny_cache["ae"], 3, callbacks_arg(1))
    main(argv)
    first = read_checkpoint(os.path.join(RUN, "checkpoints", "last.ckpt"))
    history = read_rows(os.path.join(RUN, "metrics.csv"))
    for _ in range(3):
        main(argv + ["--ckpt_path=last"])
        again = read_checkpoint(os.path.join(RUN, "checkpoints", "last.ckpt"))
        assert again["global_step"] == 3
        assert all(torch.equal(v, again["state_dict"][k]) for k, v in first["state_dict"].items())
        assert read_rows(os.path.join(RUN, "metrics.csv")) == history


def test_a_full_disk_while_writing_a_checkpoint_keeps_the_last_one_and_no_temporary(tmp_path, monkeypatch):
    elsewhere = tmp_path / "tmpdir"  # $TMPDIR on another filesystem: no temporary may land there
    elsewhere.mkdir()
    monkeypatch.setenv("TMPDIR", str(elsewhere))
    real_save, writes = torch.save, []

    def full_disk(obj, f, *args, **kwargs):
        if ".ckpt." in os.path.basename(str(getattr(f, "name", ""))):
            writes.append(f.name)
            if len(writes) == 5:  # the 3rd step's two files (epoch + last) then: half a file and ENOSPC
                buf = io.BytesIO()
                real_save(obj, buf)
                f.write(buf.getvalue()[: buf.tell() // 2])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left on device"):
        tiny_trainer(str(tmp_path)).fit(tiny_module(max_steps=6), tiny_data())
    assert read_checkpoint(str(tmp_path / "ckpt" / "last.ckpt"))["step_count"] == 2
    assert not [f for f in os.listdir(tmp_path / "ckpt") if f.endswith(TMP_SUFFIX)] and os.listdir(elsewhere) == []


def test_a_truncated_last_checkpoint_names_itself_and_the_one_to_resume_from(tmp_path):
    L.seed_everything(0)
    tiny_trainer(str(tmp_path), max_epochs=2).fit(tiny_module(), tiny_data())  # step-2 checkpoint + last.ckpt
    last = tmp_path / "ckpt" / "last.ckpt"
    (previous,) = [p for p in (tmp_path / "ckpt").iterdir() if p.name != "last.ckpt"]
    last.write_bytes(last.read_bytes()[:1000])
    with pytest.raises(CorruptCheckpointError) as err:
        tiny_trainer(str(tmp_path)).fit(tiny_module(), tiny_data(), ckpt_path="last")
    assert str(err.value).startswith(f"checkpoint {last} cannot be read: it is truncated")
    assert f"resume with --ckpt_path {previous}" in str(err.value)
    os.remove(previous)
    with pytest.raises(CorruptCheckpointError, match="no intact checkpoint is left beside it, so the run must start "
                                                     "again without --ckpt_path$"):
        tiny_trainer(str(tmp_path)).fit(tiny_module(), tiny_data(), ckpt_path="last")


def test_a_fresh_run_moves_an_existing_history_aside(tiny_cache, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    main(dit_argv(tiny_cache["cache"], tiny_cache["ae"], 2, callbacks_arg(1)))
    first = read_rows(os.path.join(RUN, "metrics.csv"))
    with caplog.at_level(logging.WARNING, logger="tcae_ldm"):
        main(dit_argv(tiny_cache["cache"], tiny_cache["ae"], 3, callbacks_arg(1), "--overwrite_run=true"))
    (moved,) = [f for f in os.listdir(RUN) if f.startswith("metrics-")]
    assert read_rows(os.path.join(RUN, moved)) == first
    assert [r["step"] for r in read_rows(os.path.join(RUN, "metrics.csv"))] == ["0", "1", "2"]
    assert f"was moved to {os.path.join(RUN, moved)}" in caplog.text


def test_a_learning_rate_changed_on_resume_is_applied_and_said(tmp_path, caplog):
    L.seed_everything(0)
    opt = lambda lr: lambda p: torch.optim.AdamW(p, lr=lr)  # noqa: E731
    tiny_trainer(str(tmp_path), max_epochs=2).fit(tiny_module(optimizer=opt(1e-3)), tiny_data())
    resumed, trainer = tiny_module(optimizer=opt(2e-4)), tiny_trainer(str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="tcae_ldm"):
        trainer.fit(resumed, tiny_data(), ckpt_path="last")
    assert "optimizer 0: learning rate 0.0002 from this run's config replaces the checkpoint's 0.001" in caplog.text
    assert all(g["base_lr"] == 2e-4 for g in trainer.optimizers[0].param_groups)
    assert trainer.optimizers[1].param_groups[0]["base_lr"] == 1e-3  # the critic's LR was not changed


@pytest.mark.parametrize("bad_from", [3, 0])
def test_a_divergence_stops_like_a_nan_and_names_a_checkpoint_saved_before_it(tmp_path, monkeypatch, bad_from):
    module = tiny_module(max_steps=10)
    real = module.loss.generator_loss

    def diverged(x, x_rec, step, last_layer=None):
        loss, logs = real(x, x_rec, step, last_layer)
        return (loss * 1e29 if step >= bad_from else loss), logs  # finite, so isfinite alone lets it through

    monkeypatch.setattr(module.loss, "generator_loss", diverged)
    keep_all = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_top_k=-1, save_last=True,
                               enable_version_counter=False, save_on_train_epoch_end=True)
    with pytest.raises(NonFiniteLossError, match=f"loss above the divergence bound max_loss=10000 at step {bad_from} "
                                                 r"\(\d\.\d+e\+2\d; terms") as err:
        tiny_trainer(str(tmp_path), callbacks=[keep_all]).fit(module, tiny_data())
    if bad_from:
        # last.ckpt and the step-6 file hold the weights whose loss diverged (2 optimizer steps per update)
        assert read_checkpoint(str(tmp_path / "ckpt" / "last.ckpt"))["step_count"] == bad_from
        good = tmp_path / "ckpt" / "epoch=1-step=4.ckpt"
        assert str(err.value).endswith(f"the newest checkpoint saved before the divergence with finite weights is "
                                       f"{good} (global step 4): resume with --ckpt_path {good}")
        assert read_checkpoint(str(good))["step_count"] == bad_from - 1
    else:
        assert str(err.value).endswith("no checkpoint of this run was saved before the divergence with finite weights")
        assert not list(tmp_path.glob("ckpt/*.ckpt"))