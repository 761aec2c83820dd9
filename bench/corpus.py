"""A labelled synthetic corpus for the baseline detector (deterministic for a seed).

Each series: a level, daily seasonality (or none), a slow drift (or none), noise of one
of several shapes, and 2-5 labelled anomalies: spikes, level shifts, variance increases.
Seasonality, drift and noise are normal and must not alarm.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

STEP = 60.0  # seconds between points
NOISES = ("gaussian", "laplace", "uniform", "ar1", "student6")


@dataclass
class Series:
    name: str
    ts: list[float]
    values: list[float]
    windows: list[tuple[int, int, str]] = field(default_factory=list)  # [start, end] index


def _noise(rng: random.Random, shape: str, sigma: float, prev: float) -> float:
    if shape == "gaussian":
        return rng.gauss(0, sigma)
    if shape == "laplace":
        b = sigma / math.sqrt(2)
        return rng.expovariate(1 / b) * (1 if rng.random() < 0.5 else -1)
    if shape == "uniform":
        return rng.uniform(-sigma * math.sqrt(3), sigma * math.sqrt(3))
    if shape == "ar1":
        return 0.5 * prev + rng.gauss(0, sigma * math.sqrt(0.75))
    # Student's t with 6 degrees of freedom, scaled to sd sigma
    t = rng.gauss(0, 1) / math.sqrt(rng.gammavariate(3, 2) / 6)
    return t * sigma / math.sqrt(1.5)


def make_series(seed: int, n: int = 5000) -> Series:
    rng = random.Random(seed)
    shape = NOISES[seed % len(NOISES)]
    level = rng.uniform(10, 1000)
    sigma = level * rng.uniform(0.01, 0.05)
    amp = rng.choice([0.0, rng.uniform(3, 15) * sigma])
    drift = rng.choice([0.0, rng.uniform(-3, 3) * sigma / 1000])
    t0 = 1_767_225_600.0 + rng.randrange(0, 86400)
    ts = [t0 + i * STEP for i in range(n)]
    base = [level + amp * math.sin(2 * math.pi * (t % 86400) / 86400) + drift * i
            for i, t in enumerate(ts)]
    windows: list[tuple[int, int, str]] = []
    shift = [0.0] * n
    noise_mult = [1.0] * n
    spikes: dict[int, float] = {}
    # At least 300 points apart, so a variance segment (200 points) never hides the next.
    starts = sorted(rng.sample(range(600, n - 300, 300), rng.randint(2, 5)))
    for start in starts:
        kind = rng.choice(["spike", "spike", "shift", "variance"])
        if kind == "spike":
            spikes[start] = rng.choice([-1, 1]) * rng.uniform(15, 40) * sigma
            windows.append((start, start + 1, "spike"))
        elif kind == "shift":
            delta = rng.choice([-1, 1]) * rng.uniform(8, 20) * sigma
            for i in range(start, n):
                shift[i] += delta
            windows.append((start, start + 50, "level shift"))
        else:
            factor = rng.uniform(4, 8)
            for i in range(start, min(n, start + 200)):
                noise_mult[i] *= factor
            windows.append((start, start + 100, "variance change"))
    values = []
    prev = 0.0
    for i in range(n):
        e = _noise(rng, shape, sigma, prev)
        prev = e
        values.append(base[i] + shift[i] + e * noise_mult[i] + spikes.get(i, 0.0))
    return Series(f"s{seed:03d}-{shape}", ts, values, windows)


def corpus(count: int = 60, n: int = 5000) -> list[Series]:
    return [make_series(seed, n) for seed in range(count)]


def evaluate(series: list[Series], flag: object) -> dict[str, float]:
    """Run ``flag(ts_list, values) -> list[bool]`` over the corpus; recall and false alarms.

    A window counts as found if any point in it is flagged; a flagged point outside every
    window is a false alarm.
    """
    found = total = false = normal = 0
    per_kind: dict[str, list[int]] = {}
    for s in series:
        flags = flag(s.ts, s.values)  # type: ignore[operator]
        inside = [False] * len(s.values)
        for start, end, kind in s.windows:
            hit = any(flags[start:end + 1])
            found += hit
            total += 1
            per_kind.setdefault(kind, [0, 0])
            per_kind[kind][0] += hit
            per_kind[kind][1] += 1
            for i in range(start, min(end + 1, len(inside))):
                inside[i] = True
        for i, f in enumerate(flags):
            if not inside[i]:
                normal += 1
                false += f
    return {"recall": found / total, "windows": total, "found": found,
            "false_alarms": false, "normal_points": normal,
            "false_per_10k": 10000 * false / normal,
            **{f"recall_{k}": v[0] / v[1] for k, v in per_kind.items()}}
