"""The knowledge base: symptom signature -> playbook -> record, per source. Pure code.

A *pattern* is what memory says about one symptom (``detector:subject``): each playbook
run for it, its successes, failures and time to resolve. The ``local`` source grows with
every credited outcome on this host; an imported file adds (or replaces) the records of
the daemon that exported it, so importing the same file twice counts it once.

What the ranking sees (:meth:`Knowledge.records`):

* local evidence, decayed: each outcome weighs ``0.5 ** (age / half_life)``;
* imported evidence as a *prior*: each imported record is scaled down to at most
  ``import_weight`` runs, fades with the same half-life from when it was exported, and
  shrinks as local runs of that playbook accumulate (factor ``w / (w + local runs)``).
  All imports together weigh at most ``import_weight`` runs.

Demotion (:meth:`Knowledge.demotion`) looks at local evidence only, so nothing is
demoted or kept on imported figures alone; a failure counts towards it for
``half_life`` after it happened, and only a failure of the playbook's own steps can
demote (see :func:`graced.learning.ranking.demotion`). Stored rows are checked with the
export bounds (:mod:`graced.protocol.knowledge`) when graced starts; rows that fail are
quarantined, never used.

An import is planned (:meth:`Knowledge.plan_import`: every record it adds, changes or
removes, checked against the caps), then journaled, then applied
(:meth:`Knowledge.apply_import`): a plan that cannot be journaled changes nothing, and
the dry run shows the very plan the import would apply.
"""

from __future__ import annotations

import itertools
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
    MAX_PINNED,
    MAX_PLAYBOOKS,
    MAX_RECORDS,
    MAX_SKEW,
    MAX_SOURCES,
    MAX_TOTAL_RECORDS,
    check_record,
    exportable,
    not_after,
    seconds,
)
from ..protocol.text import local_time
from .ranking import Fail, Record, demotion, ordered

LOCAL = "local"
# One page of ``knowledge ls``: at most this many records (a pattern's records are its
# playbooks times their sources) and about this many bytes of summaries, whatever the
# page's limit in patterns; the first pattern is always on the page.
PAGE_RECORDS = 5000
PAGE_BYTES = 4 * 2**20
MAX_FAILS = 20  # failures (incident, time, own) remembered per local record
PER_INCIDENT = 2  # runs of a playbook that failed in one incident before it is skipped
__all__ = ["LOCAL", "MAX_SKEW", "Entry", "ImportPlan", "Knowledge", "Settings", "parse_row"]

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
    fails: list[Fail] = field(default_factory=list)
    # imported: where from, and when it was exported there
    host: str = ""
    kid: str = ""
    imported_at: float = 0.0
    exported_at: float = 0.0

    def data(self) -> dict[str, Any]:
        return {"w_s": self.w_s, "w_f": self.w_f, "w_at": self.w_at,
                "fails": [[f.incident, f.at, int(f.own)] for f in self.fails],
                "host": self.host, "kid": self.kid, "imported_at": self.imported_at,
                "exported_at": self.exported_at}

    @property
    def faded_from(self) -> float:
        """When an imported record starts to fade: its export (never after its import)."""
        return min(self.exported_at or self.imported_at, self.imported_at)

    def raw(self) -> Record:
        return Record(float(self.successes), float(self.failures), self.ttr_total,
                      float(self.ttr_count))


def _decay(age: float, half_life: float) -> float:
    if half_life <= 0 or age <= 0:
        return 1.0
    return 0.5 ** min(age / half_life, 1000.0)


def _upsert(sig: str, playbook: str, source: str, e: Entry) -> Write:
    return (f"INSERT OR REPLACE INTO patterns ({_COLS}) VALUES "
            "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (sig, playbook, source, e.detector, e.subject, e.successes, e.failures,
             e.ttr_total, e.ttr_count, e.first_seen, e.last_seen, json.dumps(e.data())))


Parsed = tuple[str, str, str, Entry, tuple[Any, ...]]


def parse_row(row: tuple[Any, ...], now: float | None = None) -> tuple[str, str, str, Entry]:
    """A stored row, checked with the export bounds (and, given ``now``, no time later
    than ``now`` plus MAX_SKEW: a failure dated in the future would count for ever and
    never let its playbook be retried); raises ValueError naming the field."""
    (sig, pb, source, det, subj, s, f, tt, tc, first, last, data) = row[:12]
    latest = None if now is None else now + MAX_SKEW
    rec = check_record({"signature": sig, "playbook": pb, "detector": det, "subject": subj,
                        "successes": s, "failures": f, "ttr_total": tt, "ttr_count": tc,
                        "first_seen": first, "last_seen": last}, "row",
                       controls=source == LOCAL, latest=latest)
    if not isinstance(source, str) or not source or len(source) > 200:
        raise ValueError("row.source: must be a non-empty string")
    try:
        extra = json.loads(data) if data else {}
    except (TypeError, ValueError, RecursionError):
        raise ValueError("row.data: not JSON (or nested too deep)") from None
    if not isinstance(extra, dict):
        raise ValueError("row.data: not an object")
    e = Entry(rec["detector"], rec["subject"], rec["successes"], rec["failures"],
              rec["ttr_total"], rec["ttr_count"], rec["first_seen"], rec["last_seen"])
    e.w_s = seconds(extra.get("w_s", e.successes), "row.data.w_s", MAX_COUNT)
    e.w_f = seconds(extra.get("w_f", e.failures), "row.data.w_f", MAX_COUNT)
    for key, default in (("w_at", e.last_seen), ("imported_at", 0.0),
                         ("exported_at", 0.0)):
        where = f"row.data.{key}"
        setattr(e, key, not_after(seconds(extra.get(key, default), where, MAX_EPOCH),
                                  where, latest))
    fails = extra.get("fails", [])
    if not isinstance(fails, list) or len(fails) > MAX_FAILS:
        raise ValueError("row.data.fails: not a short list")
    for item in fails:
        if not (isinstance(item, list) and len(item) in (2, 3) and isinstance(item[0], int)
                and not isinstance(item[0], bool) and all(
                    x in (0, 1) and not isinstance(x, float) for x in item[2:])):
            raise ValueError("row.data.fails: not [incident, time, own] triples")
        # Rows from before the kind was kept: a failure of its own steps (as then).
        at = not_after(seconds(item[1], "row.data.fails", MAX_EPOCH), "row.data.fails",
                       latest)
        e.fails.append(Fail(item[0], at, bool(item[2]) if len(item) == 3 else True))
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
    retry_after: float = 86400.0


@dataclass
class ImportPlan:
    """What importing one export would do: the dry run shows it, the import applies it."""

    source: str
    meta: dict[str, Any]  # the source's record: host, kid, exported_at, imported_at
    put: dict[tuple[str, str], Entry]
    removed: dict[tuple[str, str], Entry]
    changes: list[dict[str, Any]]
    counts: dict[str, int]
    order: list[str] = field(default_factory=list)  # its patterns, least recent first
    version: int = 0  # of the knowledge base it was planned on


class Knowledge:
    """Patterns in memory, loaded from and written back to the ``patterns`` table.

    Rows that fail the bounds (given ``now``: a time later than ``now`` plus MAX_SKEW
    too) are left out and listed in :attr:`quarantined` as (signature, playbook, source,
    reason, row); the caller moves them aside. graced loads this host's own rows this
    way before it serves, and the imported ones after (:meth:`parse_rows` in a worker
    thread, :meth:`merge` in steps on the event loop).

    Reads stay bounded however much was imported: :attr:`recent` keeps the patterns in
    order of last sight (newest last) so a listing reads one page of it, and
    :attr:`by_source` the keys each source holds."""

    def __init__(self, rows: Iterable[tuple[Any, ...]] = (),
                 settings: Settings | None = None,
                 sources: dict[str, dict[str, Any]] | None = None,
                 now: float | None = None) -> None:
        self.settings = settings or Settings()
        self.patterns: dict[str, dict[str, dict[str, Entry]]] = {}
        self.quarantined: list[tuple[Any, Any, Any, str, tuple[Any, ...]]] = []
        self.by_source: dict[str, set[tuple[str, str]]] = {}
        # Per imported source: host, kid (the key pinned for it) and exported_at. Kept
        # when the source's records are reset; forgotten only by forget_source.
        self.sources: dict[str, dict[str, Any]] = dict(sources or {})
        parsed, self.quarantined = self.parse_rows(rows, now)
        self.quarantined += self.merge(parsed)
        self.recent: dict[str, None] = {}
        self._reorder()
        # Bumped by every change an import plan depends on (a reset, an import, a new
        # local record): a plan made in a worker thread is applied only if nothing
        # changed meanwhile.
        self.version = 0
        # True while graced loads the imported rows after start (status says so).
        self.loading = False

    @staticmethod
    def parse_rows(rows: Iterable[tuple[Any, ...]], now: float | None = None
                   ) -> tuple[list[Parsed], list[tuple[Any, Any, Any, str, tuple[Any, ...]]]]:
        """Stored rows parsed and checked (pure: a worker thread may run it), this
        host's own first; and the rows that fail, with why."""
        parsed: list[Parsed] = []
        bad: list[tuple[Any, Any, Any, str, tuple[Any, ...]]] = []
        for row in rows:
            row = tuple(row)
            try:
                sig, pb, source, e = parse_row(row, now)
            except (ValueError, TypeError, OverflowError, RecursionError, MemoryError) as exc:
                bad.append((*row[:3], str(exc)[:300], row))
                continue
            parsed.append((sig, pb, source, e, row))
        # This host's own rows first: imported ones never crowd them out of a pattern.
        parsed.sort(key=lambda item: item[2] != LOCAL)
        return parsed, bad

    def merge(self, parsed: Iterable[Parsed]) -> list[tuple[Any, Any, Any, str,
                                                           tuple[Any, ...]]]:
        """Add parsed rows (not to :attr:`recent`: :meth:`reorder` after); returns the
        ones over the caps, left out."""
        over = []
        for sig, pb, source, e, row in parsed:
            if not self.room(sig, pb, source):
                over.append((sig, pb, source, f"over the caps ({MAX_RECORDS} records a "
                             f"source, {MAX_PLAYBOOKS} playbooks a pattern)", row))
                continue
            self.by_source.setdefault(source, set()).add((sig, pb))
            self.patterns.setdefault(sig, {}).setdefault(pb, {})[source] = e
        return over

    def room(self, sig: str, pb: str, source: str) -> bool:
        """May ``source`` hold a record for (``sig``, ``pb``)? A source holds at most
        MAX_RECORDS records. A pattern holds at most MAX_PLAYBOOKS playbooks, this
        host's own first: an imported playbook needs a free place among them, a local
        one only a free place among the local ones (imports never push it out)."""
        held = self.by_source.get(source, set())
        if (sig, pb) in held:
            return True
        if len(held) >= MAX_RECORDS:
            return False
        pbs = self.patterns.get(sig, {})
        if source == LOCAL:
            return sum(1 for srcs in pbs.values() if LOCAL in srcs) < MAX_PLAYBOOKS
        return pb in pbs or len(pbs) < MAX_PLAYBOOKS

    def _reorder(self) -> None:
        """Rebuild :attr:`recent` (after a load or an import: a write, not a read)."""
        self.set_order(self.order())

    def order(self) -> list[str]:
        """Every pattern, least recently seen first (a read: a worker thread may run it)."""
        return sorted(self.patterns, key=lambda sig: (max(
            e.last_seen for srcs in self.patterns[sig].values() for e in srcs.values()),
            sig))

    def set_order(self, order: list[str]) -> None:
        """Take an :meth:`order` made meanwhile: patterns made since come last."""
        recent = dict.fromkeys(sig for sig in order if sig in self.patterns)
        recent.update((sig, None) for sig in self.recent if sig not in recent
                      and sig in self.patterns)
        recent.update((sig, None) for sig in self.patterns if sig not in recent)
        self.recent = recent

    def held_sources(self) -> int:
        """How many daemons this one holds records from (at most MAX_SOURCES)."""
        return sum(1 for s, keys in self.by_source.items() if s != LOCAL and keys)

    def source_list(self) -> list[dict[str, Any]]:
        """Every imported source remembered: its key, export time, records held."""
        return [{"source": s, "host": m["host"], "kid": m["kid"],
                 "exported_at": m["exported_at"], "imported_at": m["imported_at"],
                 "records": len(self.by_source.get(s, ()))}
                for s, m in sorted(self.sources.items())]

    @property
    def total(self) -> int:
        return sum(len(keys) for keys in self.by_source.values())

    def page(self, limit: int, offset: int = 0) -> list[str]:
        """Signatures, most recently seen first: ``limit`` of them after ``offset``."""
        return list(itertools.islice(reversed(self.recent), offset, offset + limit))

    def size(self, sig: str) -> int:
        """How many records a pattern holds (every playbook, every source)."""
        return sum(len(srcs) for srcs in self.patterns.get(sig, {}).values())

    def summaries(self, now: float, limit: int, offset: int = 0, *,
                  records: int = PAGE_RECORDS,
                  size: int = PAGE_BYTES) -> list[dict[str, Any]]:
        """One page of :meth:`summary`, most recently seen first: at most ``limit``
        patterns, and no more once the page holds ``records`` records or ``size`` bytes
        of JSON (the first pattern always: 64 playbooks of 101 sources at most). Work and
        reply in proportion to the records shown, however many were imported."""
        out: list[dict[str, Any]] = []
        held = used = 0
        for sig in itertools.islice(reversed(self.recent), offset, offset + limit):
            n = self.size(sig)
            if out and held + n > records:
                break
            summary = self.summary(sig, now)
            nbytes = len(json.dumps(summary))
            if out and used + nbytes > size:
                break
            out.append(summary)
            held, used = held + n, used + nbytes
        return out

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
                now - e.faded_from, st.half_life) * shrink
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

    def fails(self, sig: str, playbook: str) -> list[Fail]:
        e = self.patterns.get(sig, {}).get(playbook, {}).get(LOCAL)
        return list(e.fails) if e else []

    def demotion(self, sig: str, playbook: str, now: float) -> tuple[bool, str | None]:
        st = self.settings
        return demotion(self.local(sig, playbook, now), self.fails(sig, playbook),
                        after=st.demote_after, below=st.demote_below, span=st.demote_span,
                        now=now, fade=st.half_life)

    def retry_due(self, sig: str, playbook: str, now: float) -> bool:
        """A demoted playbook is tried again once ``retry_after`` passed since its last
        failure (bounded exploration: one run per ``retry_after`` at most, as a failed
        retry is its new last failure), so a playbook that works again can recover."""
        fails = self.fails(sig, playbook)
        return bool(fails) and now - max(f.at for f in fails) >= self.settings.retry_after

    # -- learning ----------------------------------------------------------------------

    def learn(self, *, sig: str, detector: str, subject: str, playbook: str, success: bool,
              ttr: float | None, now: float, incident: int,
              own: bool = True) -> tuple[list[Write], bool]:
        """Count one credited run; returns the write and whether the record is new.

        ``own``: for a failure, whether a step of the playbook itself failed (rather than
        every step succeeding and the symptom staying). A new record over the caps
        (:meth:`room`) is not made: no writes, nothing learned."""
        if not self.room(sig, playbook, LOCAL):
            return [], False
        sources = self.patterns.setdefault(sig, {}).setdefault(playbook, {})
        new = LOCAL not in sources
        if new:  # a pattern's playbooks count towards its cap: an import plan depends on it
            self.version += 1
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
            # Failures older than half_life no longer count towards a demotion: forgotten.
            e.fails = [*(f for f in e.fails if now - f.at <= self.settings.half_life),
                       Fail(incident, now, own)][-MAX_FAILS:]
        e.last_seen = max(now, e.first_seen)
        self.by_source.setdefault(LOCAL, set()).add((sig, playbook))
        self.recent.pop(sig, None)
        self.recent[sig] = None
        return [_upsert(sig, playbook, LOCAL, e)], new

    def failures_in(self, sig: str, playbook: str, incident: int) -> int:
        return sum(1 for f in self.fails(sig, playbook) if f.incident == incident)

    def reset(self, target: str) -> tuple[list[Write], int]:
        """Forget every record of a pattern (``DETECTOR:SUBJECT``) or of a playbook."""
        removed = 0
        self.version += 1
        if target in self.patterns:
            for pb, srcs in self.patterns.pop(target).items():
                removed += len(srcs)
                for source in srcs:
                    self.by_source.get(source, set()).discard((target, pb))
            self.recent.pop(target, None)
            return [("DELETE FROM patterns WHERE signature = ?", (target,))], removed
        for sig in list(self.patterns):
            sources = self.patterns[sig].pop(target, None)
            if sources:
                removed += len(sources)
                for source in sources:
                    self.by_source.get(source, set()).discard((sig, target))
            if not self.patterns[sig]:
                del self.patterns[sig]
                self.recent.pop(sig, None)
        return [("DELETE FROM patterns WHERE playbook = ?", (target,))], removed

    def forget_source(self, source: str) -> tuple[list[Write], int]:
        """Forget an imported source: its records, and its pinned key and last export
        time (so any key may speak for that daemon id again, with any export time).
        A reset of records keeps both; a source left with no record no longer counts
        towards MAX_SOURCES, but only this frees its place among MAX_PINNED."""
        self.version += 1
        keys = self.by_source.pop(source, set())
        for sig, pb in keys:
            pbs = self.patterns.get(sig, {})
            pbs.get(pb, {}).pop(source, None)
            if pb in pbs and not pbs[pb]:
                del pbs[pb]
            if sig in self.patterns and not pbs:
                del self.patterns[sig]
                self.recent.pop(sig, None)
        self.sources.pop(source, None)
        return [("DELETE FROM patterns WHERE source = ?", (source,)),
                self.sources_write(self.sources)], len(keys)

    # -- reporting -----------------------------------------------------------------------

    def summary(self, sig: str, now: float) -> dict[str, Any]:
        """One pattern as ``knowledge ls`` shows it: the best playbook and its figures,
        with which of them are local and which imported, and from whom (at most
        MAX_PLAYBOOKS playbooks: bounded work)."""
        priors = {pb: self.prior(sig, pb, now) for pb in self.patterns[sig]}
        recs: dict[str, Record] = {}
        for pb, prior in priors.items():
            recs[pb] = self.local(sig, pb, now)
            recs[pb].add(prior)
        entries = [e for srcs in self.patterns[sig].values() for e in srcs.values()]
        playbooks: list[dict[str, Any]] = []
        for pb, rec in ordered(recs):
            sources = self.patterns[sig][pb]
            local = sources.get(LOCAL)
            is_demoted, held = self.demotion(sig, pb, now)
            prior = priors[pb]
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
                              "imported_at": e.imported_at, "exported_at": e.exported_at}
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
        local = [(sig, self.patterns[sig][playbook][LOCAL])
                 for sig, pb in self.by_source.get(LOCAL, ()) if pb == playbook]
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
        this host never saw, under its own name. A record whose names hold control
        characters (a subject from the monitored world) is left out: an importer
        refuses them."""
        patterns = []
        for sig, pbs in sorted(self.patterns.items()):
            for pb, sources in sorted(pbs.items()):
                e = sources.get(LOCAL)
                if e is None or not exportable({"signature": sig, "detector": e.detector,
                                                "subject": e.subject, "playbook": pb}):
                    continue
                patterns.append({
                    "signature": sig, "detector": e.detector, "subject": e.subject,
                    "playbook": pb, "successes": e.successes, "failures": e.failures,
                    "ttr_total": e.ttr_total, "ttr_count": e.ttr_count,
                    "first_seen": e.first_seen, "last_seen": e.last_seen})
        return {"format": EXPORT_FORMAT, "version": EXPORT_VERSION, "source": source_id,
                "host": host, "exported_at": now, "patterns": patterns[:MAX_RECORDS]}

    def plan_import(self, source: str, patterns: list[dict[str, Any]], *, host: str,
                    kid: str, exported_at: float, now: float,
                    limit: int = 200) -> ImportPlan:
        """What importing an export from ``source`` (checked ``patterns``) would do: it
        replaces every record held from that source (records no longer exported are
        removed). Raises ValueError when the result would break a cap. Changes nothing."""
        if exported_at > now + MAX_SKEW:
            raise ValueError(f"exported_at: {local_time(exported_at)} is "
                             f"{exported_at - now:.0f} s "
                             f"in the future (at most {MAX_SKEW:g} s of clock skew): refused")
        held = self.by_source.get(source, set())
        put: dict[tuple[str, str], Entry] = {}
        changes: list[dict[str, Any]] = []
        same: list[dict[str, Any]] = []
        counts = {"new": 0, "changed": 0, "same": 0, "removed": 0}
        added: dict[str, int] = {}
        for p in patterns:
            key = (p["signature"], p["playbook"])
            old = self.patterns.get(key[0], {}).get(key[1], {}).get(source)
            if key[1] not in self.patterns.get(key[0], {}):
                added[key[0]] = added.get(key[0], 0) + 1
                if len(self.patterns.get(key[0], {})) + added[key[0]] > MAX_PLAYBOOKS:
                    raise ValueError(f"patterns: pattern {key[0]} would have more than "
                                     f"{MAX_PLAYBOOKS} playbooks")
            put[key] = Entry(p["detector"], p["subject"], p["successes"], p["failures"],
                             p["ttr_total"], p["ttr_count"], p["first_seen"], p["last_seen"],
                             host=host, kid=kid, imported_at=now, exported_at=exported_at)
            runs = p["successes"] + p["failures"]
            weight = min(1.0, self.settings.import_weight / runs) if runs else 0.0
            change = "new" if old is None else (
                "same" if (old.successes, old.failures) == (p["successes"], p["failures"])
                else "changed")
            counts[change] += 1
            listed = same if change == "same" else changes
            if len(listed) < limit:
                listed.append({"pattern": key[0], "playbook": key[1], "change": change,
                               "before": None if old is None else [old.successes,
                                                                   old.failures],
                               "after": [p["successes"], p["failures"]],
                               "prior": [round(p["successes"] * weight, 3),
                                         round(p["failures"] * weight, 3)]})
        removed = {key: self.patterns[key[0]][key[1]][source]
                   for key in sorted(held) if key not in put}
        counts["removed"] = len(removed)
        for (sig, pb), e in removed.items():
            if len(changes) >= limit:
                break
            changes.append({"pattern": sig, "playbook": pb, "change": "removed",
                            "before": [e.successes, e.failures], "after": None,
                            "prior": None})
        # What changes first (new and changed in the file's order, then removed), then
        # what stays the same: the first ``limit`` of them.
        changes = (changes + same)[:limit]
        if self.total - len(held) + len(put) > MAX_TOTAL_RECORDS:
            raise ValueError(f"patterns: graced would hold more than {MAX_TOTAL_RECORDS} "
                             "records, every source together")
        if put and not held and self.held_sources() >= MAX_SOURCES:
            raise ValueError(f"source: knowledge from {MAX_SOURCES} daemons is held "
                             "already; reset one first (gracectl knowledge sources, "
                             "knowledge reset --source ID)")
        if source not in self.sources and len(self.sources) >= MAX_PINNED:
            raise ValueError(f"source: the keys of {MAX_PINNED} daemons are pinned "
                             "already; forget one first (gracectl knowledge sources, "
                             "knowledge reset --source ID)")
        last: dict[str, float] = {}
        for (sig, _), e in put.items():
            last[sig] = max(last.get(sig, 0.0), e.last_seen)
        return ImportPlan(source, {"host": host, "kid": kid, "exported_at": exported_at,
                                   "imported_at": now}, put, removed, changes, counts,
                          order=sorted(last, key=lambda sig: (last[sig], sig)),
                          version=self.version)

    def import_writes(self, plan: ImportPlan) -> list[Write]:
        """The writes that store a plan (one transaction with its event)."""
        writes: list[Write] = [("DELETE FROM patterns WHERE source = ?", (plan.source,))]
        writes += [_upsert(sig, pb, plan.source, e) for (sig, pb), e in plan.put.items()]
        writes.append(self.sources_write({**self.sources, plan.source: plan.meta}))
        return writes

    @staticmethod
    def sources_write(sources: dict[str, dict[str, Any]]) -> Write:
        return ("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                (SOURCES_KEY, json.dumps(sources, sort_keys=True)))

    def apply_import(self, plan: ImportPlan) -> None:
        """Apply a plan (once its writes are committed): work in proportion to the
        plan, no sort of everything held. The imported patterns become the most recent
        in listings, in the order of their own last sight."""
        self.version += 1
        for sig, pb in plan.removed:
            pbs = self.patterns.get(sig, {})
            pbs.get(pb, {}).pop(plan.source, None)
            if pb in pbs and not pbs[pb]:
                del pbs[pb]
            if sig in self.patterns and not pbs:
                del self.patterns[sig]
                self.recent.pop(sig, None)
        for (sig, pb), e in plan.put.items():
            self.patterns.setdefault(sig, {}).setdefault(pb, {})[plan.source] = e
        for sig in plan.order:
            self.recent.pop(sig, None)
            self.recent[sig] = None
        self.by_source[plan.source] = set(plan.put)
        self.sources[plan.source] = plan.meta


SOURCES_KEY = "knowledge_sources"


def load_sources(raw: Any, now: float | None = None
                 ) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """The stored per-source records (meta ``knowledge_sources``), bad ones left out;
    and what was wrong. A time later than ``now`` plus MAX_SKEW is out of bounds: the
    source keeps its pinned key, its export time becomes ``now`` (no export made before
    this start is taken from it any more: nothing older slips in)."""
    try:
        data = json.loads(raw) if isinstance(raw, str) else {}
    except (ValueError, RecursionError):
        return {}, ["knowledge_sources: not JSON"]
    out: dict[str, dict[str, Any]] = {}
    notes: list[str] = []
    latest = None if now is None else now + MAX_SKEW
    for source, meta in (data.items() if isinstance(data, dict) else ()):
        try:
            out[str(source)] = {
                "host": str(meta["host"])[:1000], "kid": str(meta["kid"])[:64],
                "exported_at": seconds(meta["exported_at"], "exported_at", MAX_EPOCH),
                "imported_at": seconds(meta["imported_at"], "imported_at", MAX_EPOCH)}
        except (KeyError, TypeError, ValueError) as exc:
            notes.append(f"source {str(source)[:60]!r}: {str(exc)[:100]}")
            continue
        for key in ("exported_at", "imported_at"):
            try:
                not_after(out[str(source)][key], key, latest)
            except ValueError as exc:
                notes.append(f"source {str(source)[:60]!r}: {exc}; set to now")
                out[str(source)][key] = now
    return dict(list(out.items())[:MAX_PINNED]), notes
