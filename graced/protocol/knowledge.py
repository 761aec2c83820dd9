"""The knowledge export format: bounds on every figure, and its signature. Pure code.

A knowledge export is one JSON object::

    {"format": "grace-knowledge", "version": 2, "source": DAEMON_ID, "host": HOST,
     "exported_at": EPOCH, "patterns": [RECORD, ...], "kid": KID, "sig": SIG}

``sig`` is the exporting daemon's Ed25519 signature over the canonical form of every
other field (the same signing bytes as a response frame, see docs/protocol.md), so an
edited export no longer verifies. A RECORD is one playbook's figures for one symptom::

    {"signature": "DETECTOR:SUBJECT", "detector": ..., "subject": ..., "playbook": ...,
     "successes": N, "failures": N, "ttr_total": SECONDS, "ttr_count": N,
     "first_seen": EPOCH, "last_seen": EPOCH}

Bounds (checked on import, and on every stored row when graced starts): counts are
integers from 0 to :data:`MAX_COUNT`; ``ttr_count`` at most ``successes``; times are
finite and non-negative, a time to resolve at most :data:`MAX_TTR` seconds on average,
epochs at most :data:`MAX_EPOCH` and, on import, no later than the importer's clock plus
:data:`MAX_SKEW` (a time in the future would pass every "since" and "older than" bound);
strings non-empty, at most :data:`MAX_TEXT` characters, and free of control characters
(C0, C1, line separators, format, bidirectional and default-ignorable code points such as
U+061C or zero-width spaces: :data:`graced.protocol.text.UNSAFE_CHARS`) and lone
surrogates, so a name cannot forge an output line or pass for another; at most
:data:`MAX_RECORDS` records in one export, each (pattern, playbook) once, and at most
:data:`MAX_PLAYBOOKS` playbooks for one pattern.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from .signing import check_signature, key_id
from .text import UNSAFE_CHARS

EXPORT_FORMAT = "grace-knowledge"
EXPORT_VERSION = 2
MAX_COUNT = 1_000_000  # runs of one playbook for one symptom
MAX_TTR = 7 * 86400.0  # seconds: a mean time to resolve above a week is not a measurement
MAX_EPOCH = 1e10  # about the year 2286
MAX_TEXT = 1000
MAX_RECORDS = 100_000  # records in one export, and records kept per source
MAX_FILE_BYTES = 32 * 2**20
MAX_PLAYBOOKS = 64  # playbooks for one pattern, every source together
MAX_TOTAL_RECORDS = 200_000  # records a daemon holds, every source together
MAX_SOURCES = 100  # daemons whose knowledge one daemon holds (records from them)
MAX_PINNED = 1000  # daemons whose key and last export time one daemon remembers
# A time further ahead of this host's clock than this is refused on import (and a stored
# one quarantined at start): "older than the last import" and "failed within the last
# hour" must not let one figure hold for ever.
MAX_SKEW = 600.0

# Control characters (as graced.protocol.text escapes them) and lone surrogates.
_UNSAFE = re.compile(f"[{UNSAFE_CHARS}\ud800-\udfff]")

COUNTS = ("successes", "failures", "ttr_count")
TIMES = ("ttr_total", "first_seen", "last_seen")
TEXTS = ("signature", "detector", "subject", "playbook")


def text(v: Any, where: str, limit: int = MAX_TEXT, *, empty: bool = False) -> str:
    """A short string with no control character or lone surrogate; raises ValueError."""
    if not isinstance(v, str) or (not v and not empty) or len(v) > limit:
        raise ValueError(f"{where}: must be a non-empty string of at most {limit} characters")
    bad = _UNSAFE.search(v)
    if bad:
        raise ValueError(f"{where}: holds the control character U+{ord(bad.group()):04X}")
    return v


def count(v: Any, where: str) -> int:
    """An integer count within bounds (an integral float such as ``5.0`` or ``-0.0`` too)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"{where}: must be an integer count")
    if isinstance(v, float) and not (math.isfinite(v) and v.is_integer()):
        raise ValueError(f"{where}: must be an integer count, not {v!r}")
    if not 0 <= v <= MAX_COUNT:
        raise ValueError(f"{where}: must be between 0 and {MAX_COUNT}")
    return int(v)


def seconds(v: Any, where: str, upper: float) -> float:
    """A finite, non-negative time no larger than ``upper`` (``-0.0`` becomes ``0.0``)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"{where}: must be a number")
    if isinstance(v, int) and abs(v) > upper:
        raise ValueError(f"{where}: must be between 0 and {upper:g}")
    f = float(v)
    if not math.isfinite(f) or not 0 <= f <= upper:
        raise ValueError(f"{where}: must be between 0 and {upper:g}")
    return f + 0.0


def not_after(v: float, where: str, latest: float | None) -> float:
    """``v`` unless it is later than ``latest`` (this host's clock plus MAX_SKEW)."""
    if latest is not None and v > latest:
        raise ValueError(f"{where}: {v:.0f} is in the future (more than {MAX_SKEW:g} s "
                         "ahead of this host's clock)")
    return v


def check_record(p: Any, where: str, *, controls: bool = False,
                 latest: float | None = None) -> dict[str, Any]:
    """One record, validated and normalised; raises ValueError naming the first bad field.

    ``controls``: names may hold control characters (this host's own records: a subject
    is monitored data; they are escaped wherever shown, and never exported).
    ``latest``: no time may be later (now plus MAX_SKEW)."""
    if not isinstance(p, dict):
        raise ValueError(f"{where}: must be an object")
    item: dict[str, Any] = {}
    for key in TEXTS:
        limit = 2 * MAX_TEXT + 1 if key == "signature" else MAX_TEXT
        v = p.get(key)
        if controls and isinstance(v, str) and v and len(v) <= limit:
            item[key] = v
            continue
        item[key] = text(v, f"{where}.{key}", limit)
    if item["signature"] != f"{item['detector']}:{item['subject']}":
        raise ValueError(f"{where}.signature: must be DETECTOR:SUBJECT of this record")
    for key in COUNTS:
        item[key] = count(p.get(key), f"{where}.{key}")
    for key in ("first_seen", "last_seen"):
        item[key] = not_after(seconds(p.get(key), f"{where}.{key}", MAX_EPOCH),
                              f"{where}.{key}", latest)
    item["ttr_total"] = seconds(p.get("ttr_total"), f"{where}.ttr_total",
                                MAX_TTR * MAX_COUNT)
    if item["ttr_count"] > item["successes"]:
        raise ValueError(f"{where}.ttr_count: cannot exceed successes")
    if item["ttr_total"] > MAX_TTR * item["ttr_count"]:
        raise ValueError(f"{where}.ttr_total: mean time to resolve above {MAX_TTR:g} s "
                         "(or time without a count)")
    if item["first_seen"] > item["last_seen"]:
        raise ValueError(f"{where}.first_seen: after last_seen")
    return item


def check(patterns: Any, now: float | None = None) -> list[dict[str, Any]]:
    """Validate an export's records (no time after ``now`` plus MAX_SKEW, when given);
    raises ValueError naming the first bad field."""
    if not isinstance(patterns, list):
        raise ValueError("patterns: must be a list")
    if len(patterns) > MAX_RECORDS:
        raise ValueError(f"patterns: {len(patterns)} records; at most {MAX_RECORDS}")
    latest = None if now is None else now + MAX_SKEW
    out = [check_record(p, f"patterns[{i}]", latest=latest) for i, p in enumerate(patterns)]
    seen: set[tuple[str, str]] = set()
    per: dict[str, int] = {}
    for i, p in enumerate(out):
        key = (p["signature"], p["playbook"])
        if key in seen:
            raise ValueError(f"patterns[{i}]: a second record for {key[0]} {key[1]}")
        seen.add(key)
        per[key[0]] = per.get(key[0], 0) + 1
        if per[key[0]] > MAX_PLAYBOOKS:
            raise ValueError(f"patterns[{i}].playbook: more than {MAX_PLAYBOOKS} playbooks "
                             f"for pattern {key[0]}")
    return out


def exportable(p: dict[str, Any]) -> bool:
    """Would an importer take this record's names (no control characters)?"""
    return all(isinstance(p.get(k), str) and not _UNSAFE.search(p[k]) for k in TEXTS)


def check_header(data: Any, now: float | None = None) -> None:
    """The export's envelope (everything but the records' figures); raises ValueError."""
    if not isinstance(data, dict) or data.get("format") != EXPORT_FORMAT:
        raise ValueError(f"format: not a '{EXPORT_FORMAT}' export")
    if data.get("version") == 1:
        raise ValueError("version: 1 exports are unsigned and no longer accepted; export "
                         "again from the source host")
    if data.get("version") != EXPORT_VERSION:
        raise ValueError(f"version: {data.get('version')!r} is not supported "
                         f"({EXPORT_VERSION} is)")
    for key in ("kid", "sig"):
        v = data.get(key)
        if not isinstance(v, str) or not v or len(v) > MAX_TEXT:
            raise ValueError(f"{key}: must be a string (an unsigned export)")
    text(data.get("source"), "source", 200)
    text(data.get("host"), "host", empty=True)
    not_after(seconds(data.get("exported_at"), "exported_at", MAX_EPOCH), "exported_at",
              None if now is None else now + MAX_SKEW)
    if not isinstance(data.get("patterns"), list):
        raise ValueError("patterns: must be a list")


def parse_export(raw: bytes, now: float | None = None
                 ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """An export file's bytes, parsed and checked (not its signature): the document as
    signed, and its records normalised, every time no later than ``now`` plus MAX_SKEW
    (when given: an importer's clock). Raises ValueError
    naming the first thing wrong. Bounded: a file over :data:`MAX_FILE_BYTES` is refused
    unread, and nesting too deep for the parser is an error like any other."""
    if len(raw) > MAX_FILE_BYTES:
        raise ValueError(f"larger than {MAX_FILE_BYTES // 2**20} MB; an export holds at "
                         f"most {MAX_RECORDS} records")
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8: {exc.reason} at byte {exc.start}") from None
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"not JSON: {str(exc)[:200]}") from None
    check_header(data, now)
    return data, check(data["patterns"], now)


def verify_export(data: dict[str, Any], public_key: bytes) -> None:
    """Check the export's signature against a key the operator trusts; raises ValueError."""
    if data.get("kid") != key_id(public_key):
        raise ValueError(f"kid: signed by key {data.get('kid')}, not by the trusted key "
                         f"{key_id(public_key)} of daemon {data.get('source')}")
    if not check_signature(data, public_key):
        raise ValueError("sig: the signature does not match: the file was edited after "
                         "it was exported")
