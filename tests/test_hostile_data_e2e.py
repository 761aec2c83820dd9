"""Monitored data is attacker data, end to end against a real graced: a NaN reading, NaN
rows left by 0.1.0, a log line that never ends, escape sequences in a probe's output,
and signal steps aimed at a name."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.conftest import Graced
from tests.helpers.procs import LineCollector, poll_until
from tests.test_missions_e2e import Watch

VIEWS = (("missions", "ls", "--all"), ("missions", "ls", "--all", "--json"), ("detectors",),
         ("detectors", "--json"), ("top", "--once"), ("status",))


def views_work(g: Graced) -> dict[str, str]:
    out = {}
    for args in VIEWS:
        res = g.ctl(*args)
        # status says "degraded" (exit 7) while a detector fails: it still answers.
        assert res.returncode in ((0, 7) if args == ("status",) else (0,)), (args, res.stderr)
        assert "Traceback" not in res.stderr
        out[" ".join(args)] = res.stdout
    return out


def value_detector(name: str, file: Path) -> str:
    return (f'[[detector]]\nname = "{name}"\nkind = "value"\nfile = "{file}"\n'
            f'subject = "queue"\ninterval = 0.2\nthreshold = 50.0\n')


def graced_signalling(make_graced, where: Path,  # type: ignore[no-untyped-def]
                       steps: dict[str, str]) -> tuple[Graced, dict[str, Path]]:
    """graced with, for each name in ``steps``, a value detector of that name (its file in
    ``where``, "0": normal; write 99 for an anomaly) whose low-risk playbook "sig-NAME" is
    one SIGTERM signal step with the keys ``steps[NAME]``: (graced, the value files)."""
    files, config = {}, ""
    for name, how in steps.items():
        files[name] = where / f"{name}.value"
        files[name].write_text("0")
        config += value_detector(name, files[name]) + (
            f'[[playbook]]\nname = "sig-{name}"\ndetector = "{name}"\nrisk = "low"\n'
            f'verify_timeout = 30.0\n[[playbook.step]]\naction = "signal"\n'
            f'signal = "TERM"\n{how}\n')
    g = make_graced(detectors=config + "\n[remediation]\nmax_actions_per_hour = 100\n")
    return g, files


def with_a_mission(make_graced, shortdir: Path) -> tuple[Graced, Watch, Path, int]:
    """graced with a value detector whose mission is open."""
    value = shortdir / "value"
    value.write_text("99")
    g = make_graced(detectors=value_detector("v", value))
    w = Watch(g)
    return g, w, value, w.wait("mission.opened", "v", 15)["payload"]["id"]


@pytest.mark.slow
def test_a_nan_reading_is_a_detector_error_and_views_keep_working(make_graced,
                                                                   shortdir: Path) -> None:
    g, w, value, mid = with_a_mission(make_graced, shortdir)
    errors = LineCollector(g.ctl_popen("tail", "--json", "--since", "1", "detector.error"))
    try:
        for bad in ("nan", "inf", "1e400", "-nan"):
            value.write_text(bad)
            assert errors.wait_for(lambda ls: any(
                "no JSON form" in x or "not a JSON number" in x for x in ls[-1:]), 15), bad
            errors.lines.clear()
        shown = json.loads(g.ctl("missions", "show", str(mid), "--json",
                                 check=True).stdout)
        assert all(isinstance(s["value"], (int, float)) for s in shown["samples"])
        views_work(g)
        detectors = json.loads(g.ctl("detectors", "--json", check=True).stdout)
        assert detectors["v"]["state"] == "error" and "nan" in detectors["v"]["last_error"]
    finally:
        errors.proc.terminate()
        w.close()


@pytest.mark.slow
def test_nan_rows_written_by_0_1_0_are_read_without_failing(make_graced,
                                                             shortdir: Path) -> None:
    g, w, _, mid = with_a_mission(make_graced, shortdir)
    w.close()
    g.stop()
    # What 0.1.0 wrote for a NaN sample: Python's json with the bare word NaN.
    with sqlite3.connect(g.state / "journal.db") as db:
        (data,) = db.execute("SELECT data FROM missions WHERE id = ?", (mid,)).fetchone()
        extra = json.loads(data)
        extra["last_value"] = float("nan")
        for s in extra.get("samples", []):
            s["value"] = float("nan")
        db.execute("UPDATE missions SET data = ? WHERE id = ?", (json.dumps(extra), mid))
    assert "NaN" in json.dumps(extra)
    g.start()
    shown = views_work(g)
    assert "queue" in shown["missions ls --all"]
    m = json.loads(g.ctl("missions", "show", str(mid), "--json", check=True).stdout)
    assert m["id"] == mid
    assert g.ctl("missions", "show", str(mid)).returncode == 0


@pytest.mark.slow
def test_a_log_line_that_never_ends_does_not_grow_graced(make_graced, shortdir: Path) -> None:
    log = shortdir / "app.log"
    log.write_text("")
    g = make_graced(detectors=(
        f'[[detector]]\nname = "applog"\nkind = "log"\nfile = "{log}"\ninterval = 0.2\n'
        'pattern = "ERROR"\nwindow = 60.0\nmax_rate = 1000.0\n'))

    def sample() -> dict | None:
        d = json.loads(g.ctl("detectors", "--json", check=True).stdout)["applog"]
        return d["subjects"].get(str(log))

    # The follower has opened the log (at its end) once it reports a sample.
    poll_until(lambda: sample() is not None, 20, "the log detector's first sample")
    before = psutil.Process(g.proc.pid).memory_info().rss  # type: ignore[union-attr]
    chunk = b"x" * (1 << 20)
    with log.open("ab") as f:
        for _ in range(200):  # 200 MB and never a newline
            f.write(chunk)
        f.write(bytes(range(256)) * 64)  # and binary junk
        f.write(b"\nERROR one\nERROR two\n")  # then real lines
    # Counted once the follower is through the junk, as a user sees it.
    poll_until(lambda: (sample() or {}).get("value", 0) > 0, 120,
               "the lines after the junk were never counted", pause=0.5)
    peak = psutil.Process(g.proc.pid).memory_info().rss  # type: ignore[union-attr]
    assert peak - before < 20 * 2**20, (before, peak)
    views_work(g)


ESC = "\x1b]0;pwned\x07\x1b[31mRED\x1b[0m\u202eevil"


@pytest.mark.slow
def test_escape_sequences_from_a_probe_reach_the_terminal_escaped(make_graced,
                                                                  shortdir: Path) -> None:
    script = shortdir / "probe.sh"
    script.write_text(f"#!/bin/sh\nprintf '%s\\n' '{ESC}' >&2\nexit 3\n")
    script.chmod(0o755)
    g = make_graced(detectors=(
        f'[[detector]]\nname = "probe"\nkind = "command"\nargv = ["{script}"]\n'
        'interval = 0.2\nsubject = "svc"\n'))
    w = Watch(g)
    try:
        w.wait("mission.opened", "probe", 15)
        raw = json.loads(g.ctl("missions", "ls", "--all", "--json", check=True).stdout)
        assert any(ESC in m["summary"] for m in raw)  # --json keeps the exact data
        human = [text for view, text in views_work(g).items() if "--json" not in view]
        for text in human + [
                g.ctl("tail", "--since", "1", "--no-follow", check=True).stdout]:
            assert "\x1b" not in text and "\x07" not in text and "\u202e" not in text
        table = g.ctl("missions", "ls", "--all", check=True).stdout
        assert "\\e]0;pwned\\x07" in table
    finally:
        w.close()


def _spawn_named(path: Path, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([str(path), *args], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.mark.slow
def test_signal_steps_hit_only_what_they_name(make_graced, shortdir: Path) -> None:
    """Exact name by default; decoys whose command line holds the name, foreign or
    world-writable pid files and a pid file holding -1 are left alone."""
    svcd = shortdir / "svcd"
    shutil.copy("/bin/sleep", svcd)
    target = _spawn_named(svcd, "600")
    decoy = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)",
                              "svcd-notes.txt"], stdin=subprocess.DEVNULL)
    open_pid = shortdir / "open.pid"
    open_pid.write_text(str(decoy.pid))
    open_pid.chmod(0o666)
    minus = shortdir / "minus.pid"
    minus.write_text("-1")
    minus.chmod(0o644)
    foreign = shortdir / "foreign.pid"
    foreign.write_text(str(decoy.pid))
    foreign.chmod(0o644)
    if os.geteuid() == 0:
        os.chown(foreign, 65534, 65534)  # nobody's file naming root's process
    steps = {"byname": 'process = "svcd"', "openpid": f'pid_file = "{open_pid}"',
             "minuspid": f'pid_file = "{minus}"', "foreignpid": f'pid_file = "{foreign}"'}
    g, files = graced_signalling(make_graced, shortdir, steps)
    w = Watch(g)
    try:
        for name in steps:
            files[name].write_text("99")
        assert target.wait(30) == -signal.SIGTERM  # the process named exactly svcd
        for name in steps:
            w.wait("mission.executing", name, 30)
        steps_out = {}
        for name in ("openpid", "minuspid", "foreignpid"):
            mid = w.wait("mission.failed", name, 30)["payload"]["id"]
            shown = json.loads(g.ctl("missions", "show", str(mid), "--json", check=True).stdout)
            steps_out[name] = shown["steps"][0]["error"]
        assert decoy.poll() is None, "the decoy was signalled"
        assert "writable by group or others" in steps_out["openpid"], steps_out
        assert "does not hold one decimal pid" in steps_out["minuspid"], steps_out
        if os.geteuid() == 0:
            assert "neither root nor the user" in steps_out["foreignpid"], steps_out
        assert psutil.pid_exists(1)
    finally:
        w.close()
        for p in (target, decoy):
            if p.poll() is None:
                p.kill()
                p.wait(10)
