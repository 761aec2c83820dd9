"""systemd's watchdog: graced pets it only while it works. A stalled event loop (here:
another process holds the journal's write lock, so graced's commits in the loop wait on
SQLite) stops WATCHDOG=1 for longer than WatchdogSec, which is what makes systemd
restart it; once the fault goes, the pets come back."""

from __future__ import annotations

import sqlite3
import time

import pytest

WATCHDOG_SEC = 2.0


def pets(g, seconds: float) -> list[float]:
    """The arrival times of WATCHDOG=1 on graced's notify socket during ``seconds``."""
    assert g.notify is not None
    seen = []
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        g.notify.settimeout(left)
        try:
            msg = g.notify.recv(4096).decode()
        except TimeoutError:
            break
        if "WATCHDOG=1" in msg.split("\n"):
            seen.append(time.monotonic())
    return seen


def longest_gap(start: float, times: list[float], end: float) -> float:
    marks = [start, *times, end]
    return max(b - a for a, b in zip(marks, marks[1:], strict=False))


@pytest.mark.slow
def test_a_stalled_event_loop_trips_the_watchdog(make_graced) -> None:
    g = make_graced(start=False)
    g.env_extra["WATCHDOG_USEC"] = str(int(WATCHDOG_SEC * 1e6))
    g.start()
    g.wait_notify("WATCHDOG=1", 10)
    start = time.monotonic()
    healthy = pets(g, 3 * WATCHDOG_SEC)
    assert longest_gap(start, healthy, time.monotonic()) < WATCHDOG_SEC, healthy
    # The fault: another process takes the journal's write lock and keeps it.
    lock = sqlite3.connect(g.state / "journal.db", timeout=10, isolation_level=None)
    try:
        lock.execute("BEGIN IMMEDIATE")
        start = time.monotonic()
        stalled = pets(g, 4 * WATCHDOG_SEC)
        gap = longest_gap(start, stalled, time.monotonic())
        assert gap > WATCHDOG_SEC, f"pets went on while the loop stalled: {stalled}"
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    # The fault gone, graced works again and says so.
    g.wait_notify("WATCHDOG=1", 20)
    assert g.ctl("status").returncode == 0
