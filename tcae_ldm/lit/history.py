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


def _step(row: dict) -> float:
    return float(row["step"]) if row.get("step") not in ("", None) else float("inf")


def _complete(row: dict) -> bool:
    """False for the cut-off last line a killed process may leave (csv gives missing fields as None)."""
    return None not in row.values() and None not in row


class HistoryWriter(ExperimentWriter):
    """ExperimentWriter that keeps an existing metrics.csv and counts its rows."""

    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir)
        self.rows_written, self._keep = 0, None
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
        if self.metrics and self._keep is not None:  # the resumed run logs its first rows: settle the history now
            self.settle(min(int(m["step"]) for m in self.metrics))
        n = len(self.metrics)
        super().save()
        self.rows_written += n

    @property
    def rows(self) -> int:
        """Rows of this run's history so far, logged or buffered (call settle() first after keep_first())."""
        return self.rows_written + len(self.metrics)

    @property
    def unsettled(self) -> bool:
        return self._keep is not None

    def keep_first(self, rows: int) -> None:
        """A resumed run: its checkpoint had seen the first `rows` rows. The history is settled when the run logs its
        first row (or saves its first checkpoint): a resumed run that logs nothing (it had already finished, or dies
        before its first step) leaves the history as it was."""
        self._keep = rows

    def settle(self, first_new_step: int) -> None:
        """Keep the rows the checkpoint had seen, and of the later rows those logged at a step before the resumed
        run's first one (Lightning logs a step's training row just after the checkpoint of that step is saved, and
        a resumed run does not log it again); drop the rest, which the resumed run logs anew."""
        header, rows = self.read()
        keep = rows[: self._keep] + [r for r in rows[self._keep:] if _step(r) < first_new_step]
        if header:
            self._write(header, keep)  # also drops a line cut off by a kill
        self.rows_written, self._keep = len(keep), None

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
        self.metrics_keys, self.rows_written, self._keep = [], 0, None
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
