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
from tests.helpers.pty_run import run_on_tty
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


def _tty(g: Graced, *args: str, columns: int = 80) -> str:
    env = {**g.env, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "TERM": "xterm-256color"}
    rc, text = run_on_tty([g.ctl_argv0(), *args], env, columns, 24)
    assert rc == 0, text
    return text


def test_tail_fits_a_terminal_and_is_whole_when_piped_or_wide(graced: Graced) -> None:
    g = graced
    words = " ".join(f"word{i}" for i in range(40))
    g.ctl("emit", "user.note", "--payload", json.dumps({"text": words, "end": "THE-END"}),
          check=True)
    args = ("tail", "-n", "1", "--no-follow", "user.note")
    shown = [ln for ln in _tty(g, *args).split("\n") if ln]
    assert len(shown) == 1, shown  # one event, one line: no wrapping mid-word
    assert len(shown[0]) == 80 and shown[0].endswith("…"), shown
    assert "user.note" in shown[0]
    for flag in ("--wide", "-l", "--full"):  # whole, as journalctl's --full
        whole = [ln for ln in _tty(g, *args, flag).split("\n") if ln]
        assert "end=THE-END" in whole[0] and words in whole[0], whole
    piped = g.ctl(*args, check=True).stdout
    assert "end=THE-END" in piped and words in piped
    # -o cat and -o json are data for a pipe or a human to read whole: never cut.
    assert "end=THE-END" in _tty(g, *args, "-o", "cat")
    assert "THE-END" in json.loads(_tty(g, *args, "-o", "json"))["payload"]["end"]
