"""Crash safety, short version (bench/crash.py runs 200): SIGKILL graced at random
moments while events stream, missions execute and approvals arrive; nothing a client saw
or was told is lost, the database is intact, the chain holds, no action runs twice."""

from __future__ import annotations

from tests.helpers.crash import run


def test_sigkill_under_load_loses_nothing() -> None:
    report = run(kills=8, min_up=0.4, max_up=1.5)
    assert report.ok, "\n".join(report.lines())
    assert report.runs > 0  # missions really executed between the kills
