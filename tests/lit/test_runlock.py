"""One run per folder (the lock, a stale lock, a fresh fit over checkpoints), and what `--ckpt_path FILE` may change:
the command line wins over the stored hyper-parameters, a checkpoint of the other module kind is refused."""
import json
import logging
import os
import subprocess
import sys

import pytest
import yaml

from tcae_ldm.cli import run
from tcae_ldm.lit.runlock import LOCK_FILE, RunFolderError, RunLock
from tests.tiny import REPO, TINY, dit_argv, isolated_env, tiny_dit_checkpoint, tiny_latent_cache

DEMO_TCAE = os.path.join(REPO, "configs", "demo", "tcae.yaml")
EVAL = os.path.join(REPO, "configs", "eval.yaml")
AE_RUN = os.path.join("runs", "demo", "tcae")
AE_FIT = ["fit", "--config", DEMO_TCAE, *TINY, "--model.init_args.max_steps=1"]


def _error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        run(argv)
    assert exit_.value.code == 1
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "error:" in ln]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture(scope="module")
def ae_run(tmp_path_factory):
    """A folder holding a one-step tiny autoencoder run (runs/demo/tcae)."""
    root = tmp_path_factory.mktemp("ae_run")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        run(AE_FIT)
    finally:
        os.chdir(cwd)
    return root


# ------------------------------------------------------------------------------------------------ the lock
def test_a_second_run_on_a_locked_folder_stops_naming_the_holder(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom tcae_ldm.lit.runlock import RunLock\n"
                               f"RunLock({str(tmp_path)!r}).acquire()\nprint('held', flush=True)\ntime.sleep(60)"],
                              env=isolated_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunFolderError, match=rf"run folder {tmp_path} is in use by another run \(pid "
                                                 rf"{holder.pid} on [^,]+, started [0-9-]+ [0-9:]+; lock "):
            RunLock(str(tmp_path)).acquire()
    finally:
        holder.kill()
        holder.wait()
    # the kernel released the killed holder's lock: its file is a stale lock, reported and taken over
    with RunLock(str(tmp_path)):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert (tmp_path / LOCK_FILE).read_text() == ""  # released: nothing left to report


def test_a_stale_lock_is_reported_and_taken_over(tmp_path, caplog):
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": 999999, "host": "crashed-host", "started": 0}))
    with caplog.at_level(logging.WARNING, logger="tcae_ldm"), RunLock(str(tmp_path)):
        pass
    assert f"run folder {tmp_path}: taking over the lock left by a run that ended without releasing it (pid 999999 " \
           f"on crashed-host" in caplog.text


def test_fit_on_a_folder_in_use_stops_in_one_line(ae_run, monkeypatch, capsys):
    monkeypatch.chdir(ae_run)
    with RunLock(AE_RUN):  # another run holds the folder
        line = _error([*AE_FIT, "--ckpt_path=last"], capsys)
    assert f"run folder {AE_RUN} is in use by another run (pid {os.getpid()}" in line


# ------------------------------------------------------------------------------------------------ fresh runs
def test_a_fresh_fit_over_another_runs_checkpoints_is_refused(ae_run, monkeypatch, capsys):
    monkeypatch.chdir(ae_run)
    config = os.path.join(AE_RUN, "config.yaml")
    os.remove(config)
    folder = os.path.join(AE_RUN, "checkpoints")
    line = _error(AE_FIT, capsys)
    assert line == (f"tcae-ldm fit: error: {folder} already holds another run's checkpoints (best.ckpt, last.ckpt): "
                    f"resume it with --ckpt_path last, or start over with --overwrite_run true "
                    f"(TCAE_LDM_OVERWRITE_RUN=1) or another --trainer.logger.init_args.name")
    assert not os.path.exists(config)  # refused before anything was written
    monkeypatch.setenv("TCAE_LDM_OVERWRITE_RUN", "1")
    run([*AE_FIT, "--trainer.logger.init_args.name=tcae_again", "--trainer.max_steps=0"])  # another name: allowed
    assert os.path.isfile(os.path.join("runs", "demo", "tcae_again", "config.yaml"))


# ------------------------------------------------------------------------------------------------ --ckpt_path FILE
def test_the_command_line_wins_over_an_explicit_checkpoints_hyperparameters(ae_run, monkeypatch, capsys, caplog):
    """The evaluation recipe repoints the FID network's weight file; the checkpoint stored metrics_fid=random."""
    monkeypatch.chdir(ae_run)
    other = str(ae_run / "other-classifier.pt")
    argv = ["test", "--config", DEMO_TCAE, *TINY, "--config", EVAL, "--ckpt_path",
            os.path.join(AE_RUN, "checkpoints", "last.ckpt"), "--model.init_args.metrics_fid=demo-classifier",
            f"--model.init_args.metrics_fid_weights={other}"]
    with pytest.raises(SystemExit):
        run([*argv, "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]
    assert (printed["metrics_fid"], printed["metrics_fid_weights"]) == ("demo-classifier", other)
    with caplog.at_level(logging.WARNING, logger="tcae_ldm"):
        line = _error(argv, capsys)
    assert other in line  # the run builds the network the command line names (its weight file does not exist)
    assert ("model.metrics_fid, model.metrics_fid_weights replace the checkpoint's (as with --ckpt_path last)"
            in caplog.text)


def test_a_checkpoint_of_the_other_module_kind_is_refused_before_anything_is_written(ae_run, tmp_path, monkeypatch,
                                                                                     capsys):
    monkeypatch.chdir(tmp_path)
    ae_ckpt, cache = tiny_latent_cache(str(tmp_path))
    autoencoder = str(ae_run / AE_RUN / "checkpoints" / "last.ckpt")
    line = _error([*dit_argv(cache, ae_ckpt, 2), f"--ckpt_path={autoencoder}"], capsys)
    assert line == (f"tcae-ldm fit: error: --ckpt_path {autoencoder} is an autoencoder checkpoint but the config's "
                    f"model is DiffusionModule: give `tcae-ldm fit` an autoencoder config (configs/tcae.yaml, "
                    f"configs/dcae.yaml, ...) with it, or a DiT checkpoint")
    assert not os.path.exists("runs")  # no config.yaml, no folder
    dit = tiny_dit_checkpoint(str(tmp_path / "dit.ckpt"))
    line = _error([*AE_FIT, f"--ckpt_path={dit}"], capsys)
    assert f"--ckpt_path {dit} is a DiT checkpoint but the config's model is AutoencoderModule" in line
    assert not os.path.exists("runs")


def test_without_flock_the_recorded_pid_decides(tmp_path, monkeypatch):
    import fcntl
    import socket

    def no_flock(fd, op):
        raise OSError(37, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": alive.pid, "host": socket.gethostname(), "started": 0}))
        with pytest.raises(RunFolderError, match=f"in use by another run \\(pid {alive.pid} "):
            RunLock(str(tmp_path)).acquire()
    finally:
        alive.kill()
        alive.wait()
    with RunLock(str(tmp_path)):  # its pid is dead now: a stale lock, taken over
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
