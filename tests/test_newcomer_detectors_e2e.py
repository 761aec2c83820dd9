"""Two newcomer findings against a real graced: a per-process metric (process_rss) whose
process is gone has nothing to measure (the kill that fixed it is a success, no mission
asks to kill what is not there), and a deleted log file makes its detector FAILING."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from datetime import datetime
from typing import Any

import pytest

from graced.detectors.logs import GONE_GRACE
from tests.conftest import ROOT, Graced
from tests.helpers.procs import LineCollector, poll_until
from tests.test_missions_e2e import MISSIONS, Watch

HOG = "memhog"


def grow(megabytes: int) -> subprocess.Popen[str]:
    """A real runaway named memhog: it grows to ``megabytes`` MB."""
    proc = subprocess.Popen([sys.executable, "-m", "tests.helpers.faults", "grow", HOG,
                             str(megabytes)], cwd=ROOT, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def subject(g: Graced, detector: str) -> dict[str, Any]:
    dets = json.loads(g.ctl("detectors", "--json", check=True).stdout)
    return dict(dets[detector]["subjects"].get(HOG) or {})


def sampled_after(g: Graced, detector: str, since: float, what: str) -> dict[str, Any]:
    """The detector's first published sample taken after ``since`` (wall clock)."""
    def taken() -> float:
        ts = subject(g, detector).get("ts")
        return datetime.fromisoformat(ts).timestamp() if ts else 0.0

    poll_until(lambda: taken() > since, 15, what)
    return subject(g, detector)


@pytest.mark.slow
def test_a_killed_runaway_resolves_its_rss_mission_and_counts_as_a_success(
        make_graced) -> None:
    g = make_graced(detectors=(
        f'[[detector]]\nname = "hog-rss"\nkind = "process_rss"\nprocess = "{HOG}"\n'
        'interval = 0.2\nthreshold = 60.0\nseverity = "critical"\n\n'
        '[[playbook]]\nname = "kill-hog"\ndetector = "hog-rss"\nrisk = "high"\n'
        'verify_timeout = 15.0\n'
        f'[[playbook.step]]\naction = "signal"\nsignal = "KILL"\nprocess = "{HOG}"\n')
        + MISSIONS.format(flap=0) + "[remediation]\napproval_timeout = 600\n")
    w = Watch(g)
    hogs: list[subprocess.Popen[str]] = []
    try:
        # No memhog at start: nothing to measure, so no mission.
        idle = sampled_after(g, "hog-rss", 0, "hog-rss never sampled")
        assert idle["value"] is None and not idle["anomalous"] and not idle["failed"]
        assert idle["summary"] == f"hog-rss {HOG}: no value: no process named '{HOG}' running"
        assert w.missions("hog-rss") == []

        hogs.append(grow(120))
        waiting = w.wait("mission.awaiting_approval", "hog-rss", 30)["payload"]
        assert waiting["playbook"] == "kill-hog"
        res = g.ctl("missions", "approve", str(waiting["id"]), "--yes")
        assert res.returncode == 0, res.stderr
        resolved = w.wait("mission.resolved", "hog-rss", 30)["payload"]
        assert hogs[0].wait(10) == -signal.SIGKILL  # the playbook's kill
        assert resolved["id"] == waiting["id"] and resolved["last_value"] is None
        m = json.loads(g.ctl("missions", "show", str(waiting["id"]), "--json",
                             check=True).stdout)
        assert m["verification"]["result"] == "passed", m["verification"]
        explained = g.ctl("missions", "explain", str(waiting["id"]), check=True).stdout
        assert "learning  counted as a success of kill-hog for hog-rss:memhog" in explained
        assert "None" not in explained
        shown = g.ctl("missions", "show", str(waiting["id"]), check=True).stdout
        # The last sample had no value (memhog gone): said in words, not Python's None.
        assert "the last sample had no value" in shown and "None" not in shown, shown

        # Samples go on with memhog gone: still nothing to measure, no new mission.
        later = sampled_after(g, "hog-rss", time.time() + 1.0, "hog-rss stopped sampling")
        assert later["value"] is None and not later["anomalous"]
        assert [x["id"] for x in w.missions("hog-rss")] == [waiting["id"]]

        # Killed by hand while waiting for approval: the mission resolves by itself.
        hogs.append(grow(120))
        again = w.wait("mission.awaiting_approval", "hog-rss", 30, count=2)["payload"]
        hogs[1].kill()
        hogs[1].wait(10)
        cleared = w.wait("mission.resolved", "hog-rss", 30, count=2)["payload"]
        assert cleared["id"] == again["id"] and "playbook kill-hog was not run" in \
            cleared["reason"]
        later = sampled_after(g, "hog-rss", time.time() + 1.0, "hog-rss stopped sampling")
        assert not later["anomalous"]
        assert len(w.missions("hog-rss")) == 2
        listed = g.ctl("missions", "ls", "--all", check=True).stdout
        assert "None" not in listed and "no process named" not in listed
    finally:
        for hog in hogs:
            if hog.poll() is None:
                hog.kill()
                hog.wait(10)
        w.close()


def health(g: Graced) -> dict[str, Any]:
    return dict(json.loads(g.ctl("detectors", "--json", check=True).stdout))


def last_sample(det: dict[str, Any]) -> float:
    """When the detector's newest published sample was taken (0: none yet)."""
    stamps = [datetime.fromisoformat(s["ts"]).timestamp() for s in det["subjects"].values()]
    return max(stamps, default=0.0)


@pytest.mark.slow
def test_a_deleted_log_makes_its_detector_failing_until_it_is_back_and_rotation_does_not(
        make_graced, shortdir) -> None:
    rotated, deleted = shortdir / "rotated.log", shortdir / "app.log"
    for f in (rotated, deleted):
        f.write_text("start\n")
    rule = 'interval = 0.5\npattern = "ERROR"\nmax_rate = 100\nwindow = 5.0\n'
    g = make_graced(detectors="".join(
        f'[[detector]]\nname = "{name}"\nkind = "log"\nfile = "{f}"\n{rule}'
        for name, f in (("rotated", rotated), ("deleted", deleted))))
    errors = LineCollector(g.ctl_popen("tail", "--json", "--since", "1", "detector.error",
                                       "mission.opened"))
    try:
        poll_until(lambda: all(d["state"] == "up" and d["subjects"]
                               for d in health(g).values()), 15, "detectors never sampled")
        # A rotation: renamed, seen missing by a sample, then a new file at the path.
        rotated.rename(shortdir / "rotated.log.1")
        gone_at = time.time()
        poll_until(lambda: last_sample(health(g)["rotated"]) > gone_at, 15,
                   "rotated: no sample while the file was away")
        rotated.write_text("ERROR in the new file\n")
        poll_until(lambda: any(s["value"] for s in health(g)["rotated"]["subjects"].values()),
                   15, "rotated: the new file's line never counted")
        deleted.unlink()
        rm_at = time.time()
        assert errors.wait_for(lambda _: any(
            e["payload"]["detector"] == "deleted" for e in errors.events()), 30), errors.lines
        failed_at = time.time()
        dets = health(g)
        assert dets["deleted"]["state"] == "error"
        assert str(deleted) in dets["deleted"]["last_error"]
        assert "no such file or directory" in dets["deleted"]["last_error"]
        assert failed_at - rm_at >= GONE_GRACE  # a rotation's grace first
        shown = g.ctl("detectors").stdout
        assert f"FAILING: cannot read {deleted}" in shown, shown
        res = g.ctl("status", "-q")
        assert (res.returncode, res.stdout, res.stderr) == (7, "", ""), res
        # The rotated log, past the same grace, is followed and healthy.
        poll_until(lambda: last_sample(health(g)["rotated"]) > gone_at + GONE_GRACE, 15,
                   "rotated: no sample past the grace")
        follow = health(g)["rotated"]
        assert follow["state"] == "up" and follow["errors"] == 0, follow
        assert {(e["topic"], e["payload"]["detector"]) for e in errors.events()} == {
            ("detector.error", "deleted")}  # and no mission opened
        # The file is back: the detector recovers, the host is healthy again.
        deleted.write_text("back\n")
        poll_until(lambda: health(g)["deleted"]["state"] == "up", 30,
                   "deleted: never recovered")
        res = g.ctl("status", "-q")
        assert res.returncode == 0, res
    finally:
        errors.proc.terminate()
        errors.proc.wait(10)
