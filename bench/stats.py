"""Median and spread of repeated timings, and the small helpers to take them.

summarize(samples) -> {"median", "min", "max", "p10", "p90", "mean", "stdev", "n"} (the samples' unit, here
seconds), or None for no samples. "Spread" in the report is (p90 - p10) / median: robust to the one slow run
that other processes on a shared machine cause.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Callable, Iterable


def _quantile(sorted_xs: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if len(sorted_xs) == 1:
        return sorted_xs[0]
    pos = q * (len(sorted_xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def summarize(samples: Iterable[float]) -> dict | None:
    xs = sorted(float(x) for x in samples)
    if not xs:
        return None
    return {
        "median": statistics.median(xs),
        "min": xs[0],
        "max": xs[-1],
        "p10": _quantile(xs, 0.10),
        "p90": _quantile(xs, 0.90),
        "mean": statistics.fmean(xs),
        "stdev": statistics.stdev(xs) if len(xs) > 1 else 0.0,
        "n": len(xs),
    }


def spread(s: dict | None) -> float | None:
    """(p90 - p10) / median of a summary."""
    if not s or not s["median"]:
        return None
    return (s["p90"] - s["p10"]) / s["median"]


def repeat(fn: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    """Wall seconds of `repeats` calls of fn after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, None when either is missing or b is 0."""
    if a is None or b is None or b == 0:
        return None
    return a / b
