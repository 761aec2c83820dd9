"""Outcome memory in SQLite: one row per mission that reached a final state, full-text
indexed (FTS5) by its symptoms, and the similar-mission lookup.

The writes here go into the journal's transaction with the mission's final event
(nothing is stored unless the event is, and the other way round). The lookup runs on a
read connection of its own, in a worker thread.
"""

from __future__ import annotations

import json
import math
import re
import sqlite3
from pathlib import Path
from typing import Any

from ..journal import Write
from ..missions.engine import Mission, ran

# Mission states whose outcome is stored. ``interrupted`` is stored as it happens and
# replaced by the final outcome when the mission closes.
OUTCOME_STATES = ("resolved", "failed", "escalated", "rejected", "expired", "interrupted")


_WORD = re.compile(r"[^\W\d_][\w.-]*", re.UNICODE)
MAX_QUERY_TERMS = 16
FTS_WINDOW = 1000  # text similarity is ranked among this many most recent matches
POSTINGS_BUDGET = 30_000  # index entries a lookup's bm25 may read


def signature(detector: str, subject: str) -> str:
    """The symptom signature patterns are keyed by."""
    return f"{detector}:{subject}"


def symptoms_text(detector: str, kind: str, subject: str, severity: str, summary: str) -> str:
    return " ".join((detector, kind, subject, severity, summary))


def terms(text: str, limit: int | None = MAX_QUERY_TERMS) -> list[str]:
    """Distinct words of a symptom text (numbers left out: values differ every time)."""
    seen: dict[str, None] = {}
    for word in _WORD.findall(text.lower()):
        for part in re.split(r"[.-]+", word):
            if len(part) >= 2:
                seen.setdefault(part, None)
    return list(seen)[:limit]


def pick_terms(candidates: list[str], docs: dict[str, int], total: int) -> list[str]:
    """The query's words worth searching for, rarest first.

    bm25 counts every document holding each query word, so a word found in most
    missions costs the most and tells the least (its IDF is about zero). Words in more
    than half the missions are left out, and the rest are taken rarest first while their
    postings stay within POSTINGS_BUDGET, so a lookup's cost stays bounded however much
    memory grows."""
    known = sorted((docs.get(t, 0), t) for t in candidates)
    out: list[str] = []
    spent = 0
    for df, term in known:
        if df == 0:
            continue
        if total >= 100 and df > total / 2:
            break
        if out and spent + df > POSTINGS_BUDGET:
            break
        out.append(term)
        spent += df
    return out


def approved_by(m: Mission) -> str | None:
    for a in reversed(m.approvals):
        if a.get("decision") == "approved":
            return str(a.get("user") or a.get("key") or "?")
    if m.steps or any(t.get("to") == "executing" for t in m.timeline):
        return "automatic"
    return None


def run_started(m: Mission) -> float | None:
    """When the playbook last started (its ``executing`` transition), if it did."""
    return next((float(t["ts"]) for t in reversed(m.timeline) if t.get("to") == "executing"),
                None)


def outcome_of(m: Mission) -> dict[str, Any]:
    """The outcome row for a mission in a final state (or interrupted).

    ``playbook`` is named only when it ran. ``ttr`` is the time from the playbook's start
    to the resolution (waiting for approval, or while paused, is not time the playbook
    took); for a mission that resolved by itself, from opening to resolution."""
    was_run = ran(m)
    success: int | None = None
    if was_run and m.state == "resolved":
        success = 1
    elif was_run and m.state == "failed":
        success = 0
    closed = m.closed_at if m.closed_at is not None else m.updated_at
    start = (run_started(m) or m.opened_at) if was_run else m.opened_at
    values = [float(s["value"]) for s in m.samples
              if isinstance(s.get("value"), (int, float)) and math.isfinite(s["value"])]
    ttr = None
    if m.state == "resolved" and start is not None:
        ttr = round(min(max(closed - start, 0.0), 7 * 86400.0), 3)
    last = m.last_value if m.last_value is None or math.isfinite(m.last_value) else None
    return {
        "mission_id": m.id, "signature": signature(m.detector, m.subject),
        "detector": m.detector, "kind": m.kind, "subject": m.subject,
        "severity": m.severity, "summary": m.summary,
        "sample_values": {"first": values[0] if values else None,
                          "last": last, "peak": max(values) if values else None,
                          "samples": len(m.samples), "occurrences": m.occurrences},
        "playbook": m.playbook if was_run else None,
        "steps": [{k: s.get(k) for k in ("step", "action", "ok", "exit_code", "duration_s",
                                         "error")} for s in m.steps],
        "outcome": m.state, "ran": int(was_run), "success": success,
        "ttr": ttr,
        "approved_by": approved_by(m), "opened_at": m.opened_at, "closed_at": closed,
        "consulted": int(m.decision is not None),
        "interrupted": int(any(t["to"] == "interrupted" for t in m.timeline)),
        "held_back": (m.held_back or {}).get("setting"),
    }


_OUT_COLS = ("mission_id", "signature", "detector", "kind", "subject", "severity", "summary",
             "sample_values", "playbook", "steps", "outcome", "ran", "success", "ttr",
             "approved_by", "opened_at", "closed_at", "consulted", "interrupted", "held_back")


def outcome_writes(o: dict[str, Any]) -> list[Write]:
    """Store an outcome (replacing an earlier one for the same mission) and index it."""
    values = tuple(json.dumps(o[c]) if c in ("sample_values", "steps") else o[c]
                   for c in _OUT_COLS)
    text = symptoms_text(o["detector"], o["kind"], o["subject"], o["severity"], o["summary"])
    # Document frequencies (term '' counts the documents), for a new mission only; these
    # run before the outcome row exists.
    counts: list[Write] = [
        ("INSERT INTO outcome_terms (term, docs) SELECT ?, 1 WHERE NOT EXISTS "
         "(SELECT 1 FROM outcomes WHERE mission_id = ?) "
         "ON CONFLICT (term) DO UPDATE SET docs = docs + 1", (term, o["mission_id"]))
        for term in ["", *terms(text, limit=None)]]
    return [*counts,
        (f"INSERT OR REPLACE INTO outcomes ({', '.join(_OUT_COLS)}) VALUES "
         f"({', '.join('?' * len(_OUT_COLS))})", values),
        ("DELETE FROM outcomes_fts WHERE rowid = ?", (o["mission_id"],)),
        ("INSERT INTO outcomes_fts (rowid, symptoms) VALUES (?, ?)", (o["mission_id"], text)),
    ]


_BRIEF = ("mission_id", "detector", "subject", "summary", "playbook", "outcome", "success",
          "ttr", "closed_at", "held_back")


def _number(v: Any, upper: float) -> float | None:
    """A stored figure as a finite number in [0, upper], or None (an edited row)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    try:
        f = float(v)
    except OverflowError:
        return None
    return f if math.isfinite(f) and 0 <= f <= upper else None


def _brief(row: tuple[Any, ...], match: str, score: float | None) -> dict[str, Any]:
    """One outcome row as a similar mission, every figure checked: it is copied into the
    new mission's data (an edited row holding Infinity once made the next start fail)."""
    d = dict(zip(_BRIEF, row, strict=True))
    d["ttr"] = _number(d["ttr"], 7 * 86400.0)
    d["closed_at"] = _number(d["closed_at"], 1e10)
    if d["success"] not in (0, 1) or isinstance(d["success"], float):
        d["success"] = None
    if score is not None and not math.isfinite(score):
        score = None
    d["id"] = d.pop("mission_id")
    d["match"] = match
    d["score"] = None if score is None else round(score, 4)
    return d


class MemoryReader:
    """The similar-mission lookup on a read-only connection (one thread at a time)."""

    def __init__(self, path: Path) -> None:
        self._conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False,
                                     isolation_level=None)
        self._conn.execute("PRAGMA busy_timeout = 5000")

    def close(self) -> None:
        self._conn.close()

    def similar(self, *, detector: str, kind: str, subject: str, severity: str, summary: str,
                before: int, limit: int = 10) -> list[dict[str, Any]]:
        """Past missions like this one: same detector and subject first (newest first),
        then by text similarity of the symptoms (bm25, best first)."""
        cols = ", ".join(_BRIEF)
        rows = self._conn.execute(
            f"SELECT {cols} FROM outcomes WHERE detector = ? AND subject = ? "
            "AND mission_id < ? ORDER BY mission_id DESC LIMIT ?",
            (detector, subject, before, limit)).fetchall()
        found = [_brief(r, "same detector and subject", None) for r in rows]
        if len(found) >= limit:
            return found
        words = terms(symptoms_text(detector, kind, subject, severity, summary))
        marks = ", ".join("?" * (len(words) + 1))
        docs = {str(t): int(n) for t, n in self._conn.execute(
            f"SELECT term, docs FROM outcome_terms WHERE term IN ({marks})", ("", *words))}
        chosen = pick_terms(words, docs, docs.get("", 0))
        if not chosen:
            return found
        query = " OR ".join(f'"{t}"' for t in chosen)
        # bm25 over the most recent matches only: ranking every match of common words
        # costs ~150 ms at 100,000 missions; the newest FTS_WINDOW are read from the
        # index in rowid order and stop early, so the cost stays bounded.
        hits = self._conn.execute(
            "SELECT rowid, bm25(outcomes_fts) FROM outcomes_fts WHERE outcomes_fts MATCH ? "
            "AND rowid < ? ORDER BY rowid DESC LIMIT ?", (query, before, FTS_WINDOW),
        ).fetchall()
        hits.sort(key=lambda h: (h[1], -h[0]))
        for rowid, score in hits:
            if len(found) >= limit:
                break
            row = self._conn.execute(
                f"SELECT {cols} FROM outcomes WHERE mission_id = ? AND NOT "
                "(detector = ? AND subject = ?)", (rowid, detector, subject)).fetchone()
            if row is not None:
                # bm25() is lower-is-better and negative; report higher-is-better.
                found.append(_brief(row, "similar symptoms", -float(score)))
        return found

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        return list(self._conn.execute(sql, params).fetchall())
