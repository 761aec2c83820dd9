"""The host's memory use as the memory detector reads it (psutil: MemAvailable), for the
tests that fill it with a real hog.

Freed memory does not always show at once: on a VM with free page reporting (this one:
``page_reporting.page_reporting_order=11``) the kernel takes freed pages off its free lists
while it reports them to the hypervisor, so after a 2.4 GB hog exits MemAvailable stays
1-5 points lower for seconds to minutes, falling back ~0.05 points a second, and it is
still falling from whatever ran before the test. graced reports what the kernel says; a
test of "the mission resolves once the hog is gone" must wait for the kernel to say the
hog is gone, not assume it.
"""

from __future__ import annotations

import time

import psutil

SETTLE_S = 60.0
"""The longest wait for the host's use to stop falling before a test takes its level."""

BACK_S = 180.0
"""The longest wait for the kernel to show a hog's memory as available again."""


def settled_percent(steady: float = 0.3, over: float = 2.0, limit: float = SETTLE_S) -> float:
    """The host's memory use once it has stopped falling (freed pages still being
    reported from earlier work lower it for a while): the highest of its reads over the
    last ``over`` seconds once they span no more than ``steady`` points, or after
    ``limit`` seconds the current read. A level taken while it still falls would put a
    threshold "4 points above the host's use" within reach of the host alone."""
    reads: list[tuple[float, float]] = []
    deadline = time.monotonic() + limit
    while True:
        now = time.monotonic()
        reads.append((now, psutil.virtual_memory().percent))
        recent = [p for t, p in reads if t >= now - over]
        if now - reads[0][0] >= over and max(recent) - min(recent) <= steady:
            return max(recent)
        if now > deadline:
            return reads[-1][1]
        time.sleep(0.25)  # a state no event announces: read it, a few times a second


def wait_below(threshold: float, what: str, timeout: float = BACK_S) -> float:
    """Wait until the kernel shows the host's memory use below ``threshold`` (percent)
    and return the monotonic time it first did; AssertionError naming ``what`` and the
    last level if it does not within ``timeout`` (others' work or the kernel's late return
    of freed pages holds it there: the detector is right to stay anomalous)."""
    deadline = time.monotonic() + timeout
    while True:
        level = psutil.virtual_memory().percent
        if level < threshold:
            return time.monotonic()
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{what}: the host's memory use stayed at {level:.1f} %, not below "
                f"{threshold:.2f} %, for {timeout:g} s (others' work, or freed pages the "
                "kernel has not returned yet)")
        time.sleep(0.1)
