"""The credit rules (docs/security.md, "Learning"), by value: which outcomes count as
evidence about a playbook, and why the others do not."""

from __future__ import annotations

import pytest

from graced.learning import credit
from graced.learning.knowledge import Knowledge
from graced.missions.engine import Mission
from tests.test_learning import _mission


def _ran(state: str) -> Mission:
    return _mission(1, "web", "api", "latency 900 ms", state, "restart-web", ran=True)


@pytest.mark.parametrize("state, expected", [("resolved", True), ("failed", False)])
def test_a_complete_run_on_a_present_symptom_counts_both_ways(state: str,
                                                              expected: bool) -> None:
    m = _ran(state)
    m.symptom_at_start = True
    assert credit(m, Knowledge(), "sig") == (expected, None)


@pytest.mark.parametrize("state", ["resolved", "failed"])
def test_a_symptom_gone_before_the_run_counts_neither_way(state: str) -> None:
    """A user who makes a symptom flicker (present at detection, gone when the playbook
    starts) cannot credit or debit the playbook."""
    m = _ran(state)
    m.symptom_at_start = False
    success, why = credit(m, Knowledge(), "sig")
    assert success is None and why is not None and "cleared before the playbook" in why


def test_an_interrupted_run_that_resolved_is_no_success() -> None:
    """graced killed mid-step, the symptom went away meanwhile: the playbook did not
    finish, so the resolution is no evidence that it works."""
    m = _ran("resolved")
    m.symptom_at_start = True
    m.timeline.append({"ts": 1005.0, "from": "executing", "to": "interrupted"})
    success, why = credit(m, Knowledge(), "sig")
    assert success is None and why is not None and "did not run to completion" in why


def test_a_step_that_did_not_complete_is_no_success() -> None:
    m = _ran("resolved")
    m.symptom_at_start = True
    m.steps[0]["ok"] = False
    success, why = credit(m, Knowledge(), "sig")
    assert success is None and why is not None and "did not run to completion" in why


@pytest.mark.parametrize("state", ["resolved", "failed"])
def test_graceds_own_exhaustion_is_never_the_playbooks_failure(state: str) -> None:
    """A step graced could not start (out of descriptors, its own budget) is graced's
    failure: neither a success nor a failure of the playbook."""
    m = _ran(state)
    m.symptom_at_start = True
    m.steps[0]["graced_failure"] = "cannot start step: too many open files"
    success, why = credit(m, Knowledge(), "sig")
    assert success is None and why is not None and "graced's failure" in why
