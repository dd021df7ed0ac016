"""Preemption: SIGTERM and SIGUSR1 sent to a child `tcae-ldm fit` at a random step leave a checkpoint of that step and a
non-zero exit status, and `--ckpt_path last` then finishes bit-exactly like an uninterrupted run; the multi-node path
as 2 nodes x 1 process over gloo on this machine."""
import os
import random
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from tcae_ldm.utils.checkpoints import read_checkpoint
from tests.lit.test_resume import RUN, read_rows, run_child, tiny_cache  # noqa: F401  (tiny_cache: a fixture)
from tests.tiny import REPO, TINY, callbacks_arg, dit_argv, isolated_env

STEPS = 8
# A child `tcae-ldm` that, after the training batch that reaches global step $SIGNAL_AT, writes $SIGNAL_MARKER and waits
# (up to a minute) for the parent's signal: the signal then lands at a known step, whatever the machine's speed.
CHILD = r"""
import os, sys, time
from tcae_ldm.lit.preemption import Preemption
at, marker = int(os.environ["SIGNAL_AT"]), os.environ["SIGNAL_MARKER"]
def on_train_batch_end(self, trainer, *args):
    if trainer.global_step == at:
        open(marker, "w").close()
        deadline = time.time() + 60
        while self.signum is None and time.time() < deadline:
            time.sleep(0.05)
Preemption.on_train_batch_end = on_train_batch_end
from tcae_ldm.cli import run
run(sys.argv[1:])
"""


def interrupt_child(argv, cwd, at: int, signum: int, timeout=300) -> tuple[int, str]:
    """Run `tcae-ldm argv` in a fresh process, send it `signum` after global step `at`; (exit status, its output)."""
    marker, log_path = os.path.join(cwd, "at_step"), os.path.join(cwd, "child.log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-c", CHILD, *argv], cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                env=isolated_env(SIGNAL_AT=str(at), SIGNAL_MARKER=marker))
        deadline = time.time() + timeout
        try:
            while not os.path.exists(marker) and proc.poll() is None and time.time() < deadline:
                time.sleep(0.05)
            assert os.path.exists(marker), open(log_path).read()[-3000:]
            proc.send_signal(signum)
            proc.wait(timeout=max(1, deadline - time.time()))
        finally:
            if proc.poll() is None:
                proc.kill()
    return proc.returncode, open(log_path).read()


@pytest.fixture(scope="module")
def straight(tiny_cache, tmp_path_factory):  # noqa: F811
    """An uninterrupted run of STEPS steps."""
    cwd = tmp_path_factory.mktemp("straight")
    run_child(dit_argv(tiny_cache["cache"], tiny_cache["ae"], STEPS, callbacks_arg(100)), str(cwd))
    return cwd


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_a_signal_saves_the_step_exits_non_zero_and_resumes_exactly(tiny_cache, straight, tmp_path,  # noqa: F811
                                                                     signum):
    at = random.randint(2, STEPS - 2)
    argv = dit_argv(tiny_cache["cache"], tiny_cache["ae"], STEPS, callbacks_arg(100))  # no periodic checkpoint
    status, out = interrupt_child(argv, str(tmp_path), at, signum)
    assert status == 128 + signum, out[-3000:]
    last = tmp_path / RUN / "checkpoints" / "last.ckpt"
    assert read_checkpoint(str(last))["global_step"] == at, f"signal after step {at}"
    assert (f"{signal.Signals(signum).name} received: stopped at global step {at} and saved "
            f"{last}; exit status {128 + signum}") in out
    run_child(argv + ["--ckpt_path=last"], str(tmp_path))

    a, b = read_checkpoint(str(straight / RUN / "checkpoints" / "last.ckpt")), read_checkpoint(str(last))
    assert a["global_step"] == b["global_step"] == STEPS
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    assert read_rows(tmp_path / RUN / "metrics.csv") == read_rows(straight / RUN / "metrics.csv")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_of_one_process_over_gloo(tmp_path):
    """torchrun --nnodes 2 --nproc-per-node 1, twice on localhost (node ranks 0 and 1): a tiny autoencoder fit whose
    run folder only rank 0 locks and writes."""
    port, out = _free_port(), str(tmp_path)
    fit = ["-m", "tcae_ldm.cli", "fit", "--config", "configs/demo/tcae.yaml", *TINY, "--trainer.num_nodes=2",
           "--trainer.devices=1", "--trainer.strategy=ddp_find_unused_parameters_true", "--model.init_args.max_steps=2",
           "--model.init_args.loss.disc_start=0", f"--trainer.logger.init_args.save_dir={out}"]
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
               f"--node-rank={node}", "--master-addr=127.0.0.1", f"--master-port={port}", *fit]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=isolated_env(), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    ckpt = read_checkpoint(os.path.join(out, "tcae", "checkpoints", "last.ckpt"))
    assert ckpt["step_count"] == 2
    assert "fit done at step 2" in outputs[0] and "fit done at step 2" not in outputs[1]  # rank 0 reports
    assert open(os.path.join(out, "tcae", "run.lock")).read() == ""  # taken by rank 0 only, released at the end
