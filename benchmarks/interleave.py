"""Timing shared by the benchmarks: callables run alternately, round by round,
so whatever else loads the machine hits every one of them alike."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def interleaved_times(calls: dict[str, Callable[[], object]], rounds: int,
                      warmup: int = 20) -> dict[str, list[float]]:
    """Seconds of every call, per name, after ``warmup`` untimed calls of each."""
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in calls}
    clock = time.perf_counter
    for _ in range(rounds):
        for name, fn in calls.items():
            start = clock()
            fn()
            times[name].append(clock() - start)
    return times


def interleaved(calls: dict[str, Callable[[], object]], rounds: int,
                warmup: int = 20) -> dict[str, float]:
    """Median seconds per call of each callable."""
    times = interleaved_times(calls, rounds, warmup)
    return {name: statistics.median(values) for name, values in times.items()}
