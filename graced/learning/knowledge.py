"""The knowledge base: symptom signature -> playbook -> record, per source. Pure code.

A *pattern* is what memory says about one symptom (``detector:subject``): each playbook
run for it, its successes, failures and time to resolve. The local source grows with
every outcome; an imported file adds (or replaces) the records of the host that exported
it, so importing the same file twice counts it once. Rankings use the sum over sources.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..journal import Write
from .ranking import Record, demoted, ordered

EXPORT_FORMAT = "grace-knowledge"
EXPORT_VERSION = 1
LOCAL = "local"

_NUMERIC = ("successes", "failures", "ttr_total", "ttr_count", "first_seen", "last_seen")


@dataclass
class Entry:
    detector: str
    subject: str
    record: Record
    first_seen: float
    last_seen: float


def _upsert(sig: str, playbook: str, source: str, e: Entry) -> Write:
    r = e.record
    return ("INSERT OR REPLACE INTO patterns (signature, playbook, source, detector, subject, "
            "successes, failures, ttr_total, ttr_count, first_seen, last_seen) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (sig, playbook, source, e.detector, e.subject, r.successes, r.failures,
             r.ttr_total, r.ttr_count, e.first_seen, e.last_seen))


class Knowledge:
    """Patterns in memory, loaded from and written back to the ``patterns`` table."""

    def __init__(self, rows: Iterable[tuple[Any, ...]] = ()) -> None:
        self.patterns: dict[str, dict[str, dict[str, Entry]]] = {}
        for (sig, pb, source, det, subj, s, f, tt, tc, first, last) in rows:
            self.patterns.setdefault(str(sig), {}).setdefault(str(pb), {})[str(source)] = Entry(
                str(det), str(subj), Record(float(s), float(f), float(tt), float(tc)),
                float(first), float(last))

    def records(self, sig: str) -> dict[str, Record]:
        """Each playbook's record for a signature, summed over sources."""
        out: dict[str, Record] = {}
        for pb, sources in self.patterns.get(sig, {}).items():
            total = Record()
            for e in sources.values():
                total.add(e.record)
            out[pb] = total
        return out

    def learn(self, *, sig: str, detector: str, subject: str, playbook: str, success: bool,
              ttr: float | None, now: float) -> tuple[list[Write], dict[str, Any]]:
        """Count one run; returns the write and what changed (for a ``learning.*`` event)."""
        sources = self.patterns.setdefault(sig, {}).setdefault(playbook, {})
        new = LOCAL not in sources
        e = sources.setdefault(LOCAL, Entry(detector, subject, Record(), now, now))
        if success:
            e.record.successes += 1
            if ttr is not None:
                e.record.ttr_total += ttr
                e.record.ttr_count += 1
        else:
            e.record.failures += 1
        e.last_seen = now
        return [_upsert(sig, playbook, LOCAL, e)], {"new": new}

    def summary(self, sig: str, demote_after: int, demote_below: float) -> dict[str, Any]:
        """One pattern as ``knowledge ls`` shows it: the best playbook and its figures."""
        recs = self.records(sig)
        entries = [e for srcs in self.patterns[sig].values() for e in srcs.values()]
        playbooks: list[dict[str, Any]] = []
        for pb, rec in ordered(recs):
            playbooks.append({
                "playbook": pb, "successes": rec.successes, "failures": rec.failures,
                "runs": rec.runs, "success_rate": None if rec.ratio is None else round(
                    rec.ratio, 4), "posterior_mean": round(rec.mean, 4),
                "mttr_s": None if rec.mttr is None else round(rec.mttr, 3),
                "demoted": demoted(rec, demote_after, demote_below),
                "sources": sorted(self.patterns[sig][pb])})
        best = next((p for p in playbooks if not p["demoted"]), playbooks[0] if playbooks
                    else None)
        runs = sum(p["runs"] for p in playbooks)
        wins = sum(p["successes"] for p in playbooks)
        mttrs = [(r.ttr_total, r.ttr_count) for r in recs.values() if r.ttr_count]
        return {
            "pattern": sig, "detector": entries[0].detector, "subject": entries[0].subject,
            "best_playbook": best["playbook"] if best else None,
            "best_success_rate": best["success_rate"] if best else None,
            "success_rate": round(wins / runs, 4) if runs else None,
            "count": runs,
            "mttr_s": round(sum(t for t, _ in mttrs) / sum(c for _, c in mttrs), 3)
            if mttrs else None,
            "first_seen": min(e.first_seen for e in entries),
            "last_seen": max(e.last_seen for e in entries),
            "playbooks": playbooks,
        }

    def export(self, source_id: str, host: str, now: float) -> dict[str, Any]:
        """Every pattern, summed over sources, as the export file's body."""
        patterns = []
        for sig, pbs in sorted(self.patterns.items()):
            for pb, sources in sorted(pbs.items()):
                rec = Record()
                for e in sources.values():
                    rec.add(e.record)
                es = list(sources.values())
                patterns.append({
                    "signature": sig, "detector": es[0].detector, "subject": es[0].subject,
                    "playbook": pb, "successes": rec.successes, "failures": rec.failures,
                    "ttr_total": rec.ttr_total, "ttr_count": rec.ttr_count,
                    "first_seen": min(e.first_seen for e in es),
                    "last_seen": max(e.last_seen for e in es)})
        return {"format": EXPORT_FORMAT, "version": EXPORT_VERSION, "source": source_id,
                "host": host, "exported_at": now, "patterns": patterns}

    def import_(self, source: str, patterns: list[dict[str, Any]],
                replace: bool) -> list[Write]:
        """Take another host's patterns as source ``source`` (checked by :func:`check`)."""
        writes: list[Write] = []
        if replace:
            for pbs in self.patterns.values():
                for sources in pbs.values():
                    sources.pop(source, None)
            writes.append(("DELETE FROM patterns WHERE source = ?", (source,)))
        for p in patterns:
            e = Entry(p["detector"], p["subject"],
                      Record(p["successes"], p["failures"], p["ttr_total"], p["ttr_count"]),
                      p["first_seen"], p["last_seen"])
            self.patterns.setdefault(p["signature"], {}).setdefault(p["playbook"], {})[
                source] = e
            writes.append(_upsert(p["signature"], p["playbook"], source, e))
        return writes


def check(patterns: Any) -> list[dict[str, Any]]:
    """Validate imported patterns; raises ValueError naming the first bad field."""
    if not isinstance(patterns, list):
        raise ValueError("patterns: must be a list")
    out = []
    for i, p in enumerate(patterns):
        where = f"patterns[{i}]"
        if not isinstance(p, dict):
            raise ValueError(f"{where}: must be an object")
        for key in ("signature", "detector", "subject", "playbook"):
            if not isinstance(p.get(key), str) or not p[key] or len(p[key]) > 1000:
                raise ValueError(f"{where}.{key}: must be a non-empty string")
        item = {k: p[k] for k in ("signature", "detector", "subject", "playbook")}
        for key in _NUMERIC:
            v = p.get(key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or v < 0:
                raise ValueError(f"{where}.{key}: must be a non-negative number")
            item[key] = float(v)
        if item["ttr_count"] > item["successes"]:
            raise ValueError(f"{where}.ttr_count: cannot exceed successes")
        out.append(item)
    return out
