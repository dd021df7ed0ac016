"""Preemption: SIGTERM (what Kubernetes and most schedulers send) and SIGUSR1 (SLURM's advance warning,
`#SBATCH --signal=USR1@90`) save a complete checkpoint at the next step boundary and end the run with a non-zero
exit status, so that the scheduler requeues it and `--ckpt_path last` continues exactly where it stopped.

Lightning 2.x already turns SIGTERM into `trainer.received_sigterm`, checked after each training batch (after that
step's own checkpoints), and then raises SIGTERMException, a SystemExit with status 0 and no checkpoint. This callback
gives SIGUSR1 the same meaning outside SLURM and, when the exception comes, writes last.ckpt of every
ModelCheckpoint through the run's checkpoint IO (atomic: tcae_ldm.lit.checkpointing) and sets the exit status to
128 + the signal's number (143 for SIGTERM, 138 for SIGUSR1), the shell's convention for a process ended by a
signal. Under SLURM with auto-requeue (Lightning's SLURMEnvironment, on by default when SLURM starts the job),
Lightning's own handler takes SIGUSR1 (an hpc_ckpt_N.ckpt in the trainer's default_root_dir, then `scontrol
requeue`), and the SIGTERM that the requeue sends ends the run here as above.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)

class Preemption(L.Callback):
    """Checkpoint at the step boundary after SIGTERM / SIGUSR1, then exit with 128 + the signal's number."""

    def __init__(self):
        self.signum: int | None = None  # the signal that stopped the run

    def on_train_start(self, trainer, pl_module) -> None:
        # After Lightning registered its handlers (Trainer._run), which its teardown restores to what they were:
        # SIGTERM stays Lightning's and is only recorded here.
        self._chain(signal.SIGTERM)
        if signal.getsignal(signal.SIGUSR1) in (None, signal.SIG_DFL, signal.SIG_IGN):  # no SLURM requeue handler

            def stop(signum, frame):
                self._record(signum)
                trainer._signal_connector.received_sigterm = True  # the loops' own stop, at the next step boundary

            self._install(signal.SIGUSR1, stop)
        else:
            self._chain(signal.SIGUSR1)

    def _chain(self, signum: int) -> None:
        """Record `signum` when it comes, then run the handler it had."""
        previous = signal.getsignal(signum)

        def handler(num, frame):
            self._record(num)
            if callable(previous):
                previous(num, frame)

        self._install(signum, handler)

    @staticmethod
    def _install(signum, handler) -> None:
        if threading.current_thread() is threading.main_thread():  # Python only sets handlers there
            signal.signal(signum, handler)

    def _record(self, signum: int) -> None:
        self.signum = int(signum)  # the latest: under SLURM, the SIGTERM of the requeue that follows USR1 stops the run

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != "fit":
            return  # validate / test / predict have no training state to save (and must not replace last.ckpt)
        signum = self.signum or signal.SIGTERM  # another rank's signal reaches this one as Lightning's broadcast
        name = signal.Signals(signum).name
        callbacks = [cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint) and cb.dirpath]
        paths = [os.path.join(cb.dirpath, cb.CHECKPOINT_NAME_LAST + cb.FILE_EXTENSION) for cb in callbacks]
        for cb, path in zip(callbacks, paths):
            cb.last_model_path = path  # the callback owns the file: a resumed run replaces it instead of adding -v1
        for path in dict.fromkeys(paths):
            trainer.save_checkpoint(path)  # every rank calls it (it synchronises); rank 0 writes, atomically
        if trainer.is_global_zero:
            saved = ", ".join(dict.fromkeys(paths)) or "no checkpoint (the run has no ModelCheckpoint)"
            print(f"tcae-ldm: {name} received: stopped at global step {trainer.global_step} and saved {saved}; "
                  f"exit status {128 + signum}, resume with --ckpt_path last", file=sys.stderr, flush=True)
        exception.code = 128 + signum  # a SystemExit: the process ends with this status, so schedulers requeue
