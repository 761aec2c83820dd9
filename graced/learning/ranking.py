"""Choosing among matching playbooks by their record. Pure code: values in, a decision out.

Theory of operation
-------------------
Each candidate playbook has a :class:`Record` for the mission's symptom: successes and
failures of its past runs (a run succeeds when the mission resolved after it), and the
time those successes took. The record is this host's own history of the exact symptom
(same detector and subject; older outcomes weigh less, see ``half_life``), plus a
bounded prior from imported knowledge, plus, down-weighted, the runs of that playbook
on textually similar past missions. Every figure is clamped to finite, non-negative
values below :data:`BETA_CAP` before it reaches a sampler, so no record, however it
was made, can stall or crash the choice.

Strategies:

* ``thompson`` (default): draw from each candidate's Beta(1 + s, 1 + f) posterior and
  take the highest. A playbook with little evidence has a wide posterior, so it is
  still tried now and then (exploration) until the evidence says otherwise. The draw is
  *tempered*: the score is ``mean + exploration * (draw - mean)``. With ``exploration``
  1 this is textbook Thompson sampling; the default 0.3 explores less, because every
  exploratory run of a poor playbook is a fault left unfixed, and on a host playbooks
  mostly either work or do not (bench/learning.py: first 50 missions 69 % -> 78 % of
  the best in simulation, the last 150 unchanged).
* ``ucb``: posterior mean plus an exploration bonus ``sqrt(2 ln N / n)``; untried first.
* ``uniform``: a uniform choice among the candidates (learning off).
* ``first``: the first matching playbook in config order (learning off, deterministic).

Ties go to the shorter mean time to resolve, then to config order.

Exploration is said, not hidden: when a learning strategy (thompson, ucb) chooses a
playbook whose posterior mean is below that of another candidate it could run, the
decision is marked ``explored`` and names that ``best_known`` playbook (``missions
explain``: "explore   yes: tried X although Y has the better record").

Blocking: the caller may name candidates that are not to run automatically, with the
reason (demoted for this symptom by :func:`demotion`, or failed twice already in this
incident). When every candidate is blocked the mission escalates to a human. Learning
only ever chooses *which* playbook; the risk policy still decides whether it runs
without approval.

Demotion (:func:`demotion`) looks at this host's own evidence only: a playbook is
demoted when its success ratio is below ``demote_below`` *and* it failed in at least
``demote_after`` distinct incidents whose failures span at least ``demote_span``
seconds, *and* in ``demote_after`` distinct incidents a step of the playbook itself
failed (one step failure is not enough: see below). Failures
fade: one older than ``half_life`` no longer counts. Imported knowledge never demotes
(or saves) a playbook by itself.

Why "a step of its own": graced cannot tell who caused a sample. Anyone who can hold a
symptom (write a watched file, keep a port busy, load the host) can make a playbook
whose steps all succeeded look like a failure, by putting the symptom back before the
verification ends. Such verification failures count in the record (the ranking prefers
the playbook that clears the symptom) but never demote alone; a playbook's own command
failing (non-zero exit, timeout) is evidence the symptom's author does not control
-- mostly: a step can be made to fail by whoever owns what it acts on (a file in a
sticky world-writable directory the step must remove). So demotion needs the playbook's
own steps to fail in ``demote_after`` distinct incidents, and a demoted playbook that is
the only candidate for a symptom is still run once in each incident before a human is
asked (the caller's rule, :meth:`graced.learning.Learning.blocked`): a real fault gets
its fix, and one who makes the fix fail costs one run per incident.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from ..protocol.text import count

STRATEGIES = ("thompson", "ucb", "uniform", "first")
BETA_CAP = 1e6  # Beta parameters are clamped here: betavariate stays O(1)
MAX_SECONDS = 7 * 86400.0


def finite(x: float, upper: float = BETA_CAP) -> float:
    """``x`` clamped into [0, upper]; NaN and -inf become 0, +inf becomes ``upper``."""
    try:
        if x != x or x <= 0:  # NaN, negatives and -0.0
            return 0.0
        return min(float(x), upper)
    except (OverflowError, TypeError):  # an int too large for a float, or not a number
        return upper if isinstance(x, int) and x > 0 else 0.0


@dataclass
class Record:
    """A playbook's (effective) runs for one symptom."""

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
        return self.successes / self.runs if self.runs > 0 else None

    @property
    def mean(self) -> float:
        """Posterior mean of the success probability under a Beta(1, 1) prior."""
        return (1 + self.successes) / (2 + self.runs)

    @property
    def mttr(self) -> float | None:
        if self.ttr_count <= 1e-9:
            return None
        return min(self.ttr_total / self.ttr_count, MAX_SECONDS)

    def add(self, other: Record, weight: float = 1.0) -> None:
        self.successes += weight * other.successes
        self.failures += weight * other.failures
        self.ttr_total += weight * other.ttr_total
        self.ttr_count += weight * other.ttr_count

    def bounded(self) -> Record:
        """A copy with every figure finite, non-negative and under :data:`BETA_CAP`."""
        count = finite(self.ttr_count)
        return Record(finite(self.successes), finite(self.failures),
                      finite(self.ttr_total, MAX_SECONDS * max(count, 1.0)), count)


@dataclass
class Decision:
    """What the ranking chose and the figures behind it (stored on the mission)."""

    strategy: str
    chosen: str | None
    escalate: bool
    reason: str
    candidates: list[dict[str, Any]] = field(default_factory=list)
    # A learning strategy chose a playbook although another it could run has the better
    # record (a higher posterior mean): exploration, and that playbook (else None).
    explored: bool = False
    best_known: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "chosen": self.chosen, "escalate": self.escalate,
                "reason": self.reason, "candidates": self.candidates,
                "explored": self.explored, "best_known": self.best_known}


class Fail(NamedTuple):
    """One credited failure: its incident, when, and whether a step of the playbook
    itself failed (``own``) rather than the symptom staying after every step succeeded."""

    incident: int
    at: float
    own: bool = True


def demotion(local: Record, fails: list[Fail], *, after: int, below: float,
             span: float, now: float | None = None,
             fade: float = math.inf) -> tuple[bool, str | None]:
    """Is a playbook demoted for a symptom, on this host's own evidence?

    ``local`` is the (decayed) local record, ``fails`` the failures, oldest first; an
    incident counts once, from its first failure, and a failure older than ``fade``
    seconds (before ``now``) not at all. Returns (demoted, held): ``held`` says which
    setting kept a poor record from demoting it, when one did."""
    ratio = local.ratio
    if ratio is None or ratio >= below:
        return False, None
    first: dict[int, float] = {}
    own: set[int] = set()
    for f in fails:
        if now is not None and now - f.at > fade:
            continue  # faded out
        first.setdefault(f.incident, f.at)
        if f.own:
            own.add(f.incident)
    distinct = sorted(first.items(), key=lambda kv: kv[1])
    owned = sum(1 for incident, _ in distinct if incident in own)
    low = f"success {ratio:.0%} is below {below:.0%}"
    if not distinct:
        return False, f"{low}, but none of its failures is recent enough (half_life) to count"
    if not owned:
        # Said from the first such failure: more of them never demote it.
        return False, (f"{low}, but its steps always succeeded and the symptom stayed: "
                       "evidence anyone who can hold the symptom can forge, which never "
                       "demotes alone, however often it happens (docs/security.md)")
    if owned < after:
        return False, (f"{low}, but its own steps failed in "
                       f"{count(owned, 'distinct incident')} within half_life and demotion "
                       f"needs {after} ([learning] demote_after; docs/security.md)")
    recent = distinct[-after:] if after > 0 else []
    took = recent[-1][1] - recent[0][1] if recent else 0.0
    if took < span:
        return False, (f"{low}, but its last {after} failing incidents span {took:.0f} s "
                       f"and demotion needs {span:g} s ([learning] demote_span)")
    return True, None


def demoted(rec: Record, demote_after: int, demote_below: float) -> bool:
    """The ratio rule alone (for a record with no incident history: a simulation)."""
    ratio = rec.ratio
    return rec.runs >= demote_after and ratio is not None and ratio < demote_below


def _r(x: float | None, nd: int = 4) -> float | None:
    return None if x is None else round(x, nd)


def rank(candidates: list[tuple[str, str]], records: dict[str, Record], *, strategy: str,
         rng: random.Random, blocked: dict[str, str] | None = None,
         exploration: float = 1.0) -> Decision:
    """Choose among ``candidates`` (name, risk), in config order, by their ``records``;
    ``blocked`` names candidates not to run automatically, and why."""
    if not candidates:
        return Decision(strategy, None, False, "no playbook matches this mission")
    learning = strategy in ("thompson", "ucb")
    blocked = blocked if learning and blocked else {}
    rows: list[dict[str, Any]] = []
    recs = {n: records.get(n, Record()).bounded() for n, _ in candidates}
    total_runs = sum(r.runs for r in recs.values())
    for order, (name, risk) in enumerate(candidates):
        rec = recs[name]
        if strategy == "thompson":
            draw = rng.betavariate(1 + rec.successes, 1 + rec.failures)
            score = rec.mean + min(max(exploration, 0.0), 1.0) * (draw - rec.mean)
        elif strategy == "ucb":
            score = (math.inf if rec.runs < 1e-9 else
                     rec.mean + math.sqrt(2 * math.log(max(total_runs, 1.0)) / rec.runs))
        elif strategy == "uniform":
            score = rng.random()
        else:
            score = float(len(candidates) - order)
        rows.append({"playbook": name, "risk": risk, "successes": _r(rec.successes, 2),
                     "failures": _r(rec.failures, 2), "runs": _r(rec.runs, 2),
                     "ratio": _r(rec.ratio), "mean": _r(rec.mean), "score": score,
                     "mttr_s": _r(rec.mttr, 3), "demoted": name in blocked,
                     "blocked": blocked.get(name), "order": order})
    eligible = [r for r in rows if not r["demoted"]]
    for r in rows:
        r["score"] = None if math.isinf(r["score"]) else _r(r["score"])
    if not eligible:
        why = "; ".join(f"{r['playbook']}: {r['blocked']}" for r in rows)
        return Decision(strategy, None, True,
                        f"every matching playbook keeps failing for this symptom ({why}); "
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
    skipped = [f"{r['playbook']} ({r['blocked']})" for r in rows if r["demoted"]]
    reason = f"{best['playbook']}: {why}"
    # The best known record: the highest posterior mean (then the quicker fix, then
    # config order), as ordered() ranks playbooks; exploring is choosing below it.
    known = min(eligible, key=lambda r: (-r["mean"], r["mttr_s"] if r["mttr_s"] is not None
                                         else math.inf, r["order"]))
    explored = learning and known["mean"] > best["mean"]
    if skipped:
        reason += f"; not run automatically: {', '.join(skipped)}"
    return Decision(strategy, best["playbook"], False, reason, rows, explored,
                    known["playbook"] if explored else None)


def ordered(records: dict[str, Record]) -> list[tuple[str, Record]]:
    """Playbooks best first, deterministically: posterior mean, then time to resolve."""
    return sorted(records.items(), key=lambda kv: (
        -kv[1].mean, kv[1].mttr if kv[1].mttr is not None else math.inf, kv[0]))
