"""Where ``tail --since/--until`` start and stop: a seq, or a time as journalctl takes it.

Pure: the caller passes ``now`` (epoch seconds) and gets a :class:`Point` back.

Accepted (as journalctl(1) accepts them):
- a positive integer: a seq (``--since 1``);
- ``now``, ``today``, ``yesterday``, ``tomorrow`` (midnight, local time), each with a
  time of day (``yesterday 22:00``);
- ``22:31``, ``22:31:05``: that time today (local time);
- ``@1796164260``: seconds since the epoch (UTC);
- ``-10min``, ``+2h``, ``-1d 2h``, ``-90s``: relative to now (units s, sec, second(s),
  m, min, minute(s), h, hour(s), d, day(s), w, week(s)); ``10min ago`` too;
- ``2026-11-24``, ``2026-11-24 10:00``, ``2026-11-24 10:00:05`` (local time), and any
  ISO 8601 time (``2026-11-24T10:00:05Z``, ``…+01:00``; without a zone: local time).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta

UNITS = {"s": 1, "sec": 1, "secs": 1, "second": 1, "seconds": 1,
         "m": 60, "min": 60, "mins": 60, "minute": 60, "minutes": 60,
         "h": 3600, "hr": 3600, "hour": 3600, "hours": 3600,
         "d": 86400, "day": 86400, "days": 86400, "w": 604800, "week": 604800,
         "weeks": 604800}
_SPAN = re.compile(r"(\d+(?:\.\d+)?)\s*([a-z]+)")
_DAY_TIME = re.compile(r"(?:(today|yesterday|tomorrow)\s+)?(\d{1,2}):(\d\d)(?::(\d\d))?")
_EPOCH = re.compile(r"@(\d{1,12}(?:\.\d{1,9})?)")
_MAX_LEN = 64


@dataclass(frozen=True)
class Point:
    """A seq or a time (epoch seconds): exactly one is set."""

    seq: int | None = None
    ts: float | None = None


def _span(text: str) -> float | None:
    parts = _SPAN.findall(text)
    if not parts or _SPAN.sub("", text).strip():
        return None
    total = 0.0
    for n, unit in parts:
        if unit not in UNITS:
            return None
        total += float(n) * UNITS[unit]
    return total


def after(since: Point, until: Point) -> bool:
    """Whether ``since`` lies after ``until`` (both seqs, or both times): a range no event
    can be in, which journalctl refuses. A seq against a time is not known here: tail
    compares them once graced says when the seq's event was published."""
    if since.seq is not None and until.seq is not None:
        return since.seq > until.seq
    if since.ts is not None and until.ts is not None:
        return since.ts > until.ts
    return False


def parse(text: str, now: float) -> Point:
    """A seq or a time from ``text``; raises ValueError with the reason."""
    t = text.strip().lower()
    if not t or len(t) > _MAX_LEN:
        raise ValueError("empty or too long")
    if t.isdigit():
        seq = int(t)
        if not 1 <= seq <= 2**62:
            raise ValueError("a seq is a positive integer")
        return Point(seq=seq)
    local_now = datetime.fromtimestamp(now).astimezone()
    midnight = local_now.replace(hour=0, minute=0, second=0, microsecond=0)
    days = {"today": 0, "yesterday": -1, "tomorrow": 1}
    if t == "now":
        return Point(ts=now)
    if t in days:
        return Point(ts=(midnight + timedelta(days=days[t])).timestamp())
    epoch = _EPOCH.fullmatch(t)
    if epoch:
        return Point(ts=float(epoch.group(1)))
    clock = _DAY_TIME.fullmatch(t)
    if clock:
        day, hour, minute, second = clock.groups()
        if int(hour) > 23 or int(minute) > 59 or int(second or 0) > 59:
            raise ValueError("not a time of day (HH:MM or HH:MM:SS, 00:00 to 23:59:59)")
        # Local wall-clock time on that day (a day with a DST change keeps its own offset).
        date = (midnight + timedelta(days=days[day or "today"])).date()
        at = datetime(date.year, date.month, date.day, int(hour), int(minute),
                      int(second or 0)).astimezone()
        return Point(ts=at.timestamp())
    sign = 0
    if t.startswith(("-", "+")):
        sign, t = (-1 if t[0] == "-" else 1), t[1:].strip()
    elif t.endswith(" ago"):
        sign, t = -1, t[:-4].strip()
    if sign:
        span = _span(t)
        if span is None:
            raise ValueError("not a time span such as -10min, -2h or -1d")
        return Point(ts=now + sign * span)
    try:
        dt = datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ValueError("not a seq, a time span (-10min), a time (22:31, yesterday "
                         "22:00, 2026-11-24 10:00, ISO 8601) or @EPOCH") from None
    if dt.tzinfo is None:
        dt = dt.astimezone()  # a time without a zone is local time, as journalctl reads it
    return Point(ts=dt.timestamp())
