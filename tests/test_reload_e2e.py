"""Reload on a live graced: SIGHUP and `gracectl reload` apply a changed config without
dropping a client, close the missions of a removed detector, and refuse a broken file
while the old config keeps running. SIGHUP never stops graced."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Graced
from tests.helpers.procs import LineCollector

VALUE = ('[[detector]]\nname = "{name}"\nkind = "value"\nfile = "{file}"\nthreshold = 50.0\n'
         "interval = 0.2\n")
MISSIONS = "\n[missions]\nresolve_after = 2\n"


def _topic(tail: LineCollector, topic: str, count: int = 1, timeout: float = 30
           ) -> dict[str, Any]:
    def found() -> list[dict[str, Any]]:
        return [e for e in tail.events() if e["topic"] == topic]

    assert tail.wait_for(lambda _: len(found()) >= count, timeout), (
        f"no {topic} within {timeout} s: {tail.lines[-5:]}")
    return found()[count - 1]


def _config(g: Graced, detectors: str) -> bytes:
    """Rewrite the config with these detectors (the rest as the fixture wrote it)."""
    head = g.config.read_text().split("[[detector]]", 1)[0].replace("detector = []\n", "")
    g.config.write_text(head + detectors)
    return g.config.read_bytes()


def _detectors(g: Graced) -> list[str]:
    return sorted(json.loads(g.ctl("detectors", "--json", check=True).stdout))


@pytest.mark.slow
def test_sighup_applies_detectors_and_rejects_a_broken_file(make_graced, shortdir: Path
                                                            ) -> None:
    high, low = shortdir / "high", shortdir / "low"
    high.write_text("90\n")
    low.write_text("10\n")
    g = make_graced(extra_config=MISSIONS,
                    detectors=VALUE.format(name="hot", file=high))
    tail = LineCollector(g.ctl_popen("tail", "--json", "--since", "1", "daemon.config_*",
                                     "mission.*"))
    opened = _topic(tail, "mission.opened")
    assert opened["payload"]["detector"] == "hot"
    pid = g.proc.pid

    text = _config(g, VALUE.format(name="cool", file=low))
    g.proc.send_signal(signal.SIGHUP)
    done = _topic(tail, "daemon.config_reloaded")["payload"]
    assert done["sha256"] == hashlib.sha256(text).hexdigest()
    assert done["detectors"] == {"added": ["cool"], "changed": [], "removed": ["hot"]}
    assert done["closed_missions"] == [opened["payload"]["id"]] and done["by"] == "SIGHUP"
    expired = _topic(tail, "mission.expired")["payload"]
    assert expired["id"] == opened["payload"]["id"]
    assert expired["reason"] == "detector hot was removed from the config"
    assert _detectors(g) == ["cool"]

    # A broken file: rejected with the reason; the running config stays.
    g.config.write_text(g.config.read_text() + 'url = "http://x/"\n')
    g.proc.send_signal(signal.SIGHUP)
    rejected = _topic(tail, "daemon.config_rejected")["payload"]
    assert rejected["reason"].startswith(f"{g.config}:")
    assert 'url: not a key of kind "value"' in rejected["reason"]
    assert rejected["running_sha256"] == done["sha256"]
    assert _detectors(g) == ["cool"]

    # A storm of SIGHUPs (the kernel may merge some), then the file mended and one more:
    # graced keeps serving, and the tail connected before every reload still is.
    for _ in range(20):
        g.proc.send_signal(signal.SIGHUP)
    g.config.write_bytes(text)
    g.proc.send_signal(signal.SIGHUP)
    again = _topic(tail, "daemon.config_reloaded", count=2)["payload"]
    assert again["sha256"] == done["sha256"] and again["detectors"] == {
        "added": [], "changed": [], "removed": []}
    assert g.proc.poll() is None and g.proc.pid == pid
    assert g.ctl("status").returncode == 0
    assert tail.proc.poll() is None
    assert "config rejected (SIGHUP), keeping the running one" in g.stderr()


def test_gracectl_reload_says_what_changed_or_why_not(graced: Graced, shortdir: Path) -> None:
    value = shortdir / "v"
    value.write_text("1\n")
    _config(graced, VALUE.format(name="v", file=value))
    graced.ctl("status", check=True)  # the key pinned first: reload's stderr is its own
    res = graced.ctl("reload")
    assert res.returncode == 0, res.stderr
    assert res.stderr.startswith(f"gracectl: reloaded {graced.config} (sha256 ")
    assert res.stderr.rstrip().endswith(": detectors added v")
    assert _detectors(graced) == ["v"]

    good = graced.config.read_text()
    graced.config.write_text(good.replace("threshold = 50.0", "threshold = 50.0\nport = 1"))
    res = graced.ctl("reload")
    assert res.returncode == 1
    assert res.stderr.count("\n") == 1, res.stderr
    assert "config rejected, the running one kept: " in res.stderr
    assert f'{graced.config}:' in res.stderr and 'port: not a key of kind "value"' in res.stderr

    # What only a restart can apply is refused too, naming the key.
    graced.config.write_text(good.replace("heartbeat_interval", 'listen = ["127.0.0.1:0"]\n'
                                          "heartbeat_interval"))
    res = graced.ctl("reload")
    assert res.returncode == 1
    assert "[daemon] listen changed: only a restart of graced applies that" in res.stderr
    assert _detectors(graced) == ["v"]
    graced.config.unlink()  # gone: refused too, graced runs on
    res = graced.ctl("reload")
    assert res.returncode == 1 and f"{graced.config}: cannot read: No such file" in res.stderr
    assert graced.ctl("status").returncode == 0


def _found_config(make_graced: Any, shortdir: Path, found_at: Path, detectors: str,
                  env: dict[str, str] | None = None) -> Graced:
    """A graced started with no --config that finds its file at ``found_at``."""
    g = make_graced(extra_config=MISSIONS, detectors=detectors, start=False)
    found_at.parent.mkdir(parents=True, exist_ok=True)
    g.config.rename(found_at)
    g.config, g.pass_config = found_at, False
    g.env_extra.update(env or {})
    g.start()
    return g


def test_reload_of_a_config_moved_away_is_refused_not_replaced(make_graced, shortdir: Path
                                                               ) -> None:
    """No --config: the file found at start is the file every reload reads. Moved away, a
    reload is refused (old config kept, non-zero, a warning) — never the embedded default,
    which would drop every detector and playbook."""
    high = shortdir / "high"
    high.write_text("90\n")
    g = _found_config(make_graced, shortdir, shortdir / "home/.config/graced/graced.toml",
                      VALUE.format(name="hot", file=high))
    tail = LineCollector(g.ctl_popen("tail", "--json", "--since", "1", "daemon.config_*",
                                     "mission.*"))
    opened = _topic(tail, "mission.opened")["payload"]
    g.config.rename(shortdir / "moved.toml")
    res = g.ctl("reload")
    assert res.returncode == 1, res.stderr
    assert f"{g.config}: cannot read: No such file" in res.stderr
    g.proc.send_signal(signal.SIGHUP)
    rejected = _topic(tail, "daemon.config_rejected", count=2)["payload"]
    assert rejected["by"] == "SIGHUP" and str(g.config) in rejected["reason"]
    assert _detectors(g) == ["hot"]
    assert not [e for e in tail.events() if e["topic"] in (
        "daemon.config_reloaded", "mission.expired")]
    shown = json.loads(g.ctl("missions", "show", str(opened["id"]), "--json",
                             check=True).stdout)
    assert shown["state"] == "open"
    assert " warning reload: config rejected (SIGHUP), keeping the running one: " in (
        g.stderr()) and "<embedded default>" not in g.stderr()


@pytest.mark.slow
def test_a_config_file_written_after_an_embedded_start_says_a_restart_is_needed(
        make_graced, shortdir: Path) -> None:
    """Started with no config file (the embedded default), then the user writes
    ~/.config/graced/graced.toml: a reload does not read it (never another file) and says
    so, naming the path and that graced must be restarted; exit 0 (the reload itself
    worked), as systemctl warns of a changed unit file on stderr and exits 0."""
    g = make_graced(start=False)
    g.config.rename(shortdir / "not-used.toml")
    g.pass_config = False
    g.socket = g.home / "run" / "graced" / "graced.sock"  # the embedded default's
    g.start()
    g.ctl("status")  # pins its key on first use (a line of its own)
    res = g.ctl("reload")
    assert (res.returncode, res.stdout) == (0, ""), res.stderr
    assert res.stderr == "gracectl: reloaded <embedded default> (sha256 -): nothing changed\n"

    written = g.home / ".config" / "graced" / "graced.toml"
    written.parent.mkdir(parents=True)
    written.write_text("version = 1\n")
    res = g.ctl("reload")
    assert (res.returncode, res.stdout) == (0, ""), res.stderr
    assert res.stderr.splitlines() == [
        "gracectl: reloaded <embedded default> (sha256 -): nothing changed",
        f"gracectl: warning: a config file now exists at {written}, but graced started "
        "without one and runs the embedded default: restart graced to use it (a reload "
        "reads only the file found at start)"], res.stderr
    answer = json.loads(g.ctl("reload", "--json", check=True).stdout)
    assert answer["restart_for"] == str(written) and answer["source"] == "<embedded default>"
    assert f"a config file now exists at {written}" in g.stderr()


def test_reload_under_systemd_keeps_its_configuration_directory(make_graced, shortdir: Path
                                                                ) -> None:
    """With CONFIGURATION_DIRECTORY (as systemd sets it), the file there is the config;
    once it is gone a reload is refused, and the user's ~/.config file is never read."""
    high = shortdir / "high"
    high.write_text("90\n")
    etc = shortdir / "etc-graced"
    g = _found_config(make_graced, shortdir, etc / "graced.toml",
                      VALUE.format(name="hot", file=high),
                      env={"CONFIGURATION_DIRECTORY": str(etc)})
    user = shortdir / "home/.config/graced/graced.toml"
    user.parent.mkdir(parents=True)
    user.write_text(g.config.read_text().replace('name = "hot"', 'name = "user"'))
    g.config.unlink()
    res = g.ctl("reload")
    assert res.returncode == 1 and f"{g.config}: cannot read" in res.stderr, res.stderr
    assert _detectors(g) == ["hot"]


def test_a_detector_removed_then_added_back_reopens_its_mission(make_graced, shortdir: Path
                                                                ) -> None:
    """Removing a detector expires its missions; adding it back while the symptom is still
    there opens a new one (the removal handed nothing to a person)."""
    high = shortdir / "high"
    high.write_text("90\n")
    g = make_graced(extra_config=MISSIONS, detectors=VALUE.format(name="hot", file=high))
    tail = LineCollector(g.ctl_popen("tail", "--json", "--since", "1", "daemon.config_*",
                                     "mission.*"))
    first = _topic(tail, "mission.opened")["payload"]
    hot = g.config.read_text().split("[[detector]]", 1)[1]
    low = shortdir / "low"
    low.write_text("10\n")
    _config(g, VALUE.format(name="cool", file=low))
    assert g.ctl("reload").returncode == 0
    assert _topic(tail, "mission.expired")["payload"]["id"] == first["id"]
    _config(g, VALUE.format(name="cool", file=low) + "[[detector]]" + hot)
    assert g.ctl("reload").returncode == 0
    again = _topic(tail, "mission.opened", count=2)["payload"]
    assert again["detector"] == "hot" and again["id"] != first["id"]


@pytest.mark.slow
def test_reload_names_every_section_that_changed(make_graced, shortdir: Path) -> None:
    """Not only detectors: playbooks (and the missions whose plan changed), notifiers and
    each table's keys ([remediation] mode, approvers ...), in the line and in --json."""
    high = shortdir / "high"
    high.write_text("90\n")
    playbook = ('[[playbook]]\nname = "cool"\ndetector = "hot"\nrisk = "high"\n'
                '[[playbook.step]]\naction = "run"\nargv = ["echo", "first"]\n')
    g = make_graced(extra_config=MISSIONS, detectors=VALUE.format(name="hot", file=high)
                    + playbook)
    g.ctl("status", check=True)  # the key pinned first: reload's stderr is its own
    tail = LineCollector(g.ctl_popen("tail", "--json", "--since", "1", "mission.*"))
    waiting = _topic(tail, "mission.awaiting_approval")["payload"]["id"]
    res = g.ctl("reload")
    assert res.returncode == 0 and res.stderr.rstrip().endswith(": nothing changed"), res
    g.config.write_text(g.config.read_text().replace('"first"', '"second"')
                        + '\n[remediation]\nmode = "observe"\napprovers = ["root"]\n'
                        '\n[[notifier]]\nname = "pager"\nkind = "command"\n'
                        'argv = ["true"]\n')
    res = g.ctl("reload", "--json")
    assert res.returncode == 0, res.stderr
    done = json.loads(res.stdout)
    assert done["detectors"] == {"added": [], "changed": [], "removed": []}
    assert done["playbooks"] == {"added": [], "changed": ["cool"], "removed": []}
    assert done["notifiers"] == {"added": ["pager"], "changed": [], "removed": []}
    assert done["sections"] == {"remediation": ["mode", "approvers"]}
    assert done["changed_keys"] == {"detectors": {}, "playbooks": {"cool": ["step"]},
                                    "notifiers": {}}
    assert done["replanned_missions"] == [waiting]
    assert "playbooks changed cool (step)" in done["summary"], done["summary"]
    g.config.write_text(g.config.read_text().replace('mode = "observe"', 'mode = "act"'))
    res = g.ctl("reload")
    assert res.returncode == 0
    assert res.stderr.rstrip().endswith(": [remediation] mode"), res.stderr
    # A changed detector or notifier names its keys as a table does, never their values
    # (a notifier's argv or URL may hold a secret).
    g.config.write_text(g.config.read_text().replace("threshold = 50.0", "threshold = 75.0")
                        .replace('argv = ["true"]', 'argv = ["true", "s3cret-token"]'))
    res = g.ctl("reload")
    assert res.returncode == 0, res.stderr
    assert res.stderr.rstrip().endswith(": detectors changed hot (threshold); notifiers "
                                        "changed pager (argv)"), res.stderr
    assert "s3cret" not in res.stderr and "75" not in res.stderr.split("): ")[-1]


@pytest.mark.slow
def test_reload_gives_up_after_its_timeout_with_exit_6(graced: Graced) -> None:
    """gracectl.1: `reload --timeout` gives up after that long without an answer: exit
    6, one line. A stopped graced (SIGSTOP) accepts the connection and never answers."""
    graced.ctl("status", check=True)  # the key pinned first
    assert graced.proc is not None
    os.kill(graced.proc.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        res = graced.ctl("reload", "--timeout", "1")
        took = time.monotonic() - started
    finally:
        os.kill(graced.proc.pid, signal.SIGCONT)
    assert res.returncode == 6, res
    assert res.stderr.count("\n") == 1 and "within 1 s" in res.stderr, res.stderr
    assert took < 10, took
    assert graced.ctl("status").returncode == 0  # and it answers once it runs again
