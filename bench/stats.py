"""Figures every bench reports the same way.

``percentile`` is the one definition of p50/p99 for all benches: the nearest-rank
percentile (the smallest value with at least q % of the values at or below it), so a
p99 of 100 values is the 99th smallest and of 1,000 values the 990th. ``cores`` is the
number of CPUs this process may run on (its affinity mask), not the machine's count.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable


def percentile(values: Iterable[float], q: float) -> float:
    """Nearest-rank percentile ``q`` (0 < q <= 100) of ``values``; NaN if there are none."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def p50(values: Iterable[float]) -> float:
    return percentile(values, 50)


def p99(values: Iterable[float]) -> float:
    return percentile(values, 99)


def cores() -> int:
    """CPUs this process may run on (``sched_getaffinity``), as measured, not assumed."""
    return len(os.sched_getaffinity(0))


def machine() -> str:
    """What a figure was measured on: usable cores and the 1-minute load average (other
    processes take cores from a bench unevenly; a figure means little without it)."""
    return f"{cores()} cores, load average {os.getloadavg()[0]:.1f}"
