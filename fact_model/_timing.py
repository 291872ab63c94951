"""Wall-clock timing for benchmarks and cost columns: medians, after a warm-up call."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

__all__ = ["median_seconds"]


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median wall-clock seconds of ``repeats`` calls of ``fn``, after one untimed warm-up call."""
    if repeats < 1:
        raise ValueError(f"repeats must be ≥ 1, got {repeats}")
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)
