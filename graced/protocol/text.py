"""Text that came from the monitored world or a client, made safe for a terminal or a log.

Control characters are escaped, so a subject, summary or reason cannot move the cursor,
set the title or the colours, forge a log line, or hide text (C0 and C1 controls, DEL,
line and paragraph separators, bidirectional overrides). Both sides use it: gracectl for
what it prints, graced for its log lines.
"""

from __future__ import annotations

import re
from typing import Any

_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\x1b": "\\e"}


def _escape(m: re.Match[str]) -> str:
    c = m.group()
    return _NAMED.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")


def safe(value: Any, limit: int | None = None) -> str:
    """``value`` as one line of text with every control character escaped; at most
    ``limit`` characters of it (then an ellipsis) when given."""
    text = value if isinstance(value, str) else str(value)
    if limit is not None and len(text) > limit:
        text = text[:limit] + "…"
    return _CONTROL.sub(_escape, text)
