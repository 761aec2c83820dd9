"""A log detector against what a user who owns the log can do to it (attacker review of #19):
a FIFO swapped in for the log must not blind the detector for good, and a burst far larger
than one sample reads must not delay the mission by minutes."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from graced.detectors.logs import READ_MAX
from tests.helpers.procs import poll_until
from tests.test_event_sources_e2e import _after, _started


@pytest.mark.slow
def test_a_fifo_swapped_in_for_the_log_is_a_failure_and_the_log_is_followed_again(
        make_graced, shortdir: Path) -> None:
    log = shortdir / "app.log"
    log.write_text("starting\n")
    g, w = _started(make_graced, f'[[detector]]\nname = "applog"\nkind = "log"\n'
                                 f'interval = 1.0\nfile = "{log}"\npattern = "ERROR"\n'
                                 "max_rate = 0.5\nwindow = 10.0\n")
    fifo = shortdir / "f"
    os.mkfifo(fifo)
    fifo.rename(log)  # no writer will ever open it: open() on it would block for good
    def detector() -> dict[str, Any]:
        return dict(json.loads(g.ctl("detectors", "--json", check=True).stdout)["applog"])

    poll_until(lambda: "not a regular file" in (detector().get("last_error") or ""), 15,
               "the FIFO was not reported")
    log.unlink()
    log.write_text("back\n")  # a regular log again
    # Its restart backoff: 1, 2, 4 ... s; it must be sampling again before errors are written.
    poll_until(lambda: detector()["state"] == "up", 40, "the detector never came back")
    t0 = time.time()
    with log.open("a") as fh:
        fh.writelines(f"ERROR boom {i}\n" for i in range(50))
    opened = w.wait("mission.opened", "applog", 10)
    assert _after(opened, t0) < 5.0
    w.close()


@pytest.mark.slow
def test_a_burst_bigger_than_one_read_is_caught_up_at_once(make_graced, shortdir: Path) -> None:
    log = shortdir / "big.log"
    log.write_text("starting\n")
    g, w = _started(make_graced, f'[[detector]]\nname = "biglog"\nkind = "log"\n'
                                 f'interval = 30.0\nfile = "{log}"\npattern = "ERROR"\n'
                                 "max_rate = 0.5\nwindow = 60.0\n")
    t0 = time.time()
    with log.open("a") as fh:  # 16 reads' worth of healthy lines, then the errors
        line = "INFO " + "x" * 1018 + "\n"
        fh.write(line * (16 * READ_MAX // len(line)))
        fh.writelines(f"ERROR short {i}\n" for i in range(60))
    opened = w.wait("mission.opened", "biglog", 20)
    # One read a 30 s interval would take 8 minutes to reach the errors.
    assert _after(opened, t0) < 10.0
    w.close()
