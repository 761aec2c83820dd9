"""The fleet view's missions agree with the host's: a real graced forwarding to a real
nats-server, a real fault, a real failing playbook, the real gracectl on both sides.

Skipped with the reason where nats-server cannot be installed (tests/helpers/nats.py).
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.nats import Operator, one_host, status, wait_caught_up
from tests.helpers.procs import poll_until
from tests.test_missions_e2e import MISSIONS, Watch
from tests.test_remediation_e2e import process_detector, start_sleeper


def _failing_playbook() -> str:
    """Runs for the worker's mission, fails, and may run once an hour: the mission fails,
    the next one for the same symptom finds the budget spent and escalates."""
    return ('[[playbook]]\nname = "fix-worker"\ndetector = "worker"\nrisk = "low"\n'
            'budget = 1\nverify_timeout = 5.0\n'
            '[[playbook.step]]\naction = "run"\nargv = ["false"]\ntimeout = 5.0\n')


def _other(marker: str) -> str:
    """A medium detector of a process never started, with a high-risk playbook never
    approved: its mission stays active all along (the #15 of the report)."""
    return (f'[[detector]]\nname = "other"\nkind = "process"\ninterval = 1.0\n'
            f'process = "{marker}"\nmatch_cmdline = true\nseverity = "medium"\n'
            '[[playbook]]\nname = "page-other"\ndetector = "other"\nrisk = "high"\n'
            '[[playbook.step]]\naction = "run"\nargv = ["true"]\ntimeout = 5.0\n')


def _rows(missions: list[dict[str, Any]]) -> list[tuple[int, str, str]]:
    return [(m["id"], m["state"], m["severity"]) for m in missions]


def _fleet_host(op: Operator) -> dict[str, Any]:
    hosts = op.fleet_json("ls")["hosts"]
    assert len(hosts) == 1, hosts
    return dict(hosts[0])


@pytest.mark.slow
def test_an_escalated_mission_whose_symptom_cleared_leaves_the_fleet_view_as_the_host(
        shortdir: Path) -> None:
    marker = f"grace-fleetm-{uuid.uuid4().hex[:8]}"
    worker = start_sleeper(marker)
    try:
        with one_host(shortdir, control=True, detectors=(
                process_detector(marker) + _failing_playbook()
                + _other(f"grace-never-{uuid.uuid4().hex[:8]}")
                + MISSIONS.format(flap=0))) as h:
            g, op = h.g, h.op
            op.pin(g)
            w = Watch(g)
            try:
                w.wait("mission.awaiting_approval", "other", 20)
                worker.kill()
                worker.wait(10)
                w.wait("mission.failed", "worker", 30)
                escalated = w.wait("mission.escalated", "worker", 30)["payload"]
                assert "budget" in escalated["reason"], escalated
            finally:
                w.close()

            def host_missions() -> list[tuple[int, str, str]]:
                return _rows(json.loads(g.ctl("missions", "ls", "--json",
                                              check=True).stdout))

            # Escalated, symptom still there: on the host and in the fleet, one mission
            # open (medium) and one escalated that needs a person.
            local = host_missions()
            assert sorted(state for _, state, _ in local) == ["awaiting_approval",
                                                              "escalated"], local
            assert status(g)["escalated"] == [escalated["id"]]
            wait_caught_up(g)
            assert _rows(op.fleet_json("missions", "ls")) == local
            # Until a heartbeat after the escalation, the host's own count may be older.
            poll_until(lambda: _fleet_host(op)["open_missions_reported"] == 1, 30,
                       "a heartbeat counting one open mission")
            listed = _fleet_host(op)
            assert listed["open_missions"] == {"medium": 1}, listed
            assert listed["escalated"] == [escalated["id"]], listed
            table = op.fleet("ls", "--wide")
            assert "1 medium; 1 escalated" in table.stdout, table.stdout

            # The symptom clears: the host stops listing the escalated mission (and its
            # status drops exit 7); so must the fleet view.
            cleared = start_sleeper(marker)
            try:
                poll_until(lambda: status(g)["escalated"] == [], 30,
                           "the host releasing the escalated mission")
                wait_caught_up(g)
                local = host_missions()
                assert [state for _, state, _ in local] == ["awaiting_approval"], local
                assert g.ctl("status", "-q").returncode == 0
                assert _rows(op.fleet_json("missions", "ls")) == local
                listed = _fleet_host(op)
                assert listed["open_missions"] == {"medium": 1}, listed
                assert listed["escalated"] == [], listed
                assert listed["open_missions_reported"] == 1, listed
                # --all lists every mission in the host's order (newest first).
                every = _rows(json.loads(g.ctl("missions", "ls", "--all", "--json",
                                               check=True).stdout))
                assert [i for i, _, _ in every] == [3, 2, 1], every
                assert _rows(op.fleet_json("missions", "ls", "--all")) == every
                # --state escalated still finds it, as missions ls --state does.
                assert _rows(op.fleet_json("missions", "ls", "--state", "escalated")) \
                    == _rows(json.loads(g.ctl("missions", "ls", "--state", "escalated",
                                              "--json", check=True).stdout))
            finally:
                cleared.kill()
                cleared.wait(10)
    finally:
        worker.kill()
        worker.wait(10)


@pytest.mark.slow
def test_a_symptom_that_cleared_while_graced_was_stopped_releases_its_escalation(
        shortdir: Path) -> None:
    """graced restarted holds an escalated mission for a person until its detector sees
    the symptom normal; that first normal sample is journaled as detector.recovered (it
    was not, graced having seen it anomalous only before the restart), so the fleet view
    ends the escalation with the host."""
    marker = f"grace-fleetr-{uuid.uuid4().hex[:8]}"
    worker = start_sleeper(marker)
    cleared = None
    try:
        with one_host(shortdir, detectors=(process_detector(marker) + _failing_playbook()
                                           + MISSIONS.format(flap=0))) as h:
            g, op = h.g, h.op
            op.pin(g)
            w = Watch(g)
            try:
                worker.kill()  # a real fault
                worker.wait(10)
                mid = w.wait("mission.escalated", "worker", 30)["payload"]["id"]
            finally:
                w.close()
            wait_caught_up(g)
            assert _fleet_host(op)["escalated"] == [mid]
            g.stop()
            cleared = start_sleeper(marker)  # the symptom clears while graced is down
            g.start()
            poll_until(lambda: status(g)["escalated"] == [], 30,
                       "the host releasing the escalated mission")
            recovered = [json.loads(line)["payload"] for line in g.ctl(
                "tail", "--no-follow", "--json", "-n", "all", "detector.recovered",
                check=True).stdout.splitlines()]
            assert [(r["detector"], r["subject"]) for r in recovered] == [
                ("worker", marker)], recovered
            wait_caught_up(g)
            assert json.loads(g.ctl("missions", "ls", "--json", check=True).stdout) == []
            assert op.fleet_json("missions", "ls") == []
            assert _fleet_host(op)["escalated"] == []
    finally:
        for proc in (worker, cleared):
            if proc is not None:
                proc.kill()
                proc.wait(10)


@pytest.mark.slow
def test_an_approval_nobody_gave_in_time_stays_in_the_fleet_view_as_on_the_host(
        shortdir: Path) -> None:
    """A mission that expired with nobody deciding and its symptom still there is listed
    by missions ls and status (it needs a person); the fleet view lists it alike, and
    drops it with the host once the symptom clears."""
    marker = f"grace-fleete-{uuid.uuid4().hex[:8]}"
    with one_host(shortdir, detectors=(_other(marker) + MISSIONS.format(flap=0)
                                       + "\n[remediation]\napproval_timeout = 1.0\n")) as h:
        g, op = h.g, h.op
        op.pin(g)
        w = Watch(g)
        try:
            mid = w.wait("mission.expired", "other", 30)["payload"]["id"]
        finally:
            w.close()
        assert status(g)["expired"] == [mid]
        wait_caught_up(g)
        local = json.loads(g.ctl("missions", "ls", "--json", check=True).stdout)
        assert _rows(local) == [(mid, "expired", "medium")], local
        assert _rows(op.fleet_json("missions", "ls")) == _rows(local)
        listed = _fleet_host(op)
        assert (listed["expired"], listed["open_missions"]) == ([mid], {}), listed
        assert "1 expired" in op.fleet("ls", "--wide").stdout
        cleared = start_sleeper(marker)
        try:
            poll_until(lambda: status(g)["expired"] == [], 30,
                       "the host releasing the expired mission")
            wait_caught_up(g)
            assert json.loads(g.ctl("missions", "ls", "--json", check=True).stdout) == []
            assert op.fleet_json("missions", "ls") == []
            assert _fleet_host(op)["expired"] == []
        finally:
            cleared.kill()
            cleared.wait(10)


@pytest.mark.slow
def test_fleet_missions_show_points_to_fleet_approve(shortdir: Path) -> None:
    """The plan a mission awaits approval with, shown from the fleet, names the command
    that approves it from there (fleet approve HOST ID, HOST as it was named), not the
    host's own missions approve."""
    with one_host(shortdir, control=True, detectors=(
            _other(f"grace-never-{uuid.uuid4().hex[:8]}") + MISSIONS.format(flap=0))) as h:
        g, op = h.g, h.op
        daemon_id = op.pin(g)
        w = Watch(g)
        try:
            mid = w.wait("mission.awaiting_approval", "other", 20)["payload"]["id"]
        finally:
            w.close()
        wait_caught_up(g)
        local = g.ctl("missions", "show", str(mid), check=True).stdout
        assert f"awaiting approval of this plan (gracectl missions approve {mid}):" in local
        shown = op.fleet("missions", "show", daemon_id[:8], str(mid))
        assert shown.returncode == 0, shown.stderr
        assert (f"awaiting approval of this plan (gracectl fleet approve {daemon_id[:8]} "
                f"{mid}):") in shown.stdout, shown.stdout
        assert "missions approve" not in shown.stdout, shown.stdout
        # graced's log names the component once (the formatter adds it).
        log = g.stderr()
        assert "fleet: forwarding to nats://127.0.0.1:" in log, log
        assert "fleet: fleet:" not in log, log
