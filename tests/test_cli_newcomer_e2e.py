"""The newcomer review of the command line, each finding against a real graced and the
real gracectl: wait --json prints the mission as it is now, tail fits a terminal, the
time forms journalctl takes, a failing detector's reason in plain words, --utc and
--color everywhere, emit's payload an object, --plan in upper case."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.conftest import Graced
from tests.test_learning_e2e import FAULT, SETTINGS, fix, playbook, value_detector


def _subscribers(g: Graced) -> int:
    return int(json.loads(g.ctl("status", "--json", check=True).stdout)["wire"]["subscribers"])


@pytest.mark.slow
def test_wait_json_prints_the_mission_as_it_is_and_plan_takes_upper_case(
        make_graced, shortdir: Path) -> None:
    queue = shortdir / "queue"
    queue.write_text(FAULT)
    g = make_graced(detectors=value_detector("backlog", queue, "high")
                    + playbook("drain", "backlog", "high", fix(queue))
                    + SETTINGS.format(approval=600))
    g.ctl("wait", "1", "--state", "awaiting_approval", "--timeout", "20", check=True)
    before = _subscribers(g)
    waiter = g.ctl_popen("wait", "1", "--state", "final", "--timeout", "30", "--json")
    try:
        deadline = time.monotonic() + 10
        # The waiter subscribes before it reads the state: approve only once it has.
        while _subscribers(g) <= before:
            assert time.monotonic() < deadline, "wait never subscribed"
        sha = json.loads(g.ctl("missions", "show", "1", "--json",
                               check=True).stdout)["plan"]["sha256"]
        # A hash copied from a tool that writes hex in upper case is the same hash.
        g.ctl("missions", "approve", "1", "--plan", sha[:16].upper(), check=True)
        out, err = waiter.communicate(timeout=30)
    finally:
        if waiter.poll() is None:
            waiter.kill()
    assert waiter.returncode == 0, err
    waited = json.loads(out)
    shown = json.loads(g.ctl("missions", "show", "1", "--json", check=True).stdout)
    assert waited["state"] == "resolved" and waited["closed_at"] is not None, waited
    # What a script gets is the mission as it is now (kubectl wait + get -o json).
    for field in ("state", "closed_at", "updated_at", "timeline", "steps", "approvals"):
        assert waited[field] == shown[field], field
    assert [t["to"] for t in waited["timeline"]][-1] == "resolved"


def test_emit_payload_must_be_a_json_object(graced: Graced) -> None:
    for payload in ("[1]", "3", '"text"', "null"):
        res = graced.ctl("emit", "user.note", "--payload", payload)
        assert res.returncode == 2, (payload, res)
        assert "JSON object" in res.stderr and "Traceback" not in res.stderr
    assert "user.note" not in graced.ctl("tail", "--no-follow", "user.*").stdout
    assert graced.ctl("emit", "user.note", "--payload", '{"a": 1}').returncode == 0
