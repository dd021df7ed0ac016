"""Atomic writes: a failure half-way (a full disk) leaves the old file and no temporary, wherever $TMPDIR is."""
import errno
import os
import stat
import subprocess
import sys

import pytest

from tcae_ldm.utils.atomic import (
    TMP_SUFFIX,
    atomic_write,
    remove_stale_temporaries,
    write_bytes_atomic,
)


def test_failure_half_way_keeps_the_old_file_and_removes_the_temporary(tmp_path, monkeypatch):
    elsewhere = tmp_path / "tmpdir"  # $TMPDIR on "another filesystem": nothing may go there
    elsewhere.mkdir()
    monkeypatch.setenv("TMPDIR", str(elsewhere))
    target = tmp_path / "run" / "last.ckpt"
    write_bytes_atomic(str(target), b"old complete checkpoint")
    with pytest.raises(OSError, match="No space left"):
        with atomic_write(str(target)) as f:
            f.write(b"new and half")
            assert os.path.dirname(f.name) == str(tmp_path / "run")  # the temporary lives beside the target
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert target.read_bytes() == b"old complete checkpoint"
    assert os.listdir(tmp_path / "run") == ["last.ckpt"] and os.listdir(elsewhere) == []


def test_new_files_get_the_umask_mode_and_group_read_when_asked(tmp_path):
    old = os.umask(0o077)  # the strictest umask: mkstemp's 0600 would hide a shared cache from the group
    try:
        write_bytes_atomic(str(tmp_path / "private"), b"x")
        write_bytes_atomic(str(tmp_path / "shared"), b"x", group_readable=True)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "private").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "shared").st_mode) == 0o640


def test_temporaries_of_killed_writers_are_removed_and_live_ones_kept(tmp_path):
    target = str(tmp_path / "last.ckpt")
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
        dead_pid = int(dead.stdout)
        import socket
        host = socket.gethostname().split(".")[0]
        stale = tmp_path / f".last.ckpt.{host}.{dead_pid}.abc{TMP_SUFFIX}"
        live = tmp_path / f".last.ckpt.{host}.{child.pid}.def{TMP_SUFFIX}"
        other_host = tmp_path / f".last.ckpt.otherhost.{dead_pid}.ghi{TMP_SUFFIX}"
        for p in (stale, live, other_host):
            p.write_bytes(b"partial")
        write_bytes_atomic(target, b"complete")
        assert remove_stale_temporaries(str(tmp_path)) == [str(stale)]
        assert sorted(os.listdir(tmp_path)) == sorted([live.name, other_host.name, "last.ckpt"])
    finally:
        child.kill()
        child.wait()
