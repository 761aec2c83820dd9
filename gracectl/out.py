"""Text for a human's terminal: whatever the daemon or the monitored world sent is shown
with its control characters escaped, so a log line or a probe's output cannot move the
cursor, set the title or the colours, or hide text (C0 and C1 controls, DEL, line and
paragraph separators, bidirectional overrides). ``--json`` output is exact data and
never goes through here.
"""

from __future__ import annotations

import re
from typing import Any

import click

_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\x1b": "\\e"}


def _escape(m: re.Match[str]) -> str:
    c = m.group()
    return _NAMED.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")


def safe(value: Any) -> str:
    """``value`` as one line of text with every control character escaped."""
    text = value if isinstance(value, str) else str(value)
    return _CONTROL.sub(_escape, text)


def safe_lines(value: Any) -> list[str]:
    """Multi-line text (a step's output) as safe lines."""
    text = value if isinstance(value, str) else str(value)
    return [safe(line) for line in text.splitlines()]


def _keep_lines(text: str) -> str:
    return "\n".join(safe(line) for line in text.split("\n"))


def echo(text: Any = "", err: bool = False, nl: bool = True) -> None:
    """``click.echo`` for human text: line breaks kept, every other control escaped."""
    click.echo(_keep_lines(text if isinstance(text, str) else str(text)), err=err, nl=nl)


def table(rows: list[list[Any]], headers: list[str]) -> str:
    """A plain-text table (tabulate) of escaped cells."""
    from tabulate import tabulate

    return tabulate([[c if c is None or isinstance(c, (int, float)) else safe(c) for c in row]
                     for row in rows], headers=headers)
