"""Missions in SQLite: the row writes that go with mission events, and the queries."""

from __future__ import annotations

import json
from typing import Any

from ..journal import Write
from ..protocol.canonical import json_safe
from .engine import ACTIVE, Mission

_COLUMNS = ("id", "detector", "kind", "subject", "severity", "state", "summary", "opened_at",
            "updated_at", "closed_at", "occurrences", "flapping", "data")


# Mission fields kept in the JSON data column.
_DATA = ("last_value", "score", "normal_streak", "last_update_event", "samples", "timeline",
         "playbook", "risk", "steps", "approvals", "verification", "expires_at", "reason",
         "verify_started", "similar", "decision", "incident", "symptom_at_start", "held_back",
         "plan", "silenced", "verify_until", "normal_since")


def dumps(data: dict[str, Any]) -> str:
    """A mission's data column: JSON SQLite can parse (a non-finite number, which no
    check upstream should let through, is stored as null rather than as a bare word)."""
    try:
        return json.dumps(data, allow_nan=False)
    except ValueError:
        return json.dumps(json_safe(data), allow_nan=False)


def upsert(m: Mission) -> Write:
    data = dumps({k: getattr(m, k) for k in _DATA})
    values = (m.id, m.detector, m.kind, m.subject, m.severity, m.state, m.summary, m.opened_at,
              m.updated_at, m.closed_at, m.occurrences, int(m.flapping), data)
    sets = ", ".join(f"{c} = excluded.{c}" for c in _COLUMNS[1:])
    sql = (f"INSERT INTO missions ({', '.join(_COLUMNS)}) VALUES "
           f"({', '.join('?' * len(_COLUMNS))}) ON CONFLICT(id) DO UPDATE SET {sets}")
    return sql, values


def from_row(row: tuple[Any, ...]) -> Mission:
    (mid, detector, kind, subject, severity, state, summary, opened_at, updated_at, closed_at,
     occurrences, flapping, data) = row
    # 0.1.0 stored a NaN sample as the bare word NaN; it reads back as no value.
    extra = json.loads(data, parse_constant=lambda _: None)
    return Mission(id=mid, detector=detector, kind=kind, subject=subject, severity=severity,
                   state=state, summary=summary, opened_at=opened_at, updated_at=updated_at,
                   closed_at=closed_at, occurrences=occurrences, flapping=bool(flapping),
                   **{k: extra[k] for k in _DATA if k in extra})


SELECT = f"SELECT {', '.join(_COLUMNS)} FROM missions"


def active_query() -> tuple[str, tuple[Any, ...]]:
    marks = ", ".join("?" * len(ACTIVE))
    return f"{SELECT} WHERE state IN ({marks}) ORDER BY id", tuple(ACTIVE)


def list_query(states: list[str] | None, severities: list[str] | None,
               limit: int, ids: list[int] | None = None) -> tuple[str, tuple[Any, ...]]:
    where: list[str] = []
    params: list[Any] = []
    if ids is not None:
        where.append(f"id IN ({', '.join('?' * len(ids))})")
        params.extend(ids)
    if states:
        where.append(f"state IN ({', '.join('?' * len(states))})")
        params.extend(states)
    if severities:
        where.append(f"severity IN ({', '.join('?' * len(severities))})")
        params.extend(severities)
    clause = f" WHERE {' AND '.join(where)}" if where else ""
    return f"{SELECT}{clause} ORDER BY id DESC LIMIT ?", (*params, limit)
