"""Event sources of the detectors, in-process against the real kernel: a pidfd that fires on
a real kill -9, inotify on a real log append and rotation, the PSI trigger's bytes; and the
pure maths of sampling faster near a threshold."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from graced.config import DetectorConfig
from graced.config.detectors import build_detectors
from graced.config.schema import ConfigError
from graced.detectors.cgroup import CgroupMemory, parse_events
from graced.detectors.logs import LogFile
from graced.detectors.pressure import Pressure, parse_total, trigger
from graced.detectors.process import ProcessPresence
from graced.detectors.scoring import FASTEST, next_interval


def _ready(fd: int, timeout: float) -> bool:
    """Is the detector's wakeup fd readable within ``timeout`` s (what trio waits on)?"""
    return bool(select.select([fd], [], [], timeout)[0])


def test_far_from_the_threshold_the_interval_is_kept() -> None:
    assert next_interval(5.0, 30.0, 90.0) == 5.0
    assert next_interval(5.0, None, 90.0) == 5.0
    assert next_interval(5.0, 30.0, None) == 5.0


def test_near_the_threshold_sampling_quickens_down_to_a_floor() -> None:
    mid = next_interval(5.0, 80.0, 90.0)  # 11 % below: (0.111 / 0.25)^2 = 0.198
    assert 0.9 < mid < 1.1
    assert next_interval(5.0, 89.9, 90.0) == pytest.approx(5.0 * FASTEST)
    assert next_interval(5.0, 89.0, 90.0) < mid  # closer: faster


def test_a_percentage_is_near_within_ten_points() -> None:
    assert next_interval(1.0, 5.0, 7.0, percent=True) == pytest.approx(0.05)  # 2 points
    assert next_interval(1.0, 5.0, 7.0) == 1.0  # 29 % of the threshold: far, as a number
    assert next_interval(1.0, 85.0, 90.0, percent=True) == pytest.approx(0.25)
    assert next_interval(1.0, 70.0, 90.0, percent=True) == 1.0


def test_past_the_threshold_the_interval_is_the_configured_one() -> None:
    assert next_interval(5.0, 95.0, 90.0) == 5.0  # hysteresis counts samples: unchanged
    # On the threshold is still normal (the scorer's rule): the nearest, not past it.
    assert next_interval(5.0, 90.0, 90.0) == pytest.approx(5.0 * FASTEST)


def test_a_below_threshold_quickens_as_the_value_falls_towards_it() -> None:
    assert next_interval(10.0, 101.0, 100.0, below=True) < 1.0
    assert next_interval(10.0, 200.0, 100.0, below=True) == 10.0
    assert next_interval(10.0, 99.0, 100.0, below=True) == 10.0


def test_a_psi_trigger_is_written_nul_terminated_in_microseconds() -> None:
    cfg = DetectorConfig(name="p", kind="psi_memory", threshold=7.5, stall_window=2.0)
    assert trigger(cfg) == b"some 150000 2000000\0"
    assert trigger(DetectorConfig(name="p", kind="psi_io", stall="full")) == \
        b"full 600000 2000000\0"


def test_the_total_of_the_some_or_full_line_is_read() -> None:
    text = ("some avg10=0.00 avg60=0.00 avg300=0.00 total=1526\n"
            "full avg10=0.00 avg60=0.00 avg300=0.00 total=453\n")
    assert parse_total(text, "some") == 1526
    assert parse_total(text, "full") == 453
    with pytest.raises(ValueError):
        parse_total("garbage", "some")


@pytest.mark.parametrize(("body", "message"), [
    ('kind = "psi_memory"\nthreshold = 0', "threshold"),
    ('kind = "psi_memory"\nstall_window = 30.0', "stall_window"),
    ('kind = "psi_cpu"\nstall = "most"', "stall"),
    ('kind = "psi_io"\ncgroup = "relative/dir"', "cgroup"),
    ('kind = "load"\nwindow = 120.0', "window"),
    ('kind = "memory"\nstall = "some"', "stall"),
])
def test_bad_pressure_and_load_keys_are_refused(body: str, message: str) -> None:
    import tomllib
    table = tomllib.loads(f'name = "x"\n{body}\n')
    with pytest.raises(ConfigError, match=message):
        build_detectors([table], lambda *a, **k: "")


def test_pressure_kinds_and_load_windows_are_accepted() -> None:
    dets = build_detectors([
        {"name": "m", "kind": "psi_memory"}, {"name": "c", "kind": "psi_cpu", "stall": "full",
                                             "stall_window": 4.0},
        {"name": "l", "kind": "load", "window": 900.0}], lambda *a, **k: "")
    assert [d.effective_threshold for d in dets[:2]] == [10.0, 50.0]
    assert dets[0].effective_subject == "host"


@pytest.mark.skipif(not Path("/proc/pressure/memory").exists(), reason="no PSI here")
def test_pressure_reports_its_mode_and_why_a_trigger_was_refused() -> None:
    det = Pressure(DetectorConfig(name="p", kind="psi_memory", stall_window=2.0))
    try:
        assert det.mode in ("psi-trigger", "poll")
        if det.mode == "poll":  # refused here: it says why, and samples twice a window
            assert det.mode_note.startswith("PSI trigger refused")
            assert det.cadence() == 1.0
        [obs] = det.sample()
        assert obs.value is not None and 0 <= obs.value <= 100 and obs.unit == "% stalled"
    finally:
        det.close()


def test_a_killed_process_wakes_its_detector_at_once() -> None:
    marker = f"grace-pidfd-{os.getpid()}"
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", marker])
    det = ProcessPresence(DetectorConfig(name="w", kind="process", process=marker,
                                         match_cmdline=True))
    try:
        assert det.mode == "pidfd" and det.wakeup is not None
        assert det.sample()[0].value == 1.0
        assert not _ready(det.wakeup.fileno(), 0)
        child.kill()  # a real SIGKILL; not reaped yet: a zombie
        assert _ready(det.wakeup.fileno(), 5)
        assert det.drain()
        [obs] = det.sample()
        assert obs.value == 0.0 and obs.failed  # the zombie does not count as running
    finally:
        child.kill()
        child.wait()
        det.close()


def test_a_log_append_and_a_rotation_wake_the_log_detector(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    log.write_text("start\n")
    (tmp_path / "other.log").write_text("")
    det = LogFile(DetectorConfig(name="l", kind="log", file=str(log), max_ratio=0.5,
                                 window=60.0, min_lines=1))
    try:
        assert det.mode == "inotify" and det.wakeup is not None
        det.sample()
        with open(tmp_path / "other.log", "a") as fh:  # another file in the directory
            fh.write("ERROR elsewhere\n")
        assert not _ready(det.wakeup.fileno(), 0.2)  # its writes never wake this one
        (tmp_path / "other.log").rename(tmp_path / "other.log.1")
        assert _ready(det.wakeup.fileno(), 5)
        assert not det.drain()  # a name came and went: seen, and not this log's business
        with open(log, "a") as fh:
            fh.write("ERROR one\n")
        assert _ready(det.wakeup.fileno(), 5) and det.drain()
        assert det.sample()[0].detail["matches"] == 1
        log.rename(tmp_path / "app.log.1")
        assert _ready(det.wakeup.fileno(), 5) and det.drain()
        log.write_text("ERROR two\n")  # the new file
        assert _ready(det.wakeup.fileno(), 5) and det.drain()
        assert det.sample()[0].detail["matches"] == 2
        with open(log, "a") as fh:  # the new file is watched too
            fh.write("ERROR three\n")
        assert _ready(det.wakeup.fileno(), 5) and det.drain()
        assert det.sample()[0].detail["matches"] == 3
    finally:
        det.close()


def test_memory_events_are_parsed_and_bounded() -> None:
    assert parse_events("low 0\nhigh 3\nmax 1\noom 0\noom_kill 2\njunk\nx y\n") == {
        "low": 0, "high": 3, "max": 1, "oom": 0, "oom_kill": 2}


def test_a_memory_events_change_wakes_its_detector_and_is_one_event(tmp_path: Path) -> None:
    """The cgroup_memory detector on a file laid out as memory.events (the real one needs
    a cgroup v2 memory controller: see tests/test_event_sources_e2e.py): a write to the
    file is an inotify event, and the counters that went up are the anomaly."""
    events = tmp_path / "memory.events"
    events.write_text("low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\n")
    det = CgroupMemory(DetectorConfig(name="c", kind="cgroup_memory", cgroup=str(tmp_path)))
    try:
        assert det.mode == "inotify" and det.wakeup is not None
        [quiet] = det.sample()
        assert quiet.value == 0.0 and quiet.event is None
        events.write_text("low 0\nhigh 5\nmax 2\noom 1\noom_kill 1\n")
        assert _ready(det.wakeup.fileno(), 5) and det.drain()
        [obs] = det.sample()
        assert obs.event == "memory events: max +2, oom +1, oom_kill +1"  # high: not counted
        assert obs.value == 4.0
        assert det.sample()[0].event is None  # nothing new: normal again
    finally:
        det.close()


@pytest.mark.parametrize(("table", "message"), [
    ({"name": "c", "kind": "cgroup_memory"}, "either cgroup"),
    ({"name": "c", "kind": "cgroup_memory", "cgroup": "/x", "unit": "a.service"},
     "either cgroup"),
    ({"name": "c", "kind": "cgroup_memory", "unit": "a.service", "memory_events": ["boom"]},
     "memory_events"),
])
def test_bad_cgroup_memory_tables_are_refused(table: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_detectors([table], lambda *a, **k: "")


def test_a_cpu_average_over_a_window_has_no_value_until_it_has_watched_that_long() -> None:
    # A busy minute just after graced starts is not ten minutes of saturation: even with
    # a threshold every host is above (0 %), the first samples are judged normal.
    from graced.detectors.host import Cpu
    from graced.detectors.scoring import Scorer

    cfg = DetectorConfig(name="cpu", kind="cpu", window=600.0, threshold=0.0)
    obs = Cpu(cfg).sample()[0]
    assert obs.value is None and obs.detail["window_s"] == 600.0
    assert 0 <= obs.detail["so_far"] <= 100 and obs.detail["watched_s"] < 600
    verdict = Scorer(cfg).judge(obs, 0.0)
    assert not verdict.anomalous
    assert verdict.summary.startswith("cpu: no value yet: ") and "over 600 s" in verdict.summary
    # Once it has watched its window (here 0.3 s, sampled as it passes), it has a value.
    short = Cpu(DetectorConfig(name="cpu", kind="cpu", window=0.3, threshold=0.0))
    values = [short.sample()[0].value]
    deadline = time.monotonic() + 5
    while values[-1] is None and time.monotonic() < deadline:
        time.sleep(0.02)  # time passing is the state awaited: sampled as a detector would
        values.append(short.sample()[0].value)
    assert values[0] is None and values[-1] is not None and 0 <= values[-1] <= 100


def test_a_copytruncate_rotation_is_read_from_the_start_even_when_the_log_grew_back(
        tmp_path: Path) -> None:
    """The log is copied, truncated in place and written again past graced's offset before
    graced looks (review of #19, newcomer 1): every new line is read, none from mid-line."""
    log = tmp_path / "rot.log"
    log.write_text("")
    det = LogFile(DetectorConfig(name="rot", kind="log", file=str(log), max_ratio=1.0,
                                 window=600.0, min_lines=1))
    try:
        det.sample()
        with open(log, "a") as fh:
            fh.write("".join(f"ERROR old {i}\n" for i in range(100)))
        assert det.sample()[0].detail["lines"] == 100
        (tmp_path / "rot.log.1").write_bytes(log.read_bytes())  # cp, then : > rot.log
        with open(log, "r+") as fh:
            fh.truncate(0)
        with open(log, "a") as fh:  # longer than what was read: the size tells nothing
            fh.write("".join(f"fine new line {i}\n" for i in range(150)))
        obs = det.sample()[0]
        assert (obs.detail["lines"], obs.detail["matches"]) == (250, 100)
        with open(log, "a") as fh:  # and an ordinary append after it is read once
            fh.write("ERROR new\n")
        assert det.sample()[0].detail["lines"] == 251
    finally:
        det.close()


@pytest.mark.skipif(not Path("/proc/pressure/cpu").exists(), reason="no PSI here")
def test_a_psi_alarm_says_how_much_was_stalled() -> None:
    """Review of #19, newcomer 6: the alarm led with the trigger's text and no amount; it
    says the measured stall first, as a timed sample does ("52 % stalled")."""
    det = Pressure(DetectorConfig(name="p", kind="psi_cpu", threshold=1.0, stall_window=2.0))
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
            for _ in range((os.cpu_count() or 1) + 2)]  # more runnable tasks than CPUs
    try:
        if det.wakeup is None:
            pytest.skip(f"the kernel refused the PSI trigger here: {det.mode_note}")
        det.sample()
        assert _ready(det.wakeup.fileno(), 15), "CPU stalled, and no PSI trigger fired"
        assert det.drain()
        [obs] = det.sample()
        assert obs.alarm is not None and obs.value is not None
        assert obs.alarm.startswith(f"{obs.value:.0f} % stalled: some tasks on cpu over the "
                                    "last "), obs.alarm
        assert obs.alarm.endswith("(PSI trigger: 1 % or more of 2 s)"), obs.alarm
    finally:
        for p in busy:
            p.kill()
            p.wait()
        det.close()
