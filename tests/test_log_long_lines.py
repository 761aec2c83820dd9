"""A log line longer than 64 KiB: its marker still counts wherever it sits, and graced's
memory stays bounded however long the line (a review found a marker past 64 KiB lost)."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

from graced.config import DetectorConfig
from graced.detectors.logs import MAX_LINE, READ_CHUNK, LogFile


def _detector(log: Path, **extra: object) -> LogFile:
    det = LogFile(DetectorConfig(name="l", kind="log", file=str(log), pattern="ERROR",
                                 max_ratio=0.5, window=600.0, min_lines=1, **extra))
    det.sample()  # opens the file at its end
    return det


def _append(log: Path, data: bytes) -> None:
    with open(log, "ab") as fh:
        fh.write(data)


def test_a_marker_at_the_end_of_a_long_line_counts(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    log.write_bytes(b"")
    det = _detector(log)
    try:
        _append(log, b"x" * (3 * MAX_LINE) + b" ERROR at the end\nok\n")
        obs = det.sample()[0]
        assert (obs.detail["lines"], obs.detail["matches"]) == (2, 1)
    finally:
        det.close()


def test_a_marker_across_two_reads_and_a_line_over_several_samples(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    log.write_bytes(b"")
    det = _detector(log)
    try:
        # "ERROR" straddles the boundary of two reads of the file.
        _append(log, b"y" * (READ_CHUNK - 2) + b"ERROR")
        assert det.sample()[0].detail["lines"] == 0  # not ended yet: nothing counted
        _append(log, b" still the same line\n")
        obs = det.sample()[0]
        assert (obs.detail["lines"], obs.detail["matches"]) == (1, 1)
        _append(log, b"z" * (2 * MAX_LINE) + b"\n")  # a long line with no marker
        obs = det.sample()[0]
        assert (obs.detail["lines"], obs.detail["matches"]) == (2, 1)
    finally:
        det.close()


def test_a_long_request_line_with_its_error_at_the_end_is_a_failed_request(
        tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    log.write_bytes(b"")
    det = _detector(log, request_pattern="GET ")
    try:
        _append(log, b"GET /" + b"q" * (2 * MAX_LINE) + b" ERROR\n" + b"noise\n")
        obs = det.sample()[0]
        assert (obs.detail["requests"], obs.detail["matches"]) == (1, 1)
    finally:
        det.close()


def test_a_line_that_never_ends_keeps_memory_bounded(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    log.write_bytes(b"")
    det = _detector(log)
    try:
        block = b"w" * (4 << 20)
        tracemalloc.start()
        for _ in range(8):  # 32 MiB of one line, read over 8 samples
            _append(log, block)
            det.sample()
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert peak < 4 * READ_CHUNK, peak  # a read or two in flight, never the line
        _append(log, b"ERROR\n")
        obs = det.sample()[0]
        assert (obs.detail["lines"], obs.detail["matches"]) == (1, 1)
    finally:
        det.close()
