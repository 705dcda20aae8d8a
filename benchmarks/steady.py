"""Steady-state timing shared by the benchmarks: warm each configuration until its step time is stable,
then time all of them in interleaved rounds and report the median with its spread.

Why: torchvision's DenseNet runs its first 2-3 training steps at 13-18 img/s and ~24 img/s from about step
5 on (allocator and oneDNN warm-up), while this package's is steady from the start; a benchmark that
takes one warm-up step and the best of a few rounds overstated our training speed-up by ~45%
(1.68x instead of 1.15x, BENCHMARKS_HISTORY.md). The first steps are reported separately, as start-up cost.

    warm = warm_up(step)                     # seconds of each warm-up step; stable at the end
    times = interleaved({"a": step_a, "b": step_b}, rounds=15)
    s = summary(times["a"])                  # {"median", "q1", "q3", "spread", "n"}
"""
from __future__ import annotations

import statistics
from typing import Callable

MIN_WARMUP = 10  # torchvision takes 5-10 steps to reach its speed: never fewer, whatever the criterion says
MAX_WARMUP = 40
WINDOW = 3  # steps per window of the stability test
TOLERANCE = 0.05  # stable: the medians of the last two windows within 5% of each other


def warm_up(step: Callable[[], float], min_steps: int = MIN_WARMUP, max_steps: int = MAX_WARMUP,
            window: int = WINDOW, tolerance: float = TOLERANCE) -> list[float]:
    """Call `step` (which returns its own time in seconds) until the median of its last `window` times is
    within `tolerance` of the median of the `window` before, and at least `min_steps` times; at most
    `max_steps`. Returns every warm-up time (the first of them is the start-up cost)."""
    times: list[float] = []
    while len(times) < max_steps:
        times.append(step())
        if len(times) >= max(min_steps, 2 * window) and stable(times, window, tolerance):
            break
    return times


def stable(times: list[float], window: int = WINDOW, tolerance: float = TOLERANCE) -> bool:
    last, before = statistics.median(times[-window:]), statistics.median(times[-2 * window:-window])
    return abs(last - before) <= tolerance * before


def interleaved(steps: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """`rounds` times of each step, in interleaved rounds (a rotated order each round, so that no
    configuration always follows the same one), so that load from other processes hits all alike."""
    names = list(steps)
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:
            times[k].append(steps[k]())
    return times


def summary(times: list[float]) -> dict[str, float]:
    """Median, quartiles and spread ((q3 - q1) / median) of step times in seconds."""
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    med = statistics.median(times)
    return {"median": med, "q1": q[0], "q3": q[2], "spread": (q[2] - q[0]) / med, "n": len(times)}


def warm_all(steps: dict[str, Callable[[], float]], **kw) -> dict[str, dict]:
    """warm_up for each configuration; {name: {"first_s", "warmup_steps", "warm_median_s"}} (start-up cost)."""
    out = {}
    for k, step in steps.items():
        w = warm_up(step, **kw)
        out[k] = {"first_s": w[0], "warmup_steps": len(w), "warm_median_s": statistics.median(w[-WINDOW:]),
                  "stable": stable(w)}
    return out
