"""A log detector's window kept across a restart: what is saved, and hostile saved data."""

from __future__ import annotations

import time

import pytest

from graced.config import DetectorConfig
from graced.detectors.logs import SAVED_BUCKETS, _Window


def _window(**keys: object) -> _Window:
    return _Window(DetectorConfig(name="l", kind="log", file="/x", max_ratio=0.05,
                                  min_lines=1, window=60.0, **keys))


def test_the_window_round_trips_in_bounded_buckets_and_drops_what_aged_out() -> None:
    w = _window()
    for i in range(1000):  # a busy log: a thousand samples in the window
        w.observe("s", ["ok"] * 3 + ["ERROR x"] * (i % 2))
    saved = w.saved()
    assert len(saved["counts"]) <= SAVED_BUCKETS
    again = _window()
    again.restore(saved)
    assert again.observe("s", []).detail == {"lines": 3500, "matches": 500, "window_s": 60.0,
                                             "rate_per_s": 8.3333, "ratio": 0.1429}
    old = _window()
    old.restore({**saved, "saved_at": time.time() - 61})  # graced was down past the window
    assert old.observe("s", []).detail["lines"] == 0
    other = _window(pattern="FATAL")  # counts of another pattern mean nothing now
    other.restore(saved)
    assert other.observe("s", []).detail["lines"] == 0


@pytest.mark.parametrize("bad", [
    None, [], {"pattern": "ERROR", "request_pattern": "", "saved_at": "now", "counts": []},
    {"pattern": "ERROR", "request_pattern": "", "saved_at": 1.0, "counts": [[1, 2, 3]]},
    {"pattern": "ERROR", "request_pattern": "", "saved_at": 1.0, "counts": [[-1, 2, 1]]},
    {"pattern": "ERROR", "request_pattern": "", "saved_at": 1.0, "counts": [[1, 2.5, 1]]},
    {"pattern": "ERROR", "request_pattern": "", "saved_at": float("nan"), "counts": []},
    {"pattern": "ERROR", "request_pattern": "", "saved_at": 1.0,
     "counts": [[0, 1, 0]] * (SAVED_BUCKETS + 1)},
])
def test_damaged_saved_windows_are_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="log window"):
        _window().restore(bad)
