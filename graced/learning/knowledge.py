"""The knowledge base: symptom signature -> playbook -> record, per source. Pure code.

A *pattern* is what memory says about one symptom (``detector:subject``): each playbook
run for it, its successes, failures and time to resolve. The ``local`` source grows with
every credited outcome on this host; an imported file adds (or replaces) the records of
the daemon that exported it, so importing the same file twice counts it once.

What the ranking sees (:meth:`Knowledge.records`):

* local evidence, decayed: each outcome weighs ``0.5 ** (age / half_life)``;
* imported evidence as a *prior*: each imported record is scaled down to at most
  ``import_weight`` runs, fades with the same half-life from when it was imported, and
  shrinks as local runs of that playbook accumulate (factor ``w / (w + local runs)``).
  All imports together weigh at most ``import_weight`` runs.

Demotion (:meth:`Knowledge.demotion`) looks at local evidence only, so nothing is
demoted or kept on imported figures alone. Stored rows are checked with the export
bounds (:mod:`graced.protocol.knowledge`) when graced starts; rows that fail are
quarantined, never used.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ..journal import Write
from ..protocol.knowledge import (
    EXPORT_FORMAT,
    EXPORT_VERSION,
    MAX_COUNT,
    MAX_EPOCH,
    MAX_RECORDS,
    check_record,
    seconds,
)
from .ranking import Record, demotion, ordered

LOCAL = "local"
MAX_FAILS = 20  # failures (incident, time) remembered per local record
PER_INCIDENT = 2  # runs of a playbook that failed in one incident before it is skipped

_COLS = ("signature, playbook, source, detector, subject, successes, failures, ttr_total, "
         "ttr_count, first_seen, last_seen, data")
SELECT = f"SELECT {_COLS} FROM patterns"


@dataclass
class Entry:
    """One playbook's record for one symptom from one source."""

    detector: str
    subject: str
    successes: int = 0
    failures: int = 0
    ttr_total: float = 0.0
    ttr_count: int = 0
    first_seen: float = 0.0
    last_seen: float = 0.0
    # local: decayed evidence as of w_at, and the counted failures (incident, time)
    w_s: float = 0.0
    w_f: float = 0.0
    w_at: float = 0.0
    fails: list[tuple[int, float]] = field(default_factory=list)
    # imported: where from
    host: str = ""
    kid: str = ""
    imported_at: float = 0.0

    def data(self) -> dict[str, Any]:
        return {"w_s": self.w_s, "w_f": self.w_f, "w_at": self.w_at,
                "fails": [list(f) for f in self.fails], "host": self.host, "kid": self.kid,
                "imported_at": self.imported_at}

    def raw(self) -> Record:
        return Record(float(self.successes), float(self.failures), self.ttr_total,
                      float(self.ttr_count))


# (after, until]: the (pattern, playbook) keys of one chunk of an import; None ends open.
Span = tuple[tuple[str, str] | None, tuple[str, str] | None]


def in_span(key: tuple[str, str], span: Span | None) -> bool:
    if span is None:
        return True
    after, until = span
    return (after is None or key > after) and (until is None or key <= until)


def _decay(age: float, half_life: float) -> float:
    if half_life <= 0 or age <= 0:
        return 1.0
    return 0.5 ** min(age / half_life, 1000.0)


def _upsert(sig: str, playbook: str, source: str, e: Entry) -> Write:
    return (f"INSERT OR REPLACE INTO patterns ({_COLS}) VALUES "
            "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (sig, playbook, source, e.detector, e.subject, e.successes, e.failures,
             e.ttr_total, e.ttr_count, e.first_seen, e.last_seen, json.dumps(e.data())))


def parse_row(row: tuple[Any, ...]) -> tuple[str, str, str, Entry]:
    """A stored row, checked with the export bounds; raises ValueError naming the field."""
    (sig, pb, source, det, subj, s, f, tt, tc, first, last, data) = row
    rec = check_record({"signature": sig, "playbook": pb, "detector": det, "subject": subj,
                        "successes": s, "failures": f, "ttr_total": tt, "ttr_count": tc,
                        "first_seen": first, "last_seen": last}, "row")
    if not isinstance(source, str) or not source or len(source) > 200:
        raise ValueError("row.source: must be a non-empty string")
    try:
        extra = json.loads(data) if data else {}
    except (TypeError, ValueError):
        raise ValueError("row.data: not JSON") from None
    if not isinstance(extra, dict):
        raise ValueError("row.data: not an object")
    e = Entry(rec["detector"], rec["subject"], rec["successes"], rec["failures"],
              rec["ttr_total"], rec["ttr_count"], rec["first_seen"], rec["last_seen"])
    e.w_s = seconds(extra.get("w_s", e.successes), "row.data.w_s", MAX_COUNT)
    e.w_f = seconds(extra.get("w_f", e.failures), "row.data.w_f", MAX_COUNT)
    e.w_at = seconds(extra.get("w_at", e.last_seen), "row.data.w_at", MAX_EPOCH)
    e.imported_at = seconds(extra.get("imported_at", 0.0), "row.data.imported_at",
                            MAX_EPOCH)
    fails = extra.get("fails", [])
    if not isinstance(fails, list) or len(fails) > MAX_FAILS:
        raise ValueError("row.data.fails: not a short list")
    for item in fails:
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], int)
                and not isinstance(item[0], bool)):
            raise ValueError("row.data.fails: not [incident, time] pairs")
        e.fails.append((item[0], seconds(item[1], "row.data.fails", MAX_EPOCH)))
    for key in ("host", "kid"):
        v = extra.get(key, "")
        if not isinstance(v, str) or len(v) > 1000:
            raise ValueError(f"row.data.{key}: not a short string")
        setattr(e, key, v)
    return str(sig), str(pb), source, e


@dataclass
class Settings:
    """The [learning] figures the knowledge base needs."""

    half_life: float = 30 * 86400.0
    import_weight: float = 5.0
    demote_after: int = 3
    demote_below: float = 0.25
    demote_span: float = 3600.0


class Knowledge:
    """Patterns in memory, loaded from and written back to the ``patterns`` table.

    Rows that fail the bounds are left out and listed in :attr:`quarantined` as
    (signature, playbook, source, reason); the caller moves them aside."""

    def __init__(self, rows: Iterable[tuple[Any, ...]] = (),
                 settings: Settings | None = None) -> None:
        self.settings = settings or Settings()
        self.patterns: dict[str, dict[str, dict[str, Entry]]] = {}
        self.quarantined: list[tuple[Any, Any, Any, str]] = []
        per_source: dict[str, int] = {}
        for row in rows:
            try:
                sig, pb, source, e = parse_row(tuple(row))
            except (ValueError, TypeError, OverflowError) as exc:
                self.quarantined.append((row[0], row[1], row[2], str(exc)))
                continue
            per_source[source] = per_source.get(source, 0) + 1
            if per_source[source] > MAX_RECORDS:
                self.quarantined.append((sig, pb, source, f"source holds more than "
                                         f"{MAX_RECORDS} records"))
                continue
            self.patterns.setdefault(sig, {}).setdefault(pb, {})[source] = e

    # -- what the ranking sees -------------------------------------------------------

    def local(self, sig: str, playbook: str, now: float) -> Record:
        """This host's own evidence for a playbook, decayed to ``now``."""
        e = self.patterns.get(sig, {}).get(playbook, {}).get(LOCAL)
        if e is None:
            return Record()
        k = _decay(now - e.w_at, self.settings.half_life)
        return Record(e.w_s * k, e.w_f * k, e.ttr_total, float(e.ttr_count))

    def prior(self, sig: str, playbook: str, now: float) -> Record:
        """Imported evidence for a playbook as a bounded, fading prior."""
        st = self.settings
        sources = self.patterns.get(sig, {}).get(playbook, {})
        local = sources.get(LOCAL)
        local_runs = (local.successes + local.failures) if local else 0
        shrink = st.import_weight / (st.import_weight + local_runs) if st.import_weight else 0
        out = Record()
        for source, e in sources.items():
            if source == LOCAL:
                continue
            raw = e.raw()
            if raw.runs <= 0:
                continue
            scale = min(1.0, st.import_weight / raw.runs) * _decay(
                now - e.imported_at, st.half_life) * shrink
            out.add(Record(raw.successes, raw.failures), scale)
            if e.ttr_count:
                out.ttr_total += scale * e.ttr_total
                out.ttr_count += scale * e.ttr_count
        if out.runs > st.import_weight > 0:
            k = st.import_weight / out.runs
            out = Record(out.successes * k, out.failures * k, out.ttr_total * k,
                         out.ttr_count * k)
        return out

    def records(self, sig: str, now: float) -> dict[str, Record]:
        """Each playbook's effective record for a signature: local plus prior."""
        out: dict[str, Record] = {}
        for pb in self.patterns.get(sig, {}):
            rec = self.local(sig, pb, now)
            rec.add(self.prior(sig, pb, now))
            out[pb] = rec
        return out

    def fails(self, sig: str, playbook: str) -> list[tuple[int, float]]:
        e = self.patterns.get(sig, {}).get(playbook, {}).get(LOCAL)
        return list(e.fails) if e else []

    def demotion(self, sig: str, playbook: str, now: float) -> tuple[bool, str | None]:
        st = self.settings
        return demotion(self.local(sig, playbook, now), self.fails(sig, playbook),
                        after=st.demote_after, below=st.demote_below, span=st.demote_span)

    # -- learning ----------------------------------------------------------------------

    def learn(self, *, sig: str, detector: str, subject: str, playbook: str, success: bool,
              ttr: float | None, now: float, incident: int) -> tuple[list[Write], bool]:
        """Count one credited run; returns the write and whether the record is new."""
        sources = self.patterns.setdefault(sig, {}).setdefault(playbook, {})
        new = LOCAL not in sources
        e = sources.setdefault(LOCAL, Entry(detector, subject, first_seen=now, last_seen=now,
                                            w_at=now))
        k = _decay(now - e.w_at, self.settings.half_life)
        e.w_s, e.w_f, e.w_at = e.w_s * k, e.w_f * k, max(now, e.w_at)
        if success:
            e.successes = min(e.successes + 1, MAX_COUNT)
            e.w_s = min(e.w_s + 1, MAX_COUNT)
            if ttr is not None and math.isfinite(ttr) and ttr >= 0:
                e.ttr_total = min(e.ttr_total + min(ttr, 7 * 86400.0), 7 * 86400.0 * MAX_COUNT)
                e.ttr_count = min(e.ttr_count + 1, e.successes)
        else:
            e.failures = min(e.failures + 1, MAX_COUNT)
            e.w_f = min(e.w_f + 1, MAX_COUNT)
            e.fails = [*e.fails, (incident, now)][-MAX_FAILS:]
        e.last_seen = max(now, e.first_seen)
        return [_upsert(sig, playbook, LOCAL, e)], new

    def failures_in(self, sig: str, playbook: str, incident: int) -> int:
        return sum(1 for i, _ in self.fails(sig, playbook) if i == incident)

    def reset(self, target: str) -> tuple[list[Write], int]:
        """Forget every record of a pattern (``DETECTOR:SUBJECT``) or of a playbook."""
        removed = 0
        if target in self.patterns:
            removed = sum(len(s) for s in self.patterns.pop(target).values())
            return [("DELETE FROM patterns WHERE signature = ?", (target,))], removed
        for sig in list(self.patterns):
            sources = self.patterns[sig].pop(target, None)
            if sources:
                removed += len(sources)
            if not self.patterns[sig]:
                del self.patterns[sig]
        return [("DELETE FROM patterns WHERE playbook = ?", (target,))], removed

    # -- reporting -----------------------------------------------------------------------

    def summary(self, sig: str, now: float) -> dict[str, Any]:
        """One pattern as ``knowledge ls`` shows it: the best playbook and its figures,
        with which of them are local and which imported, and from whom."""
        recs = self.records(sig, now)
        entries = [e for srcs in self.patterns[sig].values() for e in srcs.values()]
        playbooks: list[dict[str, Any]] = []
        for pb, rec in ordered(recs):
            sources = self.patterns[sig][pb]
            local = sources.get(LOCAL)
            is_demoted, held = self.demotion(sig, pb, now)
            prior = self.prior(sig, pb, now)
            playbooks.append({
                "playbook": pb,
                "successes": local.successes if local else 0,
                "failures": local.failures if local else 0,
                "runs": (local.successes + local.failures) if local else 0,
                "success_rate": None if not local or not (local.successes + local.failures)
                else round(local.successes / (local.successes + local.failures), 4),
                "posterior_mean": round(rec.mean, 4),
                "mttr_s": None if rec.mttr is None else round(rec.mttr, 3),
                "demoted": is_demoted, "held_back": held,
                "weight": {"local_successes": round(rec.successes - prior.successes, 3),
                           "local_failures": round(rec.failures - prior.failures, 3),
                           "prior_successes": round(prior.successes, 3),
                           "prior_failures": round(prior.failures, 3)},
                "imported": [{"source": s, "host": e.host, "kid": e.kid,
                              "successes": e.successes, "failures": e.failures,
                              "imported_at": e.imported_at}
                             for s, e in sorted(sources.items()) if s != LOCAL],
                "sources": sorted(sources)})
        best = next((p for p in playbooks if not p["demoted"]), playbooks[0] if playbooks
                    else None)
        runs = sum(p["runs"] for p in playbooks)
        wins = sum(p["successes"] for p in playbooks)
        timed = [e for srcs in self.patterns[sig].values() for s, e in srcs.items()
                 if s == LOCAL and e.ttr_count]
        return {
            "pattern": sig, "detector": entries[0].detector, "subject": entries[0].subject,
            "best_playbook": best["playbook"] if best else None,
            "best_success_rate": best["success_rate"] if best else None,
            "success_rate": round(wins / runs, 4) if runs else None,
            "count": runs,
            "mttr_s": round(sum(e.ttr_total for e in timed) / sum(e.ttr_count for e in timed),
                            3) if timed else None,
            "first_seen": min(e.first_seen for e in entries),
            "last_seen": max(e.last_seen for e in entries),
            "imported_only": all(p["runs"] == 0 for p in playbooks),
            "playbooks": playbooks,
        }

    def playbook_record(self, playbook: str, now: float) -> dict[str, Any]:
        """A playbook's local record over every pattern, as ``knowledge`` counts it
        (credited runs, after any reset), and the patterns it is demoted on."""
        local = [(sig, pbs[playbook][LOCAL]) for sig, pbs in self.patterns.items()
                 if LOCAL in pbs.get(playbook, {})]
        runs = sum(e.successes + e.failures for _, e in local)
        wins = sum(e.successes for _, e in local)
        return {"runs": runs, "successes": wins,
                "success_rate": round(wins / runs, 4) if runs else None,
                "last_run": max((e.last_seen for _, e in local), default=None),
                "demoted": sorted(sig for sig, _ in local
                                  if self.demotion(sig, playbook, now)[0])}

    def export(self, source_id: str, host: str, now: float) -> dict[str, Any]:
        """This host's own patterns as the export file's body (unsigned: the caller signs).

        Only local evidence is exported: re-exporting an import would pass on figures
        this host never saw, under its own name."""
        patterns = []
        for sig, pbs in sorted(self.patterns.items()):
            for pb, sources in sorted(pbs.items()):
                e = sources.get(LOCAL)
                if e is None:
                    continue
                patterns.append({
                    "signature": sig, "detector": e.detector, "subject": e.subject,
                    "playbook": pb, "successes": e.successes, "failures": e.failures,
                    "ttr_total": e.ttr_total, "ttr_count": e.ttr_count,
                    "first_seen": e.first_seen, "last_seen": e.last_seen})
        return {"format": EXPORT_FORMAT, "version": EXPORT_VERSION, "source": source_id,
                "host": host, "exported_at": now, "patterns": patterns[:MAX_RECORDS]}

    def imported(self, source: str) -> int:
        return sum(1 for pbs in self.patterns.values() for srcs in pbs.values()
                   if source in srcs)

    def held_in(self, source: str, span: Span | None) -> dict[tuple[str, str], Entry]:
        """The records held from ``source`` whose (pattern, playbook) is within ``span``
        (after, until]: the ones an import of that span replaces; None: all of them."""
        return {(sig, pb): srcs[source] for sig, pbs in self.patterns.items()
                for pb, srcs in pbs.items()
                if source in srcs and in_span((sig, pb), span)}

    def preview(self, source: str, patterns: list[dict[str, Any]], now: float,
                span: Span | None = None, limit: int = 200) -> list[dict[str, Any]]:
        """What importing ``patterns`` from ``source`` would change, record by record;
        with ``span``, also the records held in it that the import removes."""
        out = []
        for p in patterns[:limit]:
            old = self.patterns.get(p["signature"], {}).get(p["playbook"], {}).get(source)
            runs = p["successes"] + p["failures"]
            weight = min(1.0, self.settings.import_weight / runs) if runs else 0.0
            out.append({"pattern": p["signature"], "playbook": p["playbook"],
                        "change": "new" if old is None else (
                            "same" if (old.successes, old.failures) == (
                                p["successes"], p["failures"]) else "changed"),
                        "before": None if old is None else [old.successes, old.failures],
                        "after": [p["successes"], p["failures"]],
                        "prior": [round(p["successes"] * weight, 3),
                                  round(p["failures"] * weight, 3)]})
        if span is not None:
            kept = {(p["signature"], p["playbook"]) for p in patterns}
            gone = [(k, e) for k, e in sorted(self.held_in(source, span).items())
                    if k not in kept]
            for (sig, pb), e in gone[:limit]:
                out.append({"pattern": sig, "playbook": pb, "change": "removed",
                            "before": [e.successes, e.failures], "after": None,
                            "prior": None})
        return out

    def import_(self, source: str, patterns: list[dict[str, Any]], replace: bool, *,
                host: str, kid: str, now: float, span: Span | None = None) -> list[Write]:
        """Take another host's checked patterns as source ``source``.

        ``replace`` drops every record held from ``source`` first; ``span`` only those
        within it (an export sent in sorted chunks replaces one span at a time)."""
        writes: list[Write] = []
        if replace and span is None:
            for sig in list(self.patterns):
                for pb in list(self.patterns[sig]):
                    self.patterns[sig][pb].pop(source, None)
                    if not self.patterns[sig][pb]:
                        del self.patterns[sig][pb]
                if not self.patterns[sig]:
                    del self.patterns[sig]
            writes.append(("DELETE FROM patterns WHERE source = ?", (source,)))
        elif span is not None:
            for sig, pb in self.held_in(source, span):
                del self.patterns[sig][pb][source]
                if not self.patterns[sig][pb]:
                    del self.patterns[sig][pb]
                if not self.patterns[sig]:
                    del self.patterns[sig]
                writes.append(("DELETE FROM patterns WHERE source = ? AND signature = ? "
                               "AND playbook = ?", (source, sig, pb)))
        for p in patterns:
            e = Entry(p["detector"], p["subject"], p["successes"], p["failures"],
                      p["ttr_total"], p["ttr_count"], p["first_seen"], p["last_seen"],
                      host=host, kid=kid, imported_at=now)
            self.patterns.setdefault(p["signature"], {}).setdefault(p["playbook"], {})[
                source] = e
            writes.append(_upsert(p["signature"], p["playbook"], source, e))
        return writes
