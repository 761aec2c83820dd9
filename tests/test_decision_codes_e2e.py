"""A decision for a mission that waits for none (exit 9) is told apart from a mission that
does not exist (exit 5), against a real graced through the real gracectl: rejected,
executing, resolved and expired missions, for approve, reject and playbooks run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import Graced
from tests.helpers.procs import poll_until
from tests.test_missions_e2e import MISSIONS, Watch


def config(value: Path, other: Path, go: Path) -> str:
    detectors = "".join(
        f'[[detector]]\nname = "{name}"\nkind = "value"\nfile = "{file}"\n'
        f'subject = "queue"\ninterval = 0.2\nthreshold = 50.0\n\n'
        for name, file in (("v", value), ("w", other)))
    # High risk: each mission waits for a person. The step runs until the test writes
    # to the FIFO, so the mission is seen executing.
    playbooks = "".join(
        f'[[playbook]]\nname = "{name}"\ndetector = "{det}"\nrisk = "high"\n'
        f'verify_timeout = 30.0\n[[playbook.step]]\naction = "run"\n'
        f'argv = ["head", "-c1", "{go}"]\ntimeout = 60.0\n\n'
        for name, det in (("drain", "v"), ("drain-w", "w")))
    # Time for gracectl on a loaded machine to decide before a mission expires; w's is
    # left to expire.
    return (detectors + playbooks + MISSIONS.format(flap=0.0)
            + "\n[remediation]\napproval_timeout = 10.0\n")


def refused(g: Graced, *args: str) -> str:
    """The one line a refused decision prints, once its exit code is checked: 9."""
    res = g.ctl(*args)
    assert res.returncode == 9, (args, res.returncode, res.stderr)
    assert res.stdout == "" and res.stderr.count("\n") == 1, res.stderr
    assert "Traceback" not in res.stderr
    return res.stderr.strip()


def decisions(g: Graced, mid: int) -> list[str]:
    """approve, reject and playbooks run for mission ``mid``, each refused with exit 9."""
    return [refused(g, "missions", "approve", str(mid), "--yes"),
            refused(g, "missions", "reject", str(mid)),
            refused(g, "playbooks", "run", "drain", "--mission", str(mid), "--yes")]


def sampled(g: Graced, value: float) -> bool:
    dets = json.loads(g.ctl("detectors", "--json", check=True).stdout)
    return dets["v"]["subjects"].get("queue", {}).get("value") == value


@pytest.mark.slow
def test_each_state_that_waits_for_no_decision_exits_9_and_no_mission_exits_5(
        make_graced, shortdir: Path) -> None:
    value, other, go = shortdir / "value", shortdir / "other", shortdir / "go"
    value.write_text("99\n")
    other.write_text("99\n")
    os.mkfifo(go)
    g = make_graced(detectors=config(value, other, go))
    w = Watch(g)
    try:
        first = w.wait("mission.awaiting_approval", "v", 15)["payload"]["id"]
        for args in (("missions", "approve", "999", "--yes"), ("missions", "reject", "999"),
                     ("playbooks", "run", "drain", "--mission", "999", "--yes")):
            res = g.ctl(*args)
            assert res.returncode == 5 and res.stderr.strip().endswith("no mission 999"), \
                (args, res.returncode, res.stderr)

        # Rejected: closed, its state and reason named.
        g.ctl("missions", "reject", str(first), "--comment", "not now", check=True)
        said = decisions(g, first)
        assert said[0].startswith(f"gracectl: mission {first} is rejected, not waiting for a "
                                  "decision: "), said
        assert said[0].endswith("; approve refused") and said[1].endswith("; reject refused")
        assert said[2].endswith("; run refused"), said

        # Executing (approved, its step running): active, but decided already.
        value.write_text("10\n")  # the rejected symptom goes away, then comes back
        poll_until(lambda: sampled(g, 10.0), 15, "a normal sample of v")
        value.write_text("99\n")
        second = w.wait("mission.awaiting_approval", "v", 15, count=2)["payload"]["id"]
        g.ctl("missions", "approve", str(second), "--yes", check=True)
        w.wait("mission.executing", "v", 15, count=1)
        said = decisions(g, second)
        assert all(f"mission {second} is executing, not waiting for a decision" in x
                   for x in said), said

        # Resolved: the step ends, the symptom is gone.
        value.write_text("10\n")
        with open(go, "w") as fifo:
            fifo.write("x")
        assert w.wait("mission.resolved", "v", 30)["payload"]["id"] == second
        said = decisions(g, second)
        assert all(f"mission {second} is resolved, not waiting for a decision: " in x
                   for x in said), said

        # Expired: nobody decided within approval_timeout.
        third = w.wait("mission.expired", "w", 30)["payload"]["id"]
        said = refused(g, "missions", "approve", str(third), "--yes")
        assert f"mission {third} is expired, not waiting for a decision: " in said, said
        said = refused(g, "missions", "reject", str(third))
        assert said.endswith("; reject refused"), said

    finally:
        w.close()
