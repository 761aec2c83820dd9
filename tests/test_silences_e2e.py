"""Silences against a real graced: signed, listed, removed, kept across a restart, and
ending by themselves (time, or their missions resolving); while one holds a mission the
anomaly is recorded but no playbook runs and no notifier is told."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from graced.protocol import parse_ts
from tests.conftest import Graced
from tests.helpers.procs import LineCollector
from tests.test_learning_e2e import FAULT, NORMAL, SETTINGS, value_detector


def config(queue: Path, notified: Path) -> str:
    return (value_detector("backlog", queue, "high")
            + '[[playbook]]\nname = "drain"\ndetector = "backlog"\nrisk = "low"\n'
            'budget = 100\nverify_timeout = 10.0\n'
            '[[playbook.step]]\naction = "run"\nshell = true\n'
            f'argv = ["echo {NORMAL} > {queue}"]\ntimeout = 10.0\n\n'
            '[[notifier]]\nname = "pager"\nkind = "command"\n'
            f'argv = ["/bin/sh", "-c", "cat >> {notified}"]\n'
            'on = ["executing", "failed", "escalated"]\n'
            + SETTINGS.format(approval=300.0))


class Events:
    """Every silence.*, executor.* and mission.* event, from the real gracectl tail."""

    def __init__(self, g: Graced) -> None:
        self.tail = LineCollector(g.ctl_popen("tail", "--json", "--since", "1", "silence.*",
                                              "executor.*", "mission.*"))

    def of(self, topic: str, **match: Any) -> list[dict[str, Any]]:
        return [e for e in self.tail.events() if e["topic"] == topic
                and all(e["payload"].get(k) == v for k, v in match.items())]

    def wait(self, topic: str, timeout: float = 20, **match: Any) -> dict[str, Any]:
        ok = self.tail.wait_for(lambda _: bool(self.of(topic, **match)), timeout)
        assert ok, f"no {topic} {match} within {timeout} s: {self.tail.lines[-5:]}"
        return self.of(topic, **match)[0]

    def close(self) -> None:
        self.tail.proc.terminate()
        self.tail.proc.wait(10)


def add(g: Graced, *args: str) -> int:
    res = g.ctl("silence", "add", *args, check=True)
    return int(res.stdout.strip())


def started(make_graced: Any, base: Path) -> tuple[Graced, Path, Path]:
    """graced watching a queue file, with its fix playbook and a pager notifier."""
    queue, notified = base / "queue", base / "notified"
    queue.write_text(NORMAL)
    return make_graced(detectors=config(queue, notified)), queue, notified


def listed(g: Graced) -> list[dict[str, Any]]:
    return json.loads(g.ctl("silence", "ls", "--json", check=True).stdout)


@pytest.mark.slow
def test_silences_are_signed_listed_removed_and_expire(make_graced, shortdir: Path) -> None:
    g, queue, notified = started(make_graced, shortdir)
    ev = Events(g)
    try:
        # Bad requests: one line, a usage exit code, nothing added.
        for args in (["backlog", "--for", "soon", "--comment", "x"],
                     ["backlog", "--all", "--for", "1h", "--comment", "x"],
                     ["--for", "1h", "--comment", "x"],
                     ["backlog", "--for", "1h"]):
            bad = g.ctl("silence", "add", *args)
            assert bad.returncode == 2, (args, bad.stderr)
        empty = g.ctl("silence", "add", "backlog", "--for", "1h", "--comment", " ")
        assert empty.returncode == 1 and "needs a comment" in empty.stderr
        assert listed(g) == []

        held = add(g, "backlog:qu*", "--for", "1h", "--comment", "draining by hand")
        s = listed(g)[0]
        assert (s["id"], s["target"], s["detector"], s["subject"], s["comment"]) == (
            held, "backlog:qu*", "backlog", "qu*", "draining by hand")
        assert 3590 < parse_ts(s["expires_at"]) - parse_ts(s["created_at"]) <= 3600
        assert re.search(r"^silences +1 in force \(gracectl silence ls\)$",
                         g.ctl("status").stdout, re.M)
        text = g.ctl("silence", "ls", check=True).stdout
        assert text.split("\n")[0].split() == ["ID", "TARGET", "UNTIL", "BY", "MISSIONS",
                                               "COMMENT"]
        assert "backlog:qu*" in text and "draining by hand" in text

        # Silenced: the anomaly opens a mission, and that is all.
        queue.write_text(FAULT)
        opened = ev.wait("mission.opened", detector="backlog")["payload"]
        mid = opened["id"]
        hold = ev.wait("executor.silenced", mission=mid)
        assert hold["payload"]["silence"] == held
        m = json.loads(g.ctl("missions", "show", str(mid), "--json", check=True).stdout)
        assert m["state"] == "open" and m["silenced"]["id"] == held
        assert "silenced by" in m["reason"] and "draining by hand" in m["reason"]
        row = next(line for line in g.ctl("missions", "ls", check=True).stdout.splitlines()
                   if line.split()[0] == str(mid))
        assert f"silenced #{held}" in row
        assert listed(g)[0]["missions"] == [mid]

        # A silence that runs out ends by itself.
        short = add(g, "other", "--for", "1s", "--comment", "short one")
        gone = ev.wait("silence.expired", id=short)["payload"]
        assert gone["reason"] == "expired" and [x["id"] for x in listed(g)] == [held]

        # Kept across a restart, exactly.
        ev.close()
        before = listed(g)
        assert g.stop() == 0
        g.start()
        ev = Events(g)
        assert listed(g) == before
        assert json.loads(g.ctl("missions", "show", str(mid), "--json",
                                check=True).stdout)["state"] == "open"

        # Only with control rights.
        if os.geteuid() == 0:
            os.chmod(g.socket, 0o666)
            os.chmod(g.base, 0o755)
            os.chmod(g.home, 0o777)
            for args in (["add", "--all", "--for", "1h", "--comment", "x"], ["rm", str(held)]):
                res = subprocess.run(["setpriv", "--reuid", "nobody", "--regid", "nogroup",
                                      "--clear-groups", g.ctl_argv0(), "silence", *args],
                                     env=g.env, capture_output=True, text=True,
                                     stdin=subprocess.DEVNULL, timeout=60)
                assert res.returncode == 4 and "needs control rights" in res.stderr, res.stderr
            assert listed(g) == before

        # Removed: the mission goes through the policy at once; the fix runs, the
        # notifier is told (it was not while silenced).
        assert not notified.exists()
        g.ctl("silence", "rm", str(held), check=True)
        assert listed(g) == []
        missing = g.ctl("silence", "rm", str(held))
        assert missing.returncode == 5 and missing.stderr.count("\n") == 1
        removed = ev.wait("silence.removed", id=held)
        executing = ev.wait("mission.executing", id=mid)
        ev.wait("mission.resolved", id=mid)
        assert executing["seq"] > removed["seq"]
        told = ev.wait("executor.notified", mission=mid)
        assert told["seq"] > removed["seq"]
        assert json.loads(notified.read_text().splitlines()[0])["mission"]["id"] == mid

        # Every change was a signed event on the verified chain.
        res = g.ctl("tail", "--json", "--verify", "--since", "1", "--no-follow", "silence.*")
        assert res.returncode == 0, res.stderr
        topics = [(json.loads(x)["topic"], json.loads(x)["payload"]["id"])
                  for x in res.stdout.splitlines()]
        assert topics == [("silence.added", held), ("silence.added", short),
                          ("silence.expired", short), ("silence.removed", held)]
        # missions ls still shows that it was silenced, as history: not held any more.
        was = json.loads(g.ctl("missions", "ls", "--all", "--json", check=True).stdout)[0]
        assert was["silenced"]["id"] == held and was["silenced"]["ended_at"] >= s["created_at"]
        row = next(line for line in g.ctl("missions", "ls", "--all", check=True).stdout
                   .splitlines() if line.split()[0] == str(mid))
        assert f"resolved, was silenced #{held}" in row
    finally:
        ev.close()


@pytest.mark.slow
def test_a_silence_until_resolved_ends_with_its_missions(make_graced, shortdir: Path) -> None:
    g, queue, notified = started(make_graced, shortdir)
    ev = Events(g)
    try:
        sid = add(g, "backlog", "--for", "2h", "--comment", "until it clears",
                  "--until-resolved")
        assert listed(g)[0]["until_resolved"] is True
        queue.write_text(FAULT)
        mid = ev.wait("executor.silenced", silence=sid)["payload"]["mission"]
        queue.write_text(NORMAL)  # the operator fixes it by hand
        ev.wait("mission.resolved", id=mid)
        ended = ev.wait("silence.expired", id=sid)["payload"]
        assert ended["reason"] == "its missions closed" and ended["missions"] == [mid]
        assert listed(g) == []
        m = json.loads(g.ctl("missions", "show", str(mid), "--json", check=True).stdout)
        assert not m["steps"] and m["playbook"] is None  # nothing ran
        assert not notified.exists()
    finally:
        ev.close()


@pytest.mark.slow
def test_a_silence_added_later_stops_notifications_too(make_graced, shortdir: Path) -> None:
    """A silence covers missions that were open before it: no notifier hears of them."""
    notified = shortdir / "notified"
    files = {name: shortdir / name for name in ("backlog", "spool")}
    detectors = ""
    for name, file in files.items():
        file.write_text(NORMAL)
        detectors += value_detector(name, file, "high").replace('"queue"', f'"{name}"') + (
            f'[[playbook]]\nname = "fix-{name}"\ndetector = "{name}"\nrisk = "high"\n'
            '[[playbook.step]]\naction = "run"\nargv = ["/bin/true"]\n\n')
    g = make_graced(detectors=detectors + '[[notifier]]\nname = "pager"\nkind = "command"\n'
                    f'argv = ["/bin/sh", "-c", "cat >> {notified}; echo >> {notified}"]\n'
                    'on = ["awaiting_approval", "rejected"]\n' + SETTINGS.format(approval=300.0))
    ev = Events(g)
    try:
        ids = {}
        for name, file in files.items():
            file.write_text(FAULT)
            ids[name] = ev.wait("mission.awaiting_approval", detector=name)["payload"]["id"]
            ev.wait("executor.notified", mission=ids[name], state="awaiting_approval")
        add(g, "backlog", "--for", "1h", "--comment", "maintenance")
        # Rejected while silenced: no one is told; the other mission's rejection is told.
        g.ctl("missions", "reject", str(ids["backlog"]), check=True)
        g.ctl("missions", "reject", str(ids["spool"]), check=True)
        ev.wait("executor.notified", mission=ids["spool"], state="rejected")
        assert ev.of("executor.notified", mission=ids["backlog"], state="rejected") == []
        told = [(json.loads(line)["mission"]["id"], json.loads(line)["mission"]["state"])
                for line in notified.read_text().splitlines() if line]
        assert (ids["backlog"], "rejected") not in told and (ids["spool"], "rejected") in told
    finally:
        ev.close()


@pytest.mark.slow
def test_a_silence_holds_a_mission_awaiting_approval_and_its_approved_run(
        make_graced, shortdir: Path) -> None:
    """A silence added while a mission waits for approval marks it silenced; an approval
    under the silence is recorded, and the playbook runs only once the silence ends."""
    queue = shortdir / "queue"
    queue.write_text(NORMAL)
    g = make_graced(detectors=config(queue, shortdir / "notified").replace(
        'risk = "low"', 'risk = "high"'))
    ev = Events(g)
    try:
        queue.write_text(FAULT)
        mid = ev.wait("mission.awaiting_approval", detector="backlog")["payload"]["id"]
        held = add(g, "backlog", "--for", "2h", "--comment", "maintenance")
        ev.wait("executor.silenced", mission=mid, silence=held)
        m = json.loads(g.ctl("missions", "show", str(mid), "--json", check=True).stdout)
        assert m["state"] == "awaiting_approval" and m["silenced"]["id"] == held
        assert "maintenance" in g.ctl("missions", "show", str(mid), check=True).stdout
        assert [s["missions"] for s in listed(g)] == [[mid]]

        # Approved under the silence: recorded, the reply and gracectl say the run waits.
        ok = g.ctl("missions", "approve", str(mid), "--yes", "--comment", "go")
        assert ok.returncode == 0, ok.stderr
        assert "waits until the silence ends" in ok.stderr, ok.stderr
        m = json.loads(g.ctl("missions", "show", str(mid), "--json", check=True).stdout)
        assert m["state"] == "approved" and m["silenced"]["id"] == held
        assert m["approvals"][-1]["decision"] == "approved"
        assert queue.read_text() == FAULT

        # The silence ends: the approved plan runs, after it and only after it.
        g.ctl("silence", "rm", str(held), check=True)
        removed = ev.wait("silence.removed", id=held)
        executing = ev.wait("mission.executing", id=mid)
        assert executing["seq"] > removed["seq"]
        done = json.loads(g.ctl("wait", str(mid), "--state", "resolved", "--timeout", "30",
                                "--json", check=True).stdout)
        assert done["approvals"][-1]["comment"] == "go"
        assert len(ev.of("mission.executing", id=mid)) == 1
    finally:
        ev.close()
