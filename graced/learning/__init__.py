"""The learning loop: outcome memory, similar missions, playbook ranking, knowledge base.

:class:`Learning` is the trio-facing shell. The pure parts live in
:mod:`.ranking` (the choice), :mod:`.knowledge` (patterns) and :mod:`.memory` (the SQL).

* :meth:`Learning.outcome` is called with every mission that reaches a final state (or
  ``interrupted``); it returns the writes that store the outcome and update the
  patterns, which the caller commits with the mission's event, then the ``learning.*``
  events to publish after it.
* :meth:`Learning.consult` is called by the executor before it chooses a playbook: it
  looks up similar past missions (in a worker thread), ranks the candidates and records
  both on the mission.
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Any

from ..config import LearningConfig, PlaybookConfig
from ..journal import Write
from ..missions.engine import Mission
from ..readers import SharedReader
from . import memory
from .knowledge import Knowledge
from .ranking import Decision, Record, demoted, rank

log = logging.getLogger("graced.learning")

Event = tuple[str, dict[str, Any]]


class Learning:
    """Owns the knowledge base and a read connection for lookups."""

    def __init__(self, config: LearningConfig, knowledge: Knowledge, journal_path: Path,
                 *, rng: random.Random | None = None) -> None:
        self.config = config
        self.knowledge = knowledge
        self.rng = rng or random.Random()
        self._reads = SharedReader(lambda: memory.MemoryReader(journal_path))

    def close(self) -> None:
        self._reads.close()

    async def read(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(reader, ...)`` in a worker thread on the lookup connection."""
        return await self._reads.run(lambda reader: fn(reader, *args, **kwargs))

    # -- before acting -----------------------------------------------------------

    async def similar(self, m: Mission, limit: int | None = None) -> list[dict[str, Any]]:
        return list(await self.read(
            memory.MemoryReader.similar, detector=m.detector, kind=m.kind, subject=m.subject,
            severity=m.severity, summary=m.summary, before=m.id,
            limit=limit or self.config.similar_limit))

    def records(self, m: Mission, names: list[str],
                similar: list[dict[str, Any]]) -> dict[str, Record]:
        """Each candidate's record: this symptom's history, plus similar symptoms' runs
        down-weighted by ``text_weight``."""
        exact = self.knowledge.records(memory.signature(m.detector, m.subject))
        out = {n: Record() for n in names}
        for n in names:
            if n in exact:
                out[n].add(exact[n])
        for s in similar:
            if s["match"] == "same detector and subject" or s["playbook"] not in out \
                    or s["success"] is None:
                continue
            out[s["playbook"]].add(Record(
                successes=float(s["success"]), failures=float(1 - s["success"]),
                ttr_total=float(s["ttr"] or 0.0) if s["success"] else 0.0,
                ttr_count=1.0 if s["success"] and s["ttr"] is not None else 0.0),
                self.config.text_weight)
        return out

    async def consult(self, m: Mission, candidates: list[PlaybookConfig]) -> Decision:
        """Look up similar missions and rank ``candidates``; records both on ``m``."""
        started = time.perf_counter()
        try:
            similar = await self.similar(m)
        except Exception as exc:  # noqa: BLE001 - memory must never stop a remediation
            log.warning("similar-mission lookup failed: %s", exc)
            similar = []
        lookup_ms = (time.perf_counter() - started) * 1000
        names = [p.name for p in candidates]
        decision = rank([(p.name, p.risk) for p in candidates], self.records(m, names, similar),
                        strategy=self.config.strategy, rng=self.rng,
                        demote_after=self.config.demote_after,
                        demote_below=self.config.demote_below)
        m.similar = similar
        same = sum(1 for s in similar if s["match"] == "same detector and subject")
        m.decision = {**decision.as_dict(), "lookup_ms": round(lookup_ms, 3),
                      "similar": {"found": len(similar), "same_key": same,
                                  "text": len(similar) - same,
                                  "resolved": sum(1 for s in similar
                                                  if s["outcome"] == "resolved")}}
        return decision

    def consulted_event(self, m: Mission) -> Event:
        d = m.decision or {}
        return ("learning.consulted", {
            "mission": m.id, "signature": memory.signature(m.detector, m.subject),
            "similar": d.get("similar"), "strategy": d.get("strategy"),
            "chosen": d.get("chosen"), "escalate": d.get("escalate"),
            "lookup_ms": d.get("lookup_ms")})

    # -- after the outcome -------------------------------------------------------

    def outcome(self, m: Mission, now: float) -> tuple[list[Write], list[Event]]:
        """Store a final (or interrupted) mission's outcome; learn from a playbook run."""
        if m.state not in memory.OUTCOME_STATES:
            return [], []
        o = memory.outcome_of(m)
        writes = memory.outcome_writes(o)
        events: list[Event] = []
        if o["success"] is None or not o["playbook"]:
            return writes, events
        sig = o["signature"]
        before = self.knowledge.records(sig).get(o["playbook"], Record())
        was_demoted = demoted(before, self.config.demote_after, self.config.demote_below)
        more, change = self.knowledge.learn(
            sig=sig, detector=m.detector, subject=m.subject, playbook=o["playbook"],
            success=bool(o["success"]), ttr=o["ttr"], now=now)
        writes += more
        rec = self.knowledge.records(sig)[o["playbook"]]
        events.append(("learning.pattern_learned" if change["new"] else
                       "learning.pattern_updated", {
                           "pattern": sig, "playbook": o["playbook"], "mission": m.id,
                           "success": bool(o["success"]), "successes": rec.successes,
                           "failures": rec.failures, "posterior_mean": round(rec.mean, 4),
                           "mttr_s": None if rec.mttr is None else round(rec.mttr, 3)}))
        if not was_demoted and demoted(rec, self.config.demote_after,
                                       self.config.demote_below):
            events.append(("learning.demoted", {
                "pattern": sig, "playbook": o["playbook"], "successes": rec.successes,
                "failures": rec.failures,
                "reason": f"success {rec.successes:g}/{rec.runs:g} is below "
                          f"{self.config.demote_below:.0%} after {self.config.demote_after}+ "
                          "runs: no longer run automatically for this symptom"}))
        return writes, events

    # -- reporting -----------------------------------------------------------------

    def patterns(self) -> list[dict[str, Any]]:
        cfg = self.config
        return [self.knowledge.summary(sig, cfg.demote_after, cfg.demote_below)
                for sig in sorted(self.knowledge.patterns)]

    async def stats(self, now: float, weeks: int = 8, days: int = 14) -> dict[str, Any]:
        """Success rate per week, patterns added per day, share that consulted memory."""
        def compute(reader: memory.MemoryReader) -> dict[str, Any]:
            per_week = reader.query(
                "SELECT strftime('%Y-W%W', closed_at, 'unixepoch') AS week, "
                "SUM(success), COUNT(*) FROM outcomes WHERE success IS NOT NULL "
                "AND closed_at >= ? GROUP BY week ORDER BY week", (now - weeks * 7 * 86400,))
            per_day = reader.query(
                "SELECT date(MIN(first_seen), 'unixepoch') AS day, signature FROM patterns "
                "GROUP BY signature HAVING MIN(first_seen) >= ?", (now - days * 86400,))
            totals = reader.query(
                "SELECT COUNT(*), COALESCE(SUM(consulted), 0), COALESCE(SUM(ran), 0), "
                "COALESCE(SUM(success), 0), "
                "COALESCE(SUM(CASE WHEN closed_at >= ? THEN success END), 0), "
                "COALESCE(SUM(CASE WHEN closed_at >= ? AND success IS NOT NULL "
                "THEN 1 END), 0) FROM outcomes", (now - 7 * 86400, now - 7 * 86400))[0]
            return {"per_week": per_week, "per_day": per_day, "totals": totals}

        raw = await self.read(compute)
        days_count: dict[str, int] = {}
        for day, _ in raw["per_day"]:
            days_count[day] = days_count.get(day, 0) + 1
        outcomes, consulted, ran, wins, wins7, runs7 = raw["totals"]
        return {
            "strategy": self.config.strategy,
            "outcomes": outcomes, "playbook_runs": ran, "successes": wins,
            "patterns": len(self.knowledge.patterns),
            "success_rate": round(wins / ran, 4) if ran else None,
            "success_rate_7d": round(wins7 / runs7, 4) if runs7 else None,
            "consulted_share": round(consulted / outcomes, 4) if outcomes else None,
            "success_rate_per_week": [
                {"week": w, "successes": s, "runs": n, "rate": round(s / n, 4)}
                for w, s, n in raw["per_week"]],
            "patterns_added_per_day": [{"day": d, "patterns": n}
                                       for d, n in sorted(days_count.items())],
        }
