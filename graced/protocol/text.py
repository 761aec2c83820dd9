"""Text that came from the monitored world or a client, made safe for a terminal or a log.

Control characters are escaped, so a subject, summary or reason cannot move the cursor,
set the title or the colours, forge a log line, or hide or disguise text: C0 and C1
controls, DEL, line and paragraph separators, and every format (Unicode category Cf),
bidirectional control (Bidi_Control, U+061C too) and default-ignorable code point
(zero-width spaces and joiners, word joiners, variation selectors, Hangul fillers, tags),
each of which changes how a line reads without showing itself. Both sides use it:
gracectl for what it prints, graced for its log lines.
"""

from __future__ import annotations

import re
from typing import Any

# Every code point of category Cf, Bidi_Control or Default_Ignorable_Code_Point (Unicode
# 15.1; tests/test_learning_review3.py checks it against unicodedata), with the C0 and C1
# controls, DEL and the line and paragraph separators: a regular-expression class body.
UNSAFE_CHARS = (
    "\x00-\x1f\x7f-\x9f\xad\u034f\u0600-\u0605\u061c\u06dd\u070f\u0890\u0891\u08e2"
    "\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f\u2028-\u202e\u2060-\u206f"
    "\u3164\ufe00-\ufe0f\ufeff\uffa0\ufff0-\ufffb\U000110bd\U000110cd"
    "\U00013430-\U0001343f\U0001bca0-\U0001bca3\U0001d173-\U0001d17a"
    "\U000e0000-\U000e0fff")
_CONTROL = re.compile(f"[{UNSAFE_CHARS}]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\x1b": "\\e"}


def _escape(m: re.Match[str]) -> str:
    c = ord(m.group())
    return _NAMED.get(m.group()) or (
        f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}" if c < 0x10000 else f"\\U{c:08x}")


def safe(value: Any, limit: int | None = None) -> str:
    """``value`` as one line of text with every control character escaped; at most
    ``limit`` characters of it (then an ellipsis) when given."""
    text = value if isinstance(value, str) else str(value)
    if limit is not None and len(text) > limit:
        text = text[:limit] + "…"
    return _CONTROL.sub(_escape, text)


def count(n: float, noun: str, plural: str | None = None) -> str:
    """``n`` and its noun in the right number: "1 run", "3 runs", "0.5 runs"."""
    return f"{n:g} {noun if n == 1 else plural or noun + 's'}"


def local_time(t: float) -> str:
    """Epoch seconds as a human reads them in a message: local ISO 8601 with the UTC
    offset (``2026-12-01T21:30:05+01:00``); the number itself if it is no time."""
    from datetime import datetime

    try:
        return datetime.fromtimestamp(float(t)).astimezone().isoformat(timespec="seconds")
    except (ValueError, OverflowError, OSError, TypeError):
        return safe(t)
