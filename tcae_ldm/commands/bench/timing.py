"""How `tcae-ldm bench` measures: interleaved rounds with a warm-up, medians, a memory probe, MFU peaks.

Speed figures are only compared inside one run: every case of a group is timed in rounds (A B C A B C ...)
after a warm-up, and the median of the rounds is kept, so a machine that slows down mid-run slows every
model alike.
"""
from __future__ import annotations

import math
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn

from tcae_ldm.utils.progress import duration, progress_line

# Dense (no 2:4 sparsity) bf16 tensor-core peaks in TFLOP/s, matched in order against the device name.
PEAK_BF16_TFLOPS = [("GH200", 989.0), ("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0),
                    ("H100", 989.0), ("H800", 989.0), ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0),
                    ("L40S", 362.0), ("L4", 121.0), ("A10G", 70.0)]


def peak_bf16_tflops(device_name: str) -> float | None:
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in device_name), None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class MemoryProbe:
    """Peak memory a call adds on top of what was held before it (bytes; None where unmeasurable).

    CUDA: the allocator's own peak. CPU: resident set size sampled every 2 ms (needs psutil); memory the
    C allocator kept from earlier calls is reused without growing the RSS, so on CPU it is a lower bound.
    """

    def __init__(self, device: torch.device):
        self.device, self.peak_bytes = device, None

    def __enter__(self):
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._before = torch.cuda.memory_allocated(self.device)
            return self
        try:
            import psutil
        except ImportError:
            self._thread = None
            return self
        proc, self._stop, self._max = psutil.Process(), threading.Event(), [0]
        self._before = proc.memory_info().rss

        def sample():
            while not self._stop.is_set():
                self._max[0] = max(self._max[0], proc.memory_info().rss)
                self._stop.wait(0.002)
        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            sync(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._before
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(0, self._max[0] - self._before)
        return False


def max_rss_mb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


@dataclass
class Case:
    """One timed thing: fn() processes `items` images (or latents); resident() is the memory of its own
    (weights, optimizer state) already held when the call starts."""
    key: str
    fn: Callable[[], None]
    items: int
    resident: Callable[[], int] = lambda: 0
    result: dict = field(default_factory=dict)


def describe_error(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]


def time_interleaved(cases: list[Case], repeats: int, device: torch.device, min_round_s: float = 0.0,
                     progress: Callable[[str], None] | None = None) -> None:
    """Warm up each case (measuring its memory), then time `repeats` rounds A B C A B C ...; fills .result.

    On a GPU, a second warm-up call sizes how many calls one round makes (about min_round_s), so that
    launch jitter stays small against the round; on a CPU one call is already long. progress receives a line
    after the warm-up and after each round.
    """
    started = time.perf_counter()
    live = []
    for c in cases:
        try:
            resident = c.resident()
            with MemoryProbe(device) as mem:
                c.fn()
            iters = 1
            if min_round_s > 0:
                t0 = time.perf_counter()
                c.fn()
                sync(device)
                iters = max(1, min(50, math.ceil(min_round_s / max(time.perf_counter() - t0, 1e-6))))
            peak = None if mem.peak_bytes is None else (mem.peak_bytes + resident) / 2**20
            c.result = {"iters_per_round": iters, "peak_mem_mb": peak, "times_s": []}
            live.append(c)
        except Exception as e:  # an OOM or a compile failure ends this case, not the run
            c.result = {"error": describe_error(e)}
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if progress:
        progress(f"warmed up {len(live)} of {len(cases)} cases in {duration(time.perf_counter() - started)}")
    started = time.perf_counter()
    for r in range(repeats):
        if progress and r:
            progress(progress_line("timed", r, repeats, r / (time.perf_counter() - started), "rounds"))
        for c in list(live):
            try:
                n = c.result["iters_per_round"]
                sync(device)
                t0 = time.perf_counter()
                for _ in range(n):
                    c.fn()
                sync(device)
                c.result["times_s"].append((time.perf_counter() - t0) / n)
            except Exception as e:
                c.result = {"error": describe_error(e)}
                live.remove(c)
    for c in live:
        c.result["median_s"] = statistics.median(c.result["times_s"])
        c.result["items_per_s"] = c.items / c.result["median_s"]


def round_ratios(r: dict, base: dict) -> dict:
    """A case's ratio to a base case round by round (the two ran next to each other in each round): its median and
    range, the spread that the ratio of the medians hides."""
    times, ref = r.get("times_s"), base.get("times_s")
    if not times or not ref or len(times) != len(ref):
        return {}
    ratios = [b / a for a, b in zip(times, ref)]
    return {"ratio_rounds": ratios, "ratio_rounds_median": statistics.median(ratios),
            "ratio_rounds_min": min(ratios), "ratio_rounds_max": max(ratios)}


def state_bytes(module: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Bytes of the parameters and of whatever optimizer state exists yet (AdamW creates it on its first
    step, inside the probed call); gradients are freed between steps, so a step's peak counts them."""
    n = sum(p.numel() * p.element_size() for p in module.parameters())
    if optimizer is not None:
        n += sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                 if torch.is_tensor(t))
    return n


def time_passes(make_iter, batches: int, repeats: int) -> dict:
    """Items per second over `batches` batches; the first pass (worker start-up, caches) is not timed."""
    times, count = [], 0
    for r in range(repeats + 1):
        t0, n = time.perf_counter(), 0
        for i, b in enumerate(make_iter()):
            n += b
            if i + 1 >= batches:
                break
        if r:
            times.append(time.perf_counter() - t0)
            count = n
    med = statistics.median(times)
    return {"items_per_s": count / med, "times_s": times, "items_per_pass": count}
