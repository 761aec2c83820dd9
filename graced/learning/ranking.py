"""Choosing among matching playbooks by their record. Pure code: values in, a decision out.

Theory of operation
-------------------
Each candidate playbook has a :class:`Record` for the mission's symptom: successes and
failures of its past runs (a run succeeds when the mission resolved after it), and the
time those successes took. The record is the exact symptom's history (same detector and
subject, from every source the knowledge base holds) plus, down-weighted, the runs of
that playbook on textually similar past missions.

Strategies:

* ``thompson`` (default): draw from each candidate's Beta(1 + s, 1 + f) posterior and
  take the highest draw. A playbook with little evidence has a wide posterior, so it is
  still tried now and then (exploration) until the evidence says otherwise.
* ``ucb``: posterior mean plus an exploration bonus ``sqrt(2 ln N / n)``; untried first.
* ``uniform``: a uniform choice among the candidates (learning off).
* ``first``: the first matching playbook in config order (learning off, deterministic).

Ties go to the shorter mean time to resolve, then to config order.

Demotion: a candidate with at least ``demote_after`` runs whose success ratio is below
``demote_below`` is *demoted* for this symptom and no longer run automatically. When
every candidate is demoted the mission escalates to a human. Learning only ever chooses
*which* playbook; the risk policy still decides whether it runs without approval.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

STRATEGIES = ("thompson", "ucb", "uniform", "first")


@dataclass
class Record:
    """A playbook's runs for one symptom."""

    successes: float = 0.0
    failures: float = 0.0
    ttr_total: float = 0.0  # seconds, summed over successes
    ttr_count: float = 0.0

    @property
    def runs(self) -> float:
        return self.successes + self.failures

    @property
    def ratio(self) -> float | None:
        """The observed success ratio (None before any run)."""
        return self.successes / self.runs if self.runs else None

    @property
    def mean(self) -> float:
        """Posterior mean of the success probability under a Beta(1, 1) prior."""
        return (1 + self.successes) / (2 + self.runs)

    @property
    def mttr(self) -> float | None:
        return self.ttr_total / self.ttr_count if self.ttr_count else None

    def add(self, other: Record, weight: float = 1.0) -> None:
        self.successes += weight * other.successes
        self.failures += weight * other.failures
        self.ttr_total += weight * other.ttr_total
        self.ttr_count += weight * other.ttr_count


@dataclass
class Decision:
    """What the ranking chose and the figures behind it (stored on the mission)."""

    strategy: str
    chosen: str | None
    escalate: bool
    reason: str
    candidates: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "chosen": self.chosen, "escalate": self.escalate,
                "reason": self.reason, "candidates": self.candidates}


def demoted(rec: Record, demote_after: int, demote_below: float) -> bool:
    ratio = rec.ratio
    return rec.runs >= demote_after and ratio is not None and ratio < demote_below


def _r(x: float | None, nd: int = 4) -> float | None:
    return None if x is None else round(x, nd)


def rank(candidates: list[tuple[str, str]], records: dict[str, Record], *, strategy: str,
         rng: random.Random, demote_after: int, demote_below: float) -> Decision:
    """Choose among ``candidates`` (name, risk), in config order, by their ``records``."""
    if not candidates:
        return Decision(strategy, None, False, "no playbook matches this mission")
    learning = strategy in ("thompson", "ucb")
    rows: list[dict[str, Any]] = []
    total_runs = sum(records.get(n, Record()).runs for n, _ in candidates)
    for order, (name, risk) in enumerate(candidates):
        rec = records.get(name, Record())
        is_demoted = learning and demoted(rec, demote_after, demote_below)
        if strategy == "thompson":
            score = rng.betavariate(1 + rec.successes, 1 + rec.failures)
        elif strategy == "ucb":
            score = (math.inf if rec.runs == 0 else
                     rec.mean + math.sqrt(2 * math.log(max(total_runs, 1)) / rec.runs))
        elif strategy == "uniform":
            score = rng.random()
        else:
            score = float(len(candidates) - order)
        rows.append({"playbook": name, "risk": risk, "successes": _r(rec.successes, 2),
                     "failures": _r(rec.failures, 2), "runs": _r(rec.runs, 2),
                     "ratio": _r(rec.ratio), "mean": _r(rec.mean), "score": score,
                     "mttr_s": _r(rec.mttr, 3), "demoted": is_demoted, "order": order})
    eligible = [r for r in rows if not r["demoted"]]
    for r in rows:
        r["score"] = None if math.isinf(r["score"]) else _r(r["score"])
    if not eligible:
        names = ", ".join(r["playbook"] for r in rows)
        return Decision(strategy, None, True,
                        f"every matching playbook keeps failing for this symptom ({names}: "
                        f"success below {demote_below:.0%} after {demote_after}+ runs); "
                        "a human should look", rows)

    def key(r: dict[str, Any]) -> tuple[float, float, int]:
        score = math.inf if r["score"] is None else r["score"]
        mttr = r["mttr_s"] if r["mttr_s"] is not None else math.inf
        return (-score, mttr, r["order"])

    best = min(eligible, key=key)
    for r in rows:
        r["chosen"] = r is best
    why = {"thompson": "highest Thompson draw from its Beta posterior",
           "ucb": "highest upper confidence bound",
           "uniform": "uniform choice (learning off)",
           "first": "first matching playbook (learning off)"}[strategy]
    skipped = [r["playbook"] for r in rows if r["demoted"]]
    reason = f"{best['playbook']}: {why}"
    if skipped:
        reason += f"; demoted, not run automatically: {', '.join(skipped)}"
    return Decision(strategy, best["playbook"], False, reason, rows)


def ordered(records: dict[str, Record]) -> list[tuple[str, Record]]:
    """Playbooks best first, deterministically: posterior mean, then time to resolve."""
    return sorted(records.items(), key=lambda kv: (
        -kv[1].mean, kv[1].mttr if kv[1].mttr is not None else math.inf, kv[0]))
