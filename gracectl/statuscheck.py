"""What a status answer must hold, field by field, before anything of it is printed,
counted or turned into an exit status (text, --json and -q alike).

A status answer signed by the trusted key can still be anything (an impostor holding
the key, a graced that breaks the protocol): a ``"false"`` that reads as true, a list
where a pid goes, a 15 MiB "number". Each field status shows or computes with has its
kind here; one that is not what it should be is a protocol violation (exit 14) naming
the field, never a health read from the wrong type.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from .errors import ProtocolViolation

MAX_TEXT = 4096  # characters of one string status shows
MAX_ITEMS = 1000  # entries of one list or object status shows
MAX_DURATION = 100 * 365 * 86400.0  # seconds: an uptime, a max_age
MAX_NUMBER = 1e18  # bytes, milliseconds, seconds of lag
CLOCK_SKEW = 3600.0  # how far in the future a daemon's "since" may be (its clock)

Check = Callable[[Any], str | None]  # what is wrong with a value, None when nothing


def _int(v: Any) -> str | None:
    ok = type(v) is int and 0 <= v < 2**63
    return None if ok else "not a whole number from 0"


def _bool(v: Any) -> str | None:
    return None if type(v) is bool else "not true or false"


def _number(high: float) -> Check:
    def check(v: Any) -> str | None:
        ok = type(v) in (int, float) and math.isfinite(v) and 0 <= v <= high
        return None if ok else f"not a number from 0 to {high:g}"
    return check


def _since(v: Any) -> str | None:
    """A time something started (epoch seconds): not later than now, give or take."""
    if type(v) not in (int, float) or not math.isfinite(v) or v < 0:
        return "not a time"
    if v > time.time() + CLOCK_SKEW:
        return "a time in the future"
    return None


def _text(v: Any) -> str | None:
    return None if isinstance(v, str) and len(v) <= MAX_TEXT else \
        f"not a string of at most {MAX_TEXT} characters"


def _at(where: str, bad: str | None) -> str | None:
    """``bad`` found at ``where`` (``.name`` or ``[index]``), as a path: ``.a.b: why``."""
    if bad is None:
        return None
    return where + (bad if bad.startswith((".", "[")) else f": {bad}")


def _list(item: Check) -> Check:
    def check(v: Any) -> str | None:
        if not isinstance(v, list) or len(v) > MAX_ITEMS:
            return f"not a list of at most {MAX_ITEMS}"
        return next((_at(f"[{i}]", bad) for i, x in enumerate(v) if (bad := item(x))), None)
    return check


def _map(value: Check) -> Check:
    """An object of at most MAX_ITEMS names (strings) to values."""
    def check(v: Any) -> str | None:
        if not isinstance(v, dict) or len(v) > MAX_ITEMS:
            return f"not an object of at most {MAX_ITEMS} entries"
        for name, x in v.items():
            bad = _text(name) or value(x)
            if bad:
                return _at(f"[{name[:40]!r}]", bad)
        return None
    return check


Schema = dict[str, Any]
"""Field -> its check, or the schema (a dict) of the object it holds. A name ending in
``?`` may be absent or null."""


def _null_or(check: Check) -> Check:
    return lambda v: None if v is None else check(v)


def _object(schema: Schema) -> Check:
    def check(v: Any) -> str | None:
        if not isinstance(v, dict):
            return "not an object"
        for key, want in schema.items():
            name = key.rstrip("?")
            value = v.get(name)
            if key.endswith("?") and value is None:
                continue
            bad = (_object(want) if isinstance(want, dict) else want)(value)
            if bad:
                return _at(f".{name}", bad)
        return None
    return check


ERRORS = _map(_object({"last_error?": _text}))
STATUS: Schema = {
    "version": _text, "host": _text, "pid": _int, "daemon_id": _text,
    "uptime": _number(MAX_DURATION), "kid": _text, "config": _text, "state_dir": _text,
    "head_seq": _int,
    "executor": {"paused": _bool, "mode": _text, "actions_last_hour": _int,
                 "max_actions_per_hour": _int, "silences?": _int},
    "missions": _map(_int), "awaiting_approval?": _int, "escalated?": _list(_int),
    "held?": _list(_int), "expired?": _list(_int),
    "failing_detectors": ERRORS, "failing_probes?": ERRORS, "detectors_total": _int,
    "degraded": _list(_text),
    "journal": {"size_bytes": _number(MAX_NUMBER), "commit_latency_ms": _number(MAX_NUMBER),
                "commit_errors": _int, "last_error": _null_or(_text),
                "failing_since?": _since, "pending?": _int, "first_seq?": _int,
                "retention?": {"max_size?": _number(MAX_NUMBER),
                               "max_age?": _number(MAX_DURATION), "first_seq?": _int,
                               "pruned?": _int}},
    "wire": {"clients": _int, "subscribers": _int, "dropped_total": _int,
             "refused_total": _int, "socket": _text, "tcp_ports": _list(_int)},
    "fleet?": {"connected": _bool, "lag_events": _int, "lag_seconds": _number(MAX_NUMBER),
               "disconnected_seconds?": _number(MAX_DURATION),
               "url": _text, "stream": _text, "acked_seq?": _int, "last_error?": _text},
    "learning?": {"strategy": _text, "patterns": _int, "outcomes": _int,
                  "success_rate_7d?": _number(1.0), "consulted_share?": _number(1.0),
                  "sources?": _int, "pinned?": _int, "loading?": _bool,
                  "quarantined?": {"rows?": _int}},
}


def check_status(st: dict[str, Any]) -> None:
    """Raise ProtocolViolation (exit 14) naming the first field of ``st`` that is not
    what status shows or computes with."""
    bad = _object(STATUS)(st)
    if bad:
        raise ProtocolViolation(f"a status answer with a malformed field "
                                f"({bad.removeprefix('.')[:200]})")
