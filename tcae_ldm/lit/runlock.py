"""One run per folder: a run holds a lock on its folder for its lifetime, and a fresh run does not start in a folder
that holds another run's checkpoints.

The lock is `run.lock` in the run's folder (the logger's log_dir), held with fcntl.flock for as long as the process
runs: the kernel releases it on any exit, kill -9 included, so a lock file whose flock is free was left by a run that
crashed; it is reported in one line and taken over. (Where the filesystem has no flock, the recorded pid decides: a
dead pid on this host is a stale lock.) The file records pid, host and start time so that a second run
names the holder. Under DDP only global rank 0 takes it (every rank of a run writes through rank 0's folder).
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time

from tcae_ldm.utils.atomic import process_alive

log = logging.getLogger(__name__)

LOCK_FILE = "run.lock"
OVERWRITE_ENV = "TCAE_LDM_OVERWRITE_RUN"  # =1: a fresh run may start over in a folder that holds checkpoints


class RunFolderError(RuntimeError):
    """A run folder that is in use by another process, or holds another run's checkpoints."""


def _describe(holder: dict) -> str:
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {when}"


def _read_holder(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 4096)
    try:
        holder = json.loads(raw.decode() or "{}")
    except (UnicodeDecodeError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _alive_elsewhere(holder: dict) -> bool:
    """Whether the recorded holder is another live process of this host (a holder on another host counts as live)."""
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid == os.getpid():
        return False
    if holder.get("host") != socket.gethostname():
        return True
    return process_alive(pid)


class RunLock:
    """An exclusive lock on a run folder (acquire / release, or a context manager)."""

    def __init__(self, folder: str):
        self.folder = os.path.normpath(os.fspath(folder))
        self.path = os.path.join(self.folder, LOCK_FILE)
        self._fd: int | None = None
        self._created: str | None = None  # the topmost folder this lock created, removed again if left empty

    def acquire(self) -> RunLock:
        existing = os.path.abspath(self.folder)
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        try:
            os.makedirs(self.folder, exist_ok=True)
        except OSError as e:
            why = f"{existing} is a file, not a folder" if not os.path.isdir(existing) else f"{existing}: {e.strerror}"
            raise RunFolderError(f"the run's folder {self.folder} cannot be written: {why}") from None
        if existing != os.path.abspath(self.folder):
            created = os.path.abspath(self.folder)
            while os.path.dirname(created) != existing:
                created = os.path.dirname(created)
            self._created = created
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held = False
        except BlockingIOError:
            held = True
        except OSError:  # a filesystem without flock (some NFS mounts): the recorded pid decides, on its host
            held = _alive_elsewhere(_read_holder(fd))
        if held:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunFolderError(f"run folder {self.folder} is in use by another run ({_describe(holder)}; lock "
                                 f"{self.path}): wait for it to end, or give this run another "
                                 f"--trainer.logger.init_args.name") from None
        left = _read_holder(fd)
        if left:
            log.warning("run folder %s: taking over the lock left by a run that ended without releasing it (%s)",
                        self.folder, _describe(left))
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}).encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        """Empty the file (a released lock leaves nothing to report) and drop the flock."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # drops the flock
        if self._created and os.listdir(self.folder) == [LOCK_FILE]:
            # a run that stopped before writing anything (a preflight error) leaves no folder behind
            os.remove(self.path)
            folder = os.path.abspath(self.folder)
            while True:
                try:
                    os.rmdir(folder)
                except OSError:
                    break
                if folder == self._created:
                    break
                folder = os.path.dirname(folder)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def checkpoint_folders(trainer, run_folder: str) -> list[str]:
    """The folders the trainer's ModelCheckpoint callbacks will write (dirpath, else <run folder>/checkpoints)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    return sorted({os.fspath(cb.dirpath) if cb.dirpath else os.path.join(run_folder, "checkpoints")
                   for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint)})


def check_fresh_run(trainer, run_folder: str, overwrite: bool) -> None:
    """RunFolderError when a run without --ckpt_path would write into checkpoint folders that hold checkpoints."""
    if overwrite or os.environ.get(OVERWRITE_ENV, "") not in ("", "0"):
        return
    for folder in checkpoint_folders(trainer, run_folder):
        found = sorted(f for f in os.listdir(folder) if f.endswith(".ckpt")) if os.path.isdir(folder) else []
        if found:
            raise RunFolderError(f"{folder} already holds another run's checkpoints ({', '.join(found[:3])}"
                                 f"{', ...' if len(found) > 3 else ''}): resume it with --ckpt_path last, or start "
                                 f"over with --overwrite_run true ({OVERWRITE_ENV}=1) or another "
                                 f"--trainer.logger.init_args.name")


def _is_rank_zero() -> bool:
    """Whether this process is global rank 0, from the launcher's environment (torchrun: RANK; srun: SLURM_PROCID;
    Lightning's own launcher: LOCAL_RANK / NODE_RANK), before the trainer has set its ranks."""
    return all(os.environ.get(key, "0") in ("", "0") for key in
               ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK"))


def claim_run_folder(trainer, subcommand: str, ckpt_path, overwrite: bool) -> RunLock | None:
    """Before a `fit` / `validate` / `test` runs: refuse a fresh fit in a folder holding checkpoints, and take the run
    folder's lock (rank 0). The caller releases the returned lock when the command ends."""
    from tcae_ldm.lit.outputs import log_dir

    if subcommand not in ("fit", "validate", "test"):
        return None
    folder = log_dir(trainer)
    if subcommand == "fit" and ckpt_path is None:
        check_fresh_run(trainer, folder, overwrite)
    return RunLock(folder).acquire() if _is_rank_zero() else None
