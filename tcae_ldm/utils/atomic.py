"""Atomic file writes: a file is either its old complete self or its new complete self, never half of each.

The bytes go to a temporary file in the target's own folder (so the final rename never crosses a filesystem,
whatever $TMPDIR is), are fsynced, then renamed over the target, and the folder is fsynced so that the rename
survives a power cut. Any failure (a full disk, an exception while serialising) removes the temporary; a
process killed with SIGKILL leaves it behind, named so that remove_stale_temporaries() can recognise it.
"""
from __future__ import annotations

import contextlib
import os
import re
import socket
import tempfile

TMP_SUFFIX = ".partial"
# .<target name>.<host>.<pid>.<random>.partial
_TMP_RE = re.compile(r"^\.(?P<target>.+)\.(?P<host>[^.]+)\.(?P<pid>\d+)\.[^.]+" + re.escape(TMP_SUFFIX) + "$")


def _host() -> str:
    return socket.gethostname().split(".")[0] or "host"


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: str) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a folder be opened or synced
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb", group_readable: bool = False):
    """Open a temporary file beside `path`; when the block ends without error, make it `path` atomically.

    The file gets the permissions a new file gets under the umask (mkstemp would give 0600), plus group read
    when `group_readable` (shared caches)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.{_host()}.{os.getpid()}.", suffix=TMP_SUFFIX,
                               dir=folder)
    os.close(fd)
    try:
        with open(tmp, mode) as f:  # by name, so that f.name is the temporary's path
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, (0o666 & ~current_umask()) | (0o040 if group_readable else 0))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    _fsync_dir(folder)


def write_bytes_atomic(path: str, data: bytes, group_readable: bool = False) -> None:
    with atomic_write(path, "wb", group_readable) as f:
        f.write(data)


def remove_stale_temporaries(folder: str) -> list[str]:
    """Remove the temporaries that atomic_write left in `folder` from processes of this host that no longer
    run (killed mid-write); returns their paths. Temporaries of live processes or other hosts are kept."""
    removed = []
    if not os.path.isdir(folder):
        return removed
    for name in os.listdir(folder):
        m = _TMP_RE.match(name)
        if m is None or m["host"] != _host():
            continue
        if process_alive(int(m["pid"])):
            continue
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(folder, name))
            removed.append(os.path.join(folder, name))
    return removed


def process_alive(pid: int) -> bool:
    """Whether a process of this host has that pid (one of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
