"""Progress that stays readable in a log file: a line now and then, never a bar redrawn with carriage returns.

progress() draws a tqdm bar on a terminal and prints Progress lines otherwise: a bar that clears itself leaves its
carriage returns in a log file, and the result line printed next lands on the bar's line."""
from __future__ import annotations

import sys
import time


def duration(seconds: float) -> str:
    """'0:42', '12:03', '2:05:09'."""
    s = int(round(max(seconds, 0.0)))
    h, m = divmod(s // 60, 60)
    return f"{h}:{m:02d}:{s % 60:02d}" if h else f"{m}:{s % 60:02d}"


def progress_line(what: str, done: int, total: int | None, rate: float, unit: str = "batches") -> str:
    """'<what> 128/384 steps (33%) | 3.1 steps/s, 1:22 left'; without a total, the count and the rate."""
    if total:
        head = f"{what} {done}/{total} {unit} ({100 * done / total:.0f}%)"
        left = f", {duration((total - done) / rate)} left" if rate > 0 and done < total else ""
    else:
        head, left = f"{what} {done} {unit}", ""
    return f"{head} | {rate:.3g} {unit}/s{left}" if rate > 0 else head


class Progress:
    """Wraps an iterable and prints a progress line every `every` items, at least every `interval` seconds while
    items keep coming, and when it ends. Lines go to stderr, so that a command's results on stdout stay clean."""

    def __init__(self, iterable, what: str, total: int | None = None, every: int | None = None,
                 interval: float = 30.0, unit: str = "batches", file=None):
        self.iterable, self.what, self.unit, self.every, self.interval = iterable, what, unit, every, interval
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.file = file

    def _print(self, line: str) -> None:
        print(line, file=self.file or sys.stderr, flush=True)

    def __iter__(self):
        start = last = time.perf_counter()
        done = 0
        try:
            for item in self.iterable:
                yield item
                done += 1
                now = time.perf_counter()
                if (self.every and done % self.every == 0) or now - last >= self.interval:
                    self._print(progress_line(self.what, done, self.total, done / (now - start), self.unit))
                    last = now
        finally:  # also when the consumer stops early
            self._print(f"{self.what}: {done} {self.unit} in {duration(time.perf_counter() - start)}")


def progress(iterable, desc: str | None, total: int | None = None, unit: str = "batches", file=None):
    """iterable with progress on stderr: a tqdm bar (cleared when done) where stderr is a terminal, else Progress
    lines (each on its own line); nothing when desc is None."""
    if desc is None:
        return iterable
    stream = file or sys.stderr
    if getattr(stream, "isatty", lambda: False)():
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit.rstrip("s") or unit, leave=False, file=stream)
    return Progress(iterable, desc, total=total, unit=unit, file=stream)
