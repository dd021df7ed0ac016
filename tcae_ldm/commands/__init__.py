"""The project's commands beyond LightningCLI's fit / validate / test / predict: one module per command, named
as the command (`tcae-ldm fid-stats` -> fid_stats.py), each with main(argv)."""
from __future__ import annotations

from typing import NoReturn


def fail(prog: str, message: str) -> NoReturn:
    """End a command on one line, '<prog>: error: <message>' on stderr, exit status 1, no traceback."""
    raise SystemExit(f"{prog}: error: {message}")
