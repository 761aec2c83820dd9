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

import trio

from ..config import LearningConfig, PlaybookConfig
from ..journal import Write
from ..missions.engine import Mission, ran
from ..readers import SharedReader
from . import memory
from .knowledge import LOCAL, PER_INCIDENT, Knowledge, Settings
from .ranking import Decision, Record, rank

log = logging.getLogger("graced.learning")

Event = tuple[str, dict[str, Any]]


def settings(config: LearningConfig) -> Settings:
    return Settings(half_life=config.half_life, import_weight=config.import_weight,
                    demote_after=config.demote_after, demote_below=config.demote_below,
                    demote_span=config.demote_span, retry_after=config.retry_after)


def credit(m: Mission, knowledge: Knowledge, sig: str) -> tuple[bool | None, str | None]:
    """Does this outcome count as evidence about its playbook, and if not, why not?

    Returns (success, None) for a credited run, or (None, reason). A run counts only if
    the symptom was present when it started; a success only if every step ran to
    completion. (A playbook runs at most PER_INCIDENT times in one incident, so one
    incident adds at most that many failures.)"""
    o_success = None
    if ran(m) and m.state == "resolved":
        o_success = True
    elif ran(m) and m.state == "failed":
        o_success = False
    if o_success is None or not m.playbook:
        return None, None
    own = [st["graced_failure"] for st in m.steps if st.get("graced_failure")]
    if own:  # graced's own exhaustion, not the playbook's failure: never a demotion
        return None, f"{own[0]}: graced's failure, not the playbook's; not credited"
    if m.symptom_at_start is False:
        return None, ("the symptom had cleared before the playbook started: "
                      "not credited either way")
    if o_success is False and any(st.get("graced_error") for st in m.steps):
        return None, ("a step failed inside graced itself, not by the playbook's doing: "
                      "not credited either way")
    if o_success and (not m.steps or not all(st.get("ok") for st in m.steps)
                      or any(t.get("to") == "interrupted" for t in m.timeline)):
        return None, "the playbook's steps did not run to completion: no success credited"
    return o_success, None


class Learning:
    """Owns the knowledge base and a read connection for lookups."""

    def __init__(self, config: LearningConfig, knowledge: Knowledge, journal_path: Path,
                 *, rng: random.Random | None = None) -> None:
        self.knowledge = knowledge
        self.config = config
        self.rng = rng or random.Random()
        self._reads = SharedReader(lambda: memory.MemoryReader(journal_path))

    @property
    def config(self) -> LearningConfig:
        return self._config

    @config.setter
    def config(self, value: LearningConfig) -> None:
        """Set on start and on a config reload; the knowledge base follows."""
        self._config = value
        self.knowledge.settings = settings(value)

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
                similar: list[dict[str, Any]], now: float) -> dict[str, Record]:
        """Each candidate's record: this symptom's history (local, decayed, plus the
        bounded prior), plus similar symptoms' runs down-weighted by ``text_weight``."""
        exact = self.knowledge.records(memory.signature(m.detector, m.subject), now)
        out = {n: Record() for n in names}
        for n in names:
            if n in exact:
                out[n].add(exact[n])
        for s in similar:
            # An outcome learning left out (held back: not credited) is no evidence
            # here either.
            if s["match"] == "same detector and subject" or s["playbook"] not in out \
                    or s["success"] not in (0, 1) or s.get("held_back"):
                continue
            ttr = s["ttr"] if isinstance(s["ttr"], (int, float)) else None
            out[s["playbook"]].add(Record(
                successes=float(s["success"]), failures=float(1 - s["success"]),
                ttr_total=float(ttr or 0.0) if s["success"] else 0.0,
                ttr_count=1.0 if s["success"] and ttr is not None else 0.0),
                self.config.text_weight)
        return {n: r.bounded() for n, r in out.items()}

    def blocked(self, m: Mission, names: list[str], now: float) -> tuple[dict[str, str],
                                                                         list[str]]:
        """Candidates not to run automatically (demoted, or failed in this incident), and
        notes on demotions that the settings held back."""
        sig = memory.signature(m.detector, m.subject)
        out: dict[str, str] = {}
        notes: list[str] = []
        for n in names:
            is_demoted, held = self.knowledge.demotion(sig, n, now)
            tried = m.incident is not None and self.knowledge.failures_in(
                sig, n, m.incident) > 0
            if is_demoted and self.knowledge.retry_due(sig, n, now):
                notes.append(f"{n}: demoted, but its last failure was "
                             f"{self.config.retry_after:g} s ago or more: it may be tried "
                             "again ([learning] retry_after)")
            elif is_demoted and len(names) == 1 and not tried:
                # Whoever can make its step fail must not leave a real fault unfixed:
                # the only playbook for the symptom runs once an incident.
                notes.append(f"{n}: demoted, but the only playbook for this symptom: "
                             "tried once in this incident before a human is asked")
            elif is_demoted:
                out[n] = (f"demoted: success below {self.config.demote_below:.0%} in "
                          f"{self.config.demote_after}+ incidents")
            elif m.incident is not None and self.knowledge.failures_in(
                    sig, n, m.incident) >= PER_INCIDENT:
                out[n] = f"failed {PER_INCIDENT} times in this incident"
            elif held:
                notes.append(f"{n}: {held}")
        return out, notes

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
        now = time.time()
        blocked, notes = self.blocked(m, names, now)
        decision = rank([(p.name, p.risk) for p in candidates],
                        self.records(m, names, similar, now), strategy=self.config.strategy,
                        rng=self.rng, blocked=blocked, exploration=self.config.exploration)
        sig = memory.signature(m.detector, m.subject)
        for c in decision.candidates:
            prior = self.knowledge.prior(sig, c["playbook"], now)
            c["prior"] = [round(prior.successes, 3), round(prior.failures, 3)]
            # Hosts may share a name: the daemon (its id's first 8) and key say which.
            c["imported_from"] = sorted({
                f"{e.host or '?'} (daemon {s[:8]}, key {e.kid or '?'})"
                for s, e in self.knowledge.patterns.get(sig, {}).get(
                    c["playbook"], {}).items() if s != LOCAL})
        m.similar = similar
        same = sum(1 for s in similar if s["match"] == "same detector and subject")
        m.decision = {**decision.as_dict(), "lookup_ms": round(lookup_ms, 3),
                      "held_back": notes,
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
            "explored": d.get("explored"), "best_known": d.get("best_known"),
            "lookup_ms": d.get("lookup_ms")})

    # -- after the outcome -------------------------------------------------------

    def outcome(self, m: Mission, now: float) -> tuple[list[Write], list[Event]]:
        """Store a final (or interrupted) mission's outcome; learn from a credited run.

        May set ``m.held_back`` (the caller stores the mission after this call)."""
        if m.state not in memory.OUTCOME_STATES:
            return [], []
        sig = memory.signature(m.detector, m.subject)
        events: list[Event] = []
        success, why_not = (None, None) if m.state == "interrupted" else credit(
            m, self.knowledge, sig)
        if why_not and m.held_back is None:
            m.held_back = {"setting": "credit", "reason": why_not}
        o = memory.outcome_of(m)
        writes = memory.outcome_writes(o)
        if success is None or not o["playbook"]:
            return writes, events
        was_demoted, _ = self.knowledge.demotion(sig, o["playbook"], now)
        # A failure is the playbook's own when one of its steps failed; when every step
        # succeeded and the symptom stayed, whoever holds the symptom may have caused it.
        own = not all(st.get("ok") for st in m.steps)
        more, new = self.knowledge.learn(
            sig=sig, detector=m.detector, subject=m.subject, playbook=o["playbook"],
            success=success, ttr=o["ttr"], now=now, incident=m.incident or m.id, own=own)
        if not more:  # over the caps (a configuration of more than 64 playbooks)
            log.warning("no room for %s on %s: the outcome of mission %s is "
                        "stored, not learned", o["playbook"], sig, m.id)
            return writes, events
        writes += more
        rec = self.knowledge.local(sig, o["playbook"], now)
        entry = self.knowledge.patterns[sig][o["playbook"]][LOCAL]
        events.append(("learning.pattern_learned" if new else
                       "learning.pattern_updated", {
                           "pattern": sig, "playbook": o["playbook"], "mission": m.id,
                           "success": success, "successes": entry.successes,
                           "failures": entry.failures, "posterior_mean": round(rec.mean, 4),
                           "mttr_s": None if rec.mttr is None else round(rec.mttr, 3)}))
        is_demoted, _ = self.knowledge.demotion(sig, o["playbook"], now)
        if not was_demoted and is_demoted:
            events.append(("learning.demoted", {
                "pattern": sig, "playbook": o["playbook"], "successes": entry.successes,
                "failures": entry.failures,
                "reason": f"success {entry.successes}/{entry.successes + entry.failures} is "
                          f"below {self.config.demote_below:.0%}, failing in "
                          f"{self.config.demote_after}+ incidents over "
                          f"{self.config.demote_span:g}+ s: no longer run automatically "
                          "for this symptom"}))
        return writes, events

    def reset(self, target: str) -> tuple[list[Write], int]:
        return self.knowledge.reset(target)

    # -- reporting -----------------------------------------------------------------

    async def patterns(self, now: float, limit: int = 1000,
                       offset: int = 0) -> list[dict[str, Any]]:
        """One page of patterns, most recently seen first, built in a worker thread
        within a budget of records and bytes (:meth:`Knowledge.summaries`): work in
        proportion to the page, however many were imported."""
        return list(await self.off_loop(self.knowledge.summaries, now, limit, offset))

    async def summary(self, sig: str, now: float) -> dict[str, Any]:
        """One pattern (up to 64 playbooks of 101 sources), in a worker thread."""
        return dict(await self.off_loop(self.knowledge.summary, sig, now))

    async def off_loop(self, fn: Any, *args: Any) -> Any:
        """Read the knowledge base in a worker thread; again if a learned outcome or an
        import changed it meanwhile (a dict resized under the reader)."""
        for _ in range(5):
            try:
                return await trio.to_thread.run_sync(fn, *args)
            except (RuntimeError, KeyError, StopIteration):
                continue
        return await trio.to_thread.run_sync(fn, *args)

    async def held_back(self, sig: str | None = None) -> dict[str, dict[str, int]]:
        """Per pattern, how many outcomes learning left out, by the setting responsible."""
        rows = await self.read(lambda r: r.query(
            "SELECT signature, held_back, COUNT(*) FROM outcomes WHERE held_back IS NOT NULL"
            + (" AND signature = ?" if sig else "") + " GROUP BY signature, held_back",
            (sig,) if sig else ()))
        out: dict[str, dict[str, int]] = {}
        for s, setting, n in rows:
            out.setdefault(str(s), {})[str(setting)] = int(n)
        return out

    async def stats(self, now: float, weeks: int = 8, days: int = 14) -> dict[str, Any]:
        """Success rate per week, patterns added per day, share that consulted memory."""
        def compute(reader: memory.MemoryReader) -> dict[str, Any]:
            per_week = reader.query(
                "SELECT strftime('%Y-W%W', closed_at, 'unixepoch') AS week, "
                "SUM(success), COUNT(*) FROM outcomes WHERE success IS NOT NULL "
                "AND closed_at >= ? GROUP BY week ORDER BY week", (now - weeks * 7 * 86400,))
            # Every pattern row is read (100,000 imported ones: a fifth of a second):
            # status (days=0) does without.
            per_day = reader.query(
                "SELECT date(MIN(first_seen), 'unixepoch') AS day, signature FROM patterns "
                "GROUP BY signature HAVING MIN(first_seen) >= ?",
                (now - days * 86400,)) if days > 0 else []
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
