"""integration.* events: the health of graced's components, pure and against a real graced
whose TCP probe's target really goes away and comes back."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid

import pytest

from graced.integration import changes, snapshot
from tests.helpers.procs import LineCollector, tcp_listener

FIGURES = {
    "detectors": {"api": {"kind": "tcp", "state": "up", "errors": 0, "last_error": None,
                          "subjects": {"127.0.0.1:9": {"value": 1.5, "unit": "ms",
                                                       "failed": None}}}},
    "notifiers": {"hook": {}},
    "journal": {"failing_since": None, "commit_latency_ms": 0.4, "size_bytes": 4096,
                "free_bytes": 10**9, "last_error": None},
    "executor": {"paused": False, "mode": "act", "running_steps": 0, "budget_left": 20},
    "wire": {"clients": 2, "unix_clients": 2, "tcp_clients": 0},
}


def test_snapshot_names_every_component_with_a_state() -> None:
    snap = snapshot(**FIGURES)
    assert {k: v["state"] for k, v in snap.items()} == {
        "detector:api": "up", "notifier:hook": "up", "journal": "up", "executor": "up",
        "wire": "up"}
    assert snap["detector:api"]["latency_ms"] == 1.5
    assert snap["journal"]["free_bytes"] == 10**9
    assert snap["executor"]["budget_left"] == 20


def test_a_failed_probe_is_failing_with_its_reason_and_only_state_moves_are_changes() -> None:
    before = snapshot(**FIGURES)
    down = json.loads(json.dumps(FIGURES))
    down["detectors"]["api"]["subjects"]["127.0.0.1:9"] = {
        "value": None, "unit": "", "failed": "127.0.0.1:9: Connection refused"}
    down["notifiers"]["hook"] = {"last_ok": False, "last_error": "status 500", "failures": 1}
    down["executor"]["paused"] = True
    after = snapshot(**down)
    moved = {c["component"]: c for c in changes(before, after)}
    assert set(moved) == {"detector:api", "notifier:hook", "executor"}
    assert moved["detector:api"]["state"] == "failing"
    assert moved["detector:api"]["was"] == "up"
    assert moved["detector:api"]["last_error"] == "127.0.0.1:9: Connection refused"
    assert moved["notifier:hook"]["last_error"] == "status 500"
    assert moved["executor"]["state"] == "paused"
    # A latency that moves is not a change.
    faster = json.loads(json.dumps(FIGURES))
    faster["detectors"]["api"]["subjects"]["127.0.0.1:9"]["value"] = 9.0
    assert changes(before, snapshot(**faster)) == []
    # A component that leaves is reported once.
    gone = json.loads(json.dumps(FIGURES))
    del gone["detectors"]["api"]
    assert changes(before, snapshot(**gone)) == [
        {"component": "detector:api", "was": "up", "kind": "detector", "state": "removed"}]


@pytest.mark.slow
def test_a_probe_going_down_and_up_is_published_and_summarised(make_graced) -> None:
    server = tcp_listener()
    port = server.getsockname()[1]
    g = make_graced(detectors=f'[[detector]]\nname = "api"\nkind = "tcp"\ninterval = 0.5\n'
                              f'host = "127.0.0.1"\nport = {port}\ntimeout = 1.0\n')
    tail = LineCollector(g.ctl_popen("tail", "--json", "--since", "1", "integration.*"))
    try:
        def states(component: str) -> list[str]:
            return [e["payload"]["state"] for e in tail.events()
                    if e["topic"] == "integration.changed"
                    and e["payload"]["component"] == component]

        def summary() -> dict | None:
            found = [e for e in tail.events() if e["topic"] == "integration.summary"]
            return found[0]["payload"] if found else None

        assert tail.wait_for(lambda _: summary() is not None, 10), tail.lines[-3:]
        comps = summary()["components"]  # type: ignore[index]
        assert {"journal", "executor", "wire", "detector:api"} <= set(comps)
        assert comps["journal"]["free_bytes"] > 0
        assert tail.wait_for(lambda _: "up" in states("detector:api")
                             or comps["detector:api"]["state"] == "up", 10)
        server.close()  # nothing listens there now: refused
        assert tail.wait_for(lambda _: "failing" in states("detector:api"), 10), tail.lines[-3:]
        failing = [e["payload"] for e in tail.events() if e["topic"] == "integration.changed"
                   and e["payload"]["state"] == "failing"][0]
        assert "refused" in failing["last_error"].lower()
        # gracectl top shows it too (status carries the components' health).
        status = json.loads(g.ctl("status", "--json", check=True).stdout)
        assert status["integration"]["detector:api"]["state"] == "failing"
        once = g.ctl("top", "--once", check=True).stdout
        assert "detector:api failing" in once, once
        server = tcp_listener(port)
        assert tail.wait_for(lambda _: states("detector:api")[-1:] == ["up"]
                             and "failing" in states("detector:api"), 10), tail.lines[-3:]
    finally:
        server.close()
        tail.proc.terminate()
        tail.proc.wait(10)


@pytest.mark.slow
def test_a_dead_process_is_its_detectors_anomaly_not_a_failure(make_graced) -> None:
    """Review of #19, newcomer 2: failure is reserved for what graced cannot see; a watched
    process that died is seen, so its detector stays up and the mission says it."""
    from tests.test_event_sources_e2e import _started

    marker = f"grace-dead-{uuid.uuid4().hex[:8]}"
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", marker],
                            stdin=subprocess.DEVNULL)
    try:
        g, w = _started(make_graced, f'[[detector]]\nname = "web"\nkind = "process"\n'
                                     f'interval = 0.5\nprocess = "{marker}"\n'
                                     'match_cmdline = true\n')
        proc.kill()
        proc.wait()
        w.wait("mission.opened", "web", 10)
        deadline = time.monotonic() + 10  # the health is published once a second
        while True:
            status = json.loads(g.ctl("status", "--json", check=True).stdout)
            health = status["integration"].get("detector:web") or {"state": "starting"}
            if health["state"] != "starting" or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert (health["state"], health["last_error"]) == ("up", None), health
        assert not status["failing_probes"] and not status["failing_detectors"]
        w.close()
    finally:
        proc.kill()
