"""The systemd detector: what systemd 252 prints, parsed; and on a host whose PID 1 is not
systemd, a real graced reports the detector's error instead of inventing missions.

The detector against a real systemd (a failed unit restarted by a playbook, its mission
resolved) is proven under systemd-nspawn: tests/systemd/remediation_scenario.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from graced.config import DetectorConfig
from graced.detectors.scoring import Scorer
from graced.detectors.systemd import (
    KEEP_NORMAL,
    FailedUnits,
    parse_show,
    parse_units,
    unit_name,
)

# Captured from Debian 12's systemd 252 (list-units --failed --all --plain --output=json,
# then show -p Id,Result,NRestarts,ExecMainStatus), with a description carrying escapes.
LISTED = (b'[{"unit":"app-red.service","load":"loaded","active":"failed","sub":"failed",'
          b'"description":"App \\u001b[31mred\\u001b[0m worker"},{"unit":"boom.service",'
          b'"load":"loaded","active":"failed","sub":"failed","description":"boom.service"}]\n')
SHOWN = (b"Result=exit-code\nNRestarts=0\nExecMainStatus=3\nId=app-red.service\n\n"
         b"Result=exit-code\nNRestarts=0\nExecMainStatus=1\nId=boom.service\n")


def test_what_systemd_prints_is_parsed_and_bounded() -> None:
    units = parse_units(LISTED)
    assert list(units) == ["app-red.service", "boom.service"]
    assert units["app-red.service"]["description"] == "App \x1b[31mred\x1b[0m worker"
    assert parse_show(SHOWN)["app-red.service"]["ExecMainStatus"] == "3"
    assert parse_units(b"[]\n") == {} and parse_units(b"") == {}
    huge = json.dumps([{"unit": "x" * 5000 + ".service", "description": "d"},
                       {"unit": "long.service", "description": "d" * 5000}]).encode()
    (name, info), = parse_units(huge).items()  # a name systemd cannot have is dropped
    assert name == "long.service" and len(info["description"]) == 200


def test_what_is_not_a_unit_name_never_becomes_a_subject() -> None:
    # What a hostile systemctl (or unit) could print: none of it reaches a playbook.
    bad = ["*", "--force", "../../etc/passwd", "a b.service", "a/b.service",
           "x.service;id", "x.service\nId=y.service", "x" * 300 + ".service", "noservice",
           ".service"]
    good = ["app-red.service", "getty@tty1.service", "sys-fs-x2dy.mount",
            "a\\x2db.service", "foo@.service", "-.mount"]
    rows = [{"unit": n, "description": "d"} for n in bad + good]
    assert list(parse_units(json.dumps(rows).encode())) == good
    assert [n for n in bad + good if unit_name(n)] == good
    shown = b"".join(f"Id={n}\nResult=exit-code\n\n".encode() for n in bad + good
                     if "\n" not in n)  # show prints one property a line
    assert list(parse_show(shown)) == good
    for bad in (b"not json", b'{"unit": "a"}'):
        with pytest.raises(RuntimeError):
            parse_units(bad)


class Replay(FailedUnits):
    """The detector's own logic fed what systemd printed (its subprocess replaced)."""

    def __init__(self, outputs: list[bytes]) -> None:
        super().__init__(DetectorConfig(name="units", kind="systemd"))
        self.outputs = outputs

    def _systemctl(self, *args: str) -> bytes:
        return self.outputs.pop(0)


def test_a_failed_unit_is_its_own_anomaly_until_it_is_not() -> None:
    cfg = DetectorConfig(name="units", kind="systemd")
    scorer = Scorer(cfg)
    det = Replay([LISTED, SHOWN, b"[]", b"[]"])
    first = {o.subject: scorer.judge(o, 0.0) for o in det.sample()}
    assert all(v.anomalous for v in first.values())
    assert first["boom.service"].summary == (
        "units boom.service: failed (exit-code, exit status 1)")
    assert "App" in first["app-red.service"].summary
    later = {o.subject: scorer.judge(o, 1.0) for o in det.sample()}
    assert set(later) == set(first) and not any(v.anomalous for v in later.values())
    for _ in range(KEEP_NORMAL):
        det.outputs.append(b"[]")
        det.sample()
    assert det.sample() == []  # recovered units are forgotten after a while


@pytest.mark.slow
def test_without_systemd_as_pid_1_the_detector_reports_its_error(make_graced,
                                                                  shortdir: Path) -> None:
    if shutil.which("systemctl") is None:
        pytest.skip("systemctl is not installed")
    probe = subprocess.run(["systemctl", "list-units", "--failed", "--output=json"],
                           capture_output=True, text=True)
    if probe.returncode == 0:
        pytest.skip("systemd runs here; the nspawn scenario covers the real detector")
    g = make_graced(detectors='[[detector]]\nname = "units"\nkind = "systemd"\n'
                    'interval = 0.5\nunits = ["app-*.service"]\n', start=False)
    # A systemctl planted first in graced's PATH is never run: graced calls
    # /usr/bin/systemctl.
    planted, ran = shortdir / "bin", shortdir / "planted-ran"
    planted.mkdir()
    (planted / "systemctl").write_text(
        f"#!/bin/sh\ntouch {ran}\n"
        'echo \'[{"unit":"app-x.service","load":"loaded","active":"failed","sub":"failed",'
        '"description":"planted"}]\'\n')
    (planted / "systemctl").chmod(0o755)
    g.env_extra["PATH"] = f"{planted}:{os.environ.get('PATH', '/usr/bin:/bin')}"
    g.start()
    tail = g.ctl_popen("tail", "--json", "--since", "1", "detector.*")
    try:
        assert tail.stdout is not None
        for line in tail.stdout:
            event = json.loads(line)
            if event["topic"] == "detector.error":
                break
        assert event["payload"]["detector"] == "units"
        assert event["payload"]["error"].startswith("systemctl: ")
        assert event["payload"]["exception"] == "RuntimeError"
        missions = json.loads(g.ctl("missions", "ls", "--all", "--json", check=True).stdout)
        assert missions == []
        state = json.loads(g.ctl("detectors", "--json", check=True).stdout)["units"]
        assert state["kind"] == "systemd" and state["errors"] >= 1
        assert state["mode"] == "poll" and "D-Bus" in state["mode_note"]
        assert not ran.exists()
    finally:
        tail.terminate()
        tail.wait(10)
