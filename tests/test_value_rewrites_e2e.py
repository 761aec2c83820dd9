"""A value file rewritten the way shells and most programs write (truncate, then write) is
normal, against a real graced and a real writer: only a file that stays empty or junk is
reported."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import Graced
from tests.helpers.procs import LineCollector, poll_until
from tests.test_missions_e2e import Watch


def value_detector(name: str, file: Path) -> str:
    # Sampled 4 times a second, with a threshold no count reaches: any mission or
    # anomaly is a read that caught the file between its truncation and its write. A
    # file left empty for most of an interval is reported (as it should be): at 0.05 s
    # a writer descheduled for 40 ms on a loaded machine did that (CI, load 11).
    return (f'[[detector]]\nname = "{name}"\nkind = "value"\nfile = "{file}"\n'
            f'interval = 0.25\nthreshold = 1e15\n')


def _ahead() -> None:
    """The writer runs ahead of the suite's other work where it may (root): a writer
    descheduled with the file just truncated is a file left empty, which is reported."""
    try:
        os.nice(-10)
    except OSError:
        pass


def detector(g: Graced, name: str) -> dict:
    return json.loads(g.ctl("detectors", "--json", check=True).stdout)[name]


@pytest.mark.slow
def test_a_file_rewritten_in_a_tight_loop_is_normal_and_one_left_junk_is_reported(
        make_graced, shortdir: Path) -> None:
    busy, junk = shortdir / "busy", shortdir / "junk"
    busy.write_text("1\n")
    junk.write_text("1\n")
    g = make_graced(detectors=value_detector("busy", busy) + value_detector("junk", junk))
    w = Watch(g)
    anomalies = LineCollector(g.ctl_popen("tail", "--json", "--since", "1", "detector.*"))
    # echo N > f: open(O_TRUNC) then write(2); the file is empty in between.
    writer = subprocess.Popen(["bash", "-c", f'i=0; while :; do i=$((i+1)); echo $i > "{busy}"; '
                               "done"], preexec_fn=_ahead)
    try:
        # The race is real: graced caught the file empty at both reads of some samples.
        poll_until(lambda: detector(g, "busy")["skipped"] >= 10, 60,
                   "samples of the rewritten file skipped")
        busy_now = detector(g, "busy")
        assert busy_now["state"] == "up" and busy_now["errors"] == 0, busy_now
        assert "being rewritten?" in busy_now["last_skipped"], busy_now
        sample = busy_now["subjects"][str(busy)]
        assert sample["value"] >= 1 and not sample["anomalous"], sample
        shown = g.ctl("detectors", check=True).stdout
        assert "skipped (last: not a number (the file is empty)" in shown, shown

        # A file left junk, then one left empty, is reported as before: a mission.
        junk.write_text("N/A\n")
        opened = w.wait("mission.opened", "junk", 15)["payload"]
        assert opened["summary"] == f"junk {junk}: not a number (4 bytes)", opened
        junk.write_text("")
        poll_until(lambda: json.loads(g.ctl(
            "missions", "show", str(opened["id"]), "--json", check=True).stdout)["summary"]
            == f"junk {junk}: not a number (the file is empty)", 15, "the empty file's summary")

        assert w.missions("busy") == [], w.missions("busy")
        topics = [(e["topic"], e["payload"].get("detector")) for e in anomalies.events()]
        assert ("detector.anomaly", "busy") not in topics, topics
        assert ("detector.anomaly", "junk") in topics, topics
    finally:
        writer.kill()
        writer.wait(10)
        anomalies.proc.terminate()
        w.close()
