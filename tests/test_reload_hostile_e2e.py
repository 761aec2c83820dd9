"""What sits at the config path is not trusted by a reload, against a real graced: an
empty file (an editor saving in place) is refused, not applied; a FIFO neither hangs
`gracectl reload` nor SIGTERM; the reported SHA-256 is the file's bytes, CRLF and all."""

from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path

import pytest

from tests.conftest import Graced
from tests.helpers.procs import LineCollector
from tests.test_playbooks_e2e import show
from tests.test_reload_e2e import VALUE, _detectors, _topic

HELD = ('[[playbook]]\nname = "held"\ndetector = "hot"\nrisk = "high"\n'
        '[[playbook.step]]\naction = "run"\nargv = ["/bin/true"]\n')


@pytest.mark.slow
def test_an_empty_file_is_refused_and_the_running_config_stays(make_graced,
                                                               shortdir: Path) -> None:
    high = shortdir / "high"
    high.write_text("90\n")
    g: Graced = make_graced(start=False)
    # Paths left to graced (as `graced config default` writes them), so an empty file
    # changes no restart-only key: only the emptiness can refuse it.
    g.config.write_text("version = 1\n[daemon]\nheartbeat_interval = 0.5\n"
                        + VALUE.format(name="hot", file=high) + HELD)
    g.socket = g.home / "run" / "graced" / "graced.sock"
    g.start()
    tail = LineCollector(g.ctl_popen("tail", "--json", "--since", "1", "daemon.config_*",
                                     "mission.*"))
    try:
        waiting = _topic(tail, "mission.awaiting_approval")["payload"]
        good = g.config.read_bytes()
        g.config.write_bytes(b"")  # the editor truncated; its write has not come yet
        res = g.ctl("reload")
        assert res.returncode == 1, res.stderr
        assert f"{g.config}: is empty (a save in progress?)" in res.stderr
        assert res.stderr.count("\n") == 1, res.stderr
        assert show(g, waiting["id"])["state"] == "awaiting_approval"
        assert _detectors(g) == ["hot"]
        playbooks = json.loads(g.ctl("playbooks", "ls", "--json", check=True).stdout)
        assert [p["name"] for p in playbooks["playbooks"]] == ["held"]

        # The same config saved with CRLF line ends: applied, hashed as sha256sum does.
        crlf = good.replace(b"\n", b"\r\n")
        g.config.write_bytes(crlf)
        assert g.ctl("reload").returncode == 0
        done = _topic(tail, "daemon.config_reloaded")["payload"]
        assert done["sha256"] == hashlib.sha256(crlf).hexdigest()
        assert show(g, waiting["id"])["state"] == "awaiting_approval"
    finally:
        tail.proc.terminate()
        tail.proc.wait(10)


@pytest.mark.slow
def test_a_fifo_at_the_config_path_neither_hangs_reload_nor_sigterm(graced: Graced) -> None:
    graced.ctl("status", check=True)
    graced.config.unlink()
    os.mkfifo(graced.config, 0o644)
    res = graced.ctl("reload", timeout=20)
    assert res.returncode == 1, res.stderr
    assert f"{graced.config}: not a regular file" in res.stderr
    assert graced.ctl("status").returncode == 0
    assert graced.stop(signal.SIGTERM, timeout=10) == 0


@pytest.mark.slow
def test_a_reload_that_slows_the_heartbeat_is_not_a_stale_stream(graced: Graced,
                                                                  shortdir: Path) -> None:
    """tail --verify and verify take the stale limit from the signed stream's announced
    interval (heartbeats and daemon.config_reloaded), not a fixed one: a legitimate
    reload from 0.5 s to 3 s heartbeats is no tamper-class exit 13."""
    graced.ctl("keys", "trust", check=True)
    tail = LineCollector(graced.ctl_popen("tail", "--verify", "--json", "--since", "1"))
    try:
        assert tail.wait_for(lambda _: any(e["topic"] == "daemon.heartbeat"
                                           for e in tail.events()), 20), tail.lines
        graced.config.write_text(graced.config.read_text().replace(
            "heartbeat_interval = 0.5", "heartbeat_interval = 3.0"))
        res = graced.ctl("reload", "--json")
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout)["heartbeat_interval"] == 3.0

        def slow_beats() -> int:
            return sum(1 for e in tail.events() if e["topic"] == "daemon.heartbeat"
                       and e["payload"]["interval"] == 3.0)

        assert tail.wait_for(lambda _: slow_beats() >= 2 or tail.proc.poll() is not None,
                             30), tail.lines
        assert tail.proc.poll() is None, tail.proc.stderr.read()  # type: ignore[union-attr]
        assert graced.stop() == 0
        assert tail.wait_for(lambda _: any(e["topic"] == "daemon.stopping"
                                           for e in tail.events()), 20)
    finally:
        tail.proc.terminate()
        tail.proc.wait(10)
    saved = shortdir / "stream.jsonl"
    saved.write_text("".join(line + "\n" for line in tail.lines if line.startswith("{")))
    res = graced.ctl("verify", "--key", str(graced.state / "key.pub"), str(saved))
    assert res.returncode == 0, res.stderr


@pytest.mark.slow
def test_a_detector_whose_subject_changed_closes_the_old_subjects_mission(
        make_graced, shortdir: Path) -> None:
    """A value detector moved from file o1 (anomalous) to o2: nothing samples o1 any
    more, so its mission closes with that reason instead of staying open for ever."""
    o1, o2 = shortdir / "o1", shortdir / "o2"
    o1.write_text("90\n")
    o2.write_text("10\n")
    g: Graced = make_graced(detectors=VALUE.format(name="v", file=o1))
    tail = LineCollector(g.ctl_popen("tail", "--json", "--since", "1", "daemon.config_*",
                                     "mission.*"))
    try:
        opened = _topic(tail, "mission.opened")["payload"]
        assert opened["subject"] == str(o1)
        g.config.write_text(g.config.read_text().replace(str(o1), str(o2)))
        res = g.ctl("reload", "--json")
        assert res.returncode == 0, res.stderr
        result = json.loads(res.stdout)
        assert result["detectors"]["changed"] == ["v"]
        assert result["closed_missions"] == [opened["id"]]
        expired = _topic(tail, "mission.expired")["payload"]
        assert expired["id"] == opened["id"]
        assert expired["reason"] == (f"detector v no longer reports subject {o1} "
                                     "(its config changed)")
        assert g.ctl("missions", "ls", "--json", check=True).stdout.strip() == "[]"
    finally:
        tail.proc.terminate()
        tail.proc.wait(10)
