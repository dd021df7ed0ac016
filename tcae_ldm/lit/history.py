"""A CSV logger that never deletes what a run measured.

Lightning's CSVLogger deletes an existing metrics.csv as soon as a run starts in its folder (every config here
logs to one fixed folder, `version: ""`), so a resumed run lost the history that `tcae-ldm compare` reads.
HistoryCSVLogger keeps the file: it appends, rewrites it atomically when new columns appear, and lets
tcae_ldm.lit.resume.SafeResume cut it back to what the resumed checkpoint had seen (a resume) or move it
aside (a fresh run in a used folder).
"""
from __future__ import annotations

import csv
import logging
import os
import time

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from tcae_ldm.utils.atomic import atomic_write

log = logging.getLogger(__name__)


def _complete(row: dict) -> bool:
    """False for the cut-off last line a killed process may leave (csv gives missing fields as None)."""
    return None not in row.values() and None not in row


class HistoryWriter(ExperimentWriter):
    """ExperimentWriter that keeps an existing metrics.csv and counts its rows."""

    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir)
        self.rows_written = 0
        if os.path.isfile(self.metrics_file_path):
            header, rows = self.read()
            self.metrics_keys, self.rows_written = header, len(rows)

    def _check_log_dir_exists(self) -> None:
        pass  # Lightning's version deletes metrics.csv here

    def read(self) -> tuple[list[str], list[dict]]:
        """(header, complete rows) of metrics.csv on disk."""
        if not os.path.isfile(self.metrics_file_path):
            return [], []
        with open(self.metrics_file_path, newline="") as f:
            reader = csv.DictReader(f)
            rows = [r for r in reader if _complete(r)]
            return list(reader.fieldnames or []), rows

    def _write(self, header: list[str], rows: list[dict]) -> None:
        with atomic_write(self.metrics_file_path, "w") as f:
            f.reconfigure(newline="")  # csv writes its own line ends
            writer = csv.DictWriter(f, fieldnames=header)
            writer.writeheader()
            writer.writerows(rows)

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        _, rows = self.read()
        self._write(fieldnames, rows)  # atomically: a kill during the rewrite must not lose the history

    def save(self) -> None:
        n = len(self.metrics)
        super().save()
        self.rows_written += n

    def truncate(self, keep_rows: int | None = None, before_step: int | None = None) -> int:
        """Keep the first `keep_rows` rows, or the rows logged at a step < `before_step`; returns rows dropped."""
        header, rows = self.read()
        if keep_rows is not None:
            kept = rows[:keep_rows]
        else:
            kept = [r for r in rows if r.get("step") in ("", None) or int(float(r["step"])) < before_step]
        if header:
            self._write(header, kept)  # also drops a line cut off by a kill
        self.rows_written = len(kept)
        return len(rows) - len(kept)

    def move_aside(self) -> str | None:
        """Rename an existing metrics.csv to metrics-<time>.csv and start an empty history; returns the new name."""
        if not os.path.isfile(self.metrics_file_path):
            return None
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(os.path.getmtime(self.metrics_file_path)))
        target, n = os.path.join(self.log_dir, f"metrics-{stamp}.csv"), 1
        while os.path.exists(target):
            n += 1
            target = os.path.join(self.log_dir, f"metrics-{stamp}-{n}.csv")
        os.replace(self.metrics_file_path, target)
        self.metrics_keys, self.rows_written = [], 0
        return target


class HistoryCSVLogger(CSVLogger):
    """Lightning's CSVLogger (same folder layout and file format) whose metrics.csv survives a resume.

    A resumed run keeps the rows logged before its checkpoint was saved and replaces the later ones; a fresh run
    in a folder that already has a metrics.csv moves it aside to metrics-<time>.csv. (Both done by SafeResume,
    which the training modules install.)
    """

    @property
    @rank_zero_experiment
    def experiment(self) -> HistoryWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = HistoryWriter(log_dir=self.log_dir)
        return self._experiment
