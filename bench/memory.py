"""Resident-memory readings for benchmarks (Linux /proc), and timing a step with its CUDA
peak."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss_bytes() -> int:
    """Current resident set size."""
    return _status("VmRSS")


def peak_rss_bytes() -> int:
    """Peak resident set size since the process started or `reset_peak()`."""
    return _status("VmHWM")


def reset_peak() -> None:
    """Start measuring the peak from now (writing 5 to clear_refs resets VmHWM)."""
    Path("/proc/self/clear_refs").write_text("5")


def timed(once: Callable[[], Any], steps: int, device: torch.device) -> tuple[float, int, Any]:
    """Median seconds of `once()` over `steps` calls after a warm-up (and compilation), the
    CUDA peak memory of those calls (0 elsewhere), and the warm-up's result."""
    out = once()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        once()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return statistics.median(times), peak, out
