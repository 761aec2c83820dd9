"""What a flood of failing or refused requests costs the log: a bounded number of lines."""

from __future__ import annotations

import logging

import pytest

from graced.auth import LOG_BURST, LOG_PERIOD, LogBudget, Refusals


def test_a_flood_logs_a_burst_then_one_count(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    budget = LogBudget("failed requests (tracebacks)", clock=lambda: now[0])
    allowed = [budget.allow() for _ in range(300)]
    assert allowed.count(True) == LOG_BURST and allowed[:LOG_BURST] == [True] * LOG_BURST
    now[0] = LOG_PERIOD
    with caplog.at_level(logging.WARNING, logger="graced"):
        assert budget.allow()
    assert [r.getMessage() for r in caplog.records] == [
        f"{300 - LOG_BURST} more failed requests (tracebacks) were not logged"]


def test_refusals_share_the_budget(caplog: pytest.LogCaptureFixture) -> None:
    refusals = Refusals(clock=lambda: 0.0)
    with caplog.at_level(logging.WARNING, logger="graced"):
        for _ in range(50):
            refusals.refuse("tcp 127.0.0.1", "status", "no key")
    assert refusals.total == 50 and len(caplog.records) == LOG_BURST
    assert refusals.suppressed == 50 - LOG_BURST


def test_a_per_key_budget_counts_what_it_refused_and_hands_the_count_on() -> None:
    from graced.auth import PerKeyBudget

    now = [0.0]
    budget = PerKeyBudget(3, 60.0, clock=lambda: now[0], keys=2)
    assert [budget.take("a") for _ in range(5)] == [0, 0, 0, None, None]
    assert budget.take("b") == 0  # keys have budgets of their own
    now[0] = 60.0
    assert budget.take("a") == 2  # the next one allowed says how many were not
    assert budget.take("a") == 0
    budget.take("c")  # a third key: the oldest window is forgotten
    budget.take("b")
    assert len(budget._windows) == 2
