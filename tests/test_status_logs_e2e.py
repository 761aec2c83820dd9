"""`gracectl status` tells the truth (pause, missions by severity, failing detectors, exit 7
when degraded), and graced's log lines suit where they go: `<N>` priorities for the journal,
timestamps otherwise, never a doubled prefix."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from graced.protocol import ExitCode
from tests.conftest import Graced
from tests.helpers.procs import LineCollector

HOT = ('[[detector]]\nname = "hot"\nkind = "value"\nfile = "{file}"\nthreshold = 50.0\n'
       'interval = 0.2\nseverity = "high"\n')
BROKEN = '[[detector]]\nname = "gone"\nkind = "disk"\npath = "/nonexistent/grace"\n'


def _rows(text: str) -> dict[str, str]:
    return {line.split("  ", 1)[0]: line.split("  ", 1)[1].strip()
            for line in text.splitlines() if "  " in line}


@pytest.mark.slow
def test_status_shows_pause_missions_and_exits_0_when_healthy(make_graced, shortdir: Path
                                                              ) -> None:
    value = shortdir / "v"
    value.write_text("90\n")
    g = make_graced(detectors=HOT.format(file=value))
    tail = LineCollector(g.ctl_popen("tail", "--json", "--since", "1", "mission.opened"))
    assert tail.wait_for(lambda lines: any(x.startswith("{") for x in lines), 30)
    res = g.ctl("status")
    assert res.returncode == ExitCode.OK, res.stderr
    rows = _rows(res.stdout)
    assert rows["health"] == "ok"
    assert rows["execution"].startswith("automatic; 0 of 20 actions this hour")
    assert rows["missions"] == "1 active: 1 high"
    assert rows["detectors"] == "1 running"

    assert g.ctl("pause").returncode == 0
    res = g.ctl("status")
    assert res.returncode == ExitCode.OK  # paused is a choice, not a fault
    assert _rows(res.stdout)["execution"] == "PAUSED: nothing runs by itself (gracectl resume)"
    data = json.loads(g.ctl("status", "--json").stdout)
    assert data["executor"]["paused"] is True and data["degraded"] == []
    assert data["missions"] == {"low": 0, "medium": 0, "high": 1, "critical": 0}
    tail.proc.terminate()


@pytest.mark.slow
def test_status_exits_7_while_a_detector_fails(make_graced) -> None:
    g = make_graced(detectors=BROKEN)
    tail = LineCollector(g.ctl_popen("tail", "--json", "--since", "1", "detector.error"))
    assert tail.wait_for(lambda lines: any(x.startswith("{") for x in lines), 30)
    res = g.ctl("status")
    assert res.returncode == ExitCode.DEGRADED == 7, res.stdout + res.stderr
    rows = _rows(res.stdout)
    # In plain words, not Python's (FileNotFoundError: [Errno 2] ...).
    assert rows["health"] == ("DEGRADED: detector gone failing: cannot read "
                              "/nonexistent/grace: no such file or directory"), rows
    assert rows["detectors"] == ("0 running, 1 failing; FAILING: gone (cannot read "
                                 "/nonexistent/grace: no such file or directory)"), rows
    res = g.ctl("status", "--json")
    assert res.returncode == 7 and json.loads(res.stdout)["failing_detectors"]["gone"][
        "errors"] >= 1
    # A reload that drops the broken detector makes graced healthy again.
    g.config.write_text(g.config.read_text().replace(BROKEN, ""))
    assert g.ctl("reload").returncode == 0
    assert g.ctl("status").returncode == 0
    tail.proc.terminate()


@pytest.mark.slow
def test_status_and_top_agree_on_a_probe_whose_target_fails(make_graced) -> None:
    """Review of #16: top said the probe was failing, status said nothing. Both say so
    now; a target that refuses is a mission, not graced degraded (exit 0)."""
    import socket

    closed = socket.socket()  # bound, never listening: connections are refused
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    try:
        g = make_graced(detectors=f'[[detector]]\nname = "redis"\nkind = "tcp"\n'
                                  f'host = "127.0.0.1"\nport = {port}\ninterval = 0.5\n')
        tail = LineCollector(g.ctl_popen("tail", "--json", "--since", "1",
                                         "integration.changed"))
        assert tail.wait_for(lambda ls: any('"failing"' in x for x in ls), 30), tail.lines
        tail.proc.terminate()
        res = g.ctl("status")
        assert res.returncode == ExitCode.OK, res.stdout + res.stderr
        rows = _rows(res.stdout)
        assert rows["health"] == "ok"
        assert rows["detectors"] == (f"1 running; probe target failing: redis "
                                     f"(127.0.0.1:{port}: Connection refused)"), rows
        data = json.loads(g.ctl("status", "--json").stdout)
        assert data["failing_probes"] == {
            "redis": {"last_error": f"127.0.0.1:{port}: Connection refused"}}
        frame = g.ctl("top", "--once", env={**g.env, "COLUMNS": "120"})
        assert frame.returncode == 0, frame.stderr
        row = next(ln for ln in frame.stdout.splitlines() if ln.startswith(" redis "))
        assert row.split()[:2] == ["redis", "failing"] and row.endswith("ANOMALY"), row
        assert f"detector:redis failing (127.0.0.1:{port}: Connection refused)" in frame.stdout
    finally:
        closed.close()


@pytest.mark.parametrize("journal", [True, False])
def test_log_lines_carry_priorities_for_the_journal_and_timestamps_elsewhere(
        make_graced, monkeypatch: pytest.MonkeyPatch, journal: bool) -> None:
    g: Graced = make_graced(detectors=BROKEN, start=False)
    g.stderr_path.touch()
    if journal:
        st = os.stat(g.stderr_path)
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    else:
        monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    g.start()
    tail = LineCollector(g.ctl_popen("tail", "--json", "--since", "1", "daemon.config_*"))
    g.config.write_text(g.config.read_text() + "bogus = 1\n")
    g.proc.send_signal(signal.SIGHUP)
    assert tail.wait_for(lambda lines: any("config_rejected" in x for x in lines), 30)
    tail.proc.terminate()
    assert g.stop() == 0
    lines = g.stderr().splitlines()
    assert lines and "graced: INFO" not in g.stderr() and ": graced:" not in g.stderr()
    if journal:
        assert all(re.match(r"<[2-7]>", line) for line in lines), lines
        assert any(re.match(r"<6>graced \S+ serving on ", line) for line in lines), lines
        assert any(line.startswith("<4>detectors: detector gone failed: FileNotFoundError")
                   for line in lines), lines
        assert any(line.startswith("<4>reload: config rejected (SIGHUP)") for line in lines)
        assert any(line.startswith("<6>stopped cleanly") for line in lines), lines
    else:
        stamped = [line for line in lines if re.match(
            r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d (debug|info|warning|error|critical) ", line)]
        # All but the banner a person reads when starting graced in a terminal.
        assert len(stamped) == len(lines) - 2, lines
        assert any(" warning detectors: detector gone failed: " in line for line in stamped)
        assert any(" warning reload: config rejected (SIGHUP)" in line for line in stamped)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["log", "value"])
def test_a_missing_file_is_a_detector_failure_like_a_missing_disk_path(
        make_graced, shortdir, kind: str) -> None:
    """One rule for a watched path that does not exist (graced.toml(5)): the detector
    fails (status FAILING, exit 7), no mission opens; once the file exists it is watched."""
    path = shortdir / "watched"
    rule = ('pattern = "ERROR"\nmax_rate = 1\nwindow = 2.0\n' if kind == "log"
            else "threshold = 10\n")
    g = make_graced(detectors=f'[[detector]]\nname = "watched"\nkind = "{kind}"\n'
                              f'interval = 0.2\nfile = "{path}"\n{rule}')
    errors = LineCollector(g.ctl_popen("tail", "--json", "--since", "1", "detector.error",
                                       "mission.opened"))
    assert errors.wait_for(lambda lines: any(x.startswith("{") for x in lines), 30), (
        errors.lines)
    res = g.ctl("status")
    assert res.returncode == 7, res.stdout + res.stderr
    assert _rows(res.stdout)["detectors"] == (f"0 running, 1 failing; FAILING: watched "
                                              f"(cannot read {path}: no such file or "
                                              "directory)"), res.stdout
    assert {e["topic"] for e in errors.events()} == {"detector.error"}  # no mission
    path.write_text("")
    deadline = time.monotonic() + 60  # the detector retries with a growing backoff
    with path.open("a") as fh:  # now it exists: a symptom in it opens a mission
        while not errors.wait_for(lambda _: any(
                e["topic"] == "mission.opened" for e in errors.events()), 0.5):
            if kind == "log":
                fh.write("ERROR x\n" * 20)
                fh.flush()
            else:
                path.write_text("99\n")
            assert errors.proc.poll() is None and time.monotonic() < deadline
    errors.proc.terminate()


@pytest.mark.slow
def test_status_quiet_answers_with_its_exit_status_alone(make_graced, shortdir) -> None:
    """`gracectl status -q` (like `systemctl is-active -q`): no output at all, not even the
    first-use key note or an error; 0 ok, 7 degraded, 3 unreachable."""
    g = make_graced()
    for flag in ("-q", "--quiet"):
        res = g.ctl("status", flag)  # the first call also pins the key: silently
        assert (res.returncode, res.stdout, res.stderr) == (0, "", ""), res
    (shortdir / "b").mkdir()
    broken = Graced(shortdir / "b", detectors=BROKEN)
    try:
        broken.start()
        tail = LineCollector(broken.ctl_popen("tail", "--json", "--since", "1",
                                              "detector.error"))
        assert tail.wait_for(lambda lines: any(x.startswith("{") for x in lines), 30)
        tail.proc.terminate()
        res = broken.ctl("status", "-q")
        assert (res.returncode, res.stdout, res.stderr) == (7, "", ""), res
    finally:
        broken.close()
    res = g.ctl("--socket", str(shortdir / "nobody.sock"), "status", "-q")
    assert (res.returncode, res.stdout, res.stderr) == (3, "", ""), res
