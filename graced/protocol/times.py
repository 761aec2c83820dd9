"""One form for every time in JSON a person or a script reads: ISO 8601 in UTC with
microseconds and ``Z``, the form of an event's signed ``ts`` (``2026-12-01T21:00:00.123456Z``).

The daemon keeps times as seconds since the epoch inside (it computes with them, and the
answers it signs carry them so); what gracectl prints with ``--json`` passes through
:func:`iso_times`, and the payloads graced writes in new events carry the ISO form.

A *time field* is a key ending in ``_at`` or one of :data:`TIME_KEYS`. Durations are not
times: ``uptime``, ``ttr``, ``mttr_s``, ``duration_s``, ``lag_seconds`` ... stay numbers of
seconds. Pure: no I/O, no clock.
"""

from __future__ import annotations

import math
from typing import Any

from .signing import format_ts, parse_ts

__all__ = ["TIME_KEYS", "VERBATIM", "epoch", "is_instant", "is_time_key", "iso",
           "iso_times", "same_instant", "shown"]

TIME_KEYS = frozenset({
    "ts", "at", "now", "until", "first_seen", "last_seen", "last_run", "verify_started",
    "failing_since", "last_heartbeat", "verify_until", "normal_since",
})
"""Time fields whose name does not end in ``_at``."""

VERBATIM = frozenset({"detail"})
"""Keys whose values are the monitored world's own data, never rewritten."""


def is_time_key(key: object) -> bool:
    """Whether a JSON key names a point in time (not a duration)."""
    return isinstance(key, str) and (key in TIME_KEYS or key.endswith("_at"))


def iso(seconds: float) -> str:
    """Seconds since the epoch as ``YYYY-MM-DDTHH:MM:SS.ffffffZ``; ValueError when the
    number is no time a calendar can show (NaN, infinite, beyond year 9999)."""
    if not math.isfinite(seconds):
        raise ValueError("not a finite time")
    try:
        return format_ts(seconds)
    except (OverflowError, OSError) as exc:
        raise ValueError(f"time {seconds!r} out of range") from exc


def shown(seconds: float) -> str | float:
    """A time as JSON shows it: :func:`iso`, or the number itself when no calendar can
    show it (a bound-checked field is never that far out)."""
    try:
        return iso(float(seconds))
    except (ValueError, OverflowError):
        return seconds


def iso_times(data: Any) -> Any:
    """A copy of ``data`` (JSON values) with every number in a time field written as
    :func:`iso` writes it; strings (already ISO: an event's ``ts``), null and
    everything else kept as they are. A number no calendar can show is kept too, and a
    ``detail`` (a detector's own figures, such as a pressure's ``now``) as it is."""
    if isinstance(data, list):
        return [iso_times(v) for v in data]
    if not isinstance(data, dict):
        return data
    out: dict[Any, Any] = {}
    for key, value in data.items():
        if key in VERBATIM:
            out[key] = value
        elif is_time_key(key) and isinstance(value, (int, float)) \
                and not isinstance(value, bool):
            out[key] = shown(value)
        else:
            out[key] = iso_times(value)
    return out


def epoch(value: Any) -> float | None:
    """A time field's value as seconds since the epoch, whichever form it has (a number
    from an older graced or an answer, an ISO string from a new event); None if neither."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return parse_ts(value)
        except ValueError:
            return None
    return None


def is_instant(value: Any) -> bool:
    """Whether ``value`` is a time in either form a request may name one: seconds since
    the epoch (a number, not a boolean) or the ISO form :func:`iso` writes."""
    if isinstance(value, str):
        return epoch(value) is not None
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def same_instant(given: Any, seconds: float) -> bool:
    """Whether ``given`` names exactly the time ``seconds``: the same number, or its ISO
    form as ``--json`` printed it (to the microsecond, as the daemon keeps it)."""
    if isinstance(given, str):
        try:
            return given == iso(seconds)
        except ValueError:
            return False
    return isinstance(given, (int, float)) and not isinstance(given, bool) \
        and given == seconds
