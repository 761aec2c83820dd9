"""Text for a human's terminal: whatever the daemon or the monitored world sent is shown
with its control characters escaped, so a log line or a probe's output cannot move the
cursor, set the title or the colours, or hide text (C0 and C1 controls, DEL, line and
paragraph separators, bidirectional overrides). ``--json`` output is exact data and
never goes through here.
"""

from __future__ import annotations

from typing import Any

import click

from graced.protocol.text import safe

__all__ = ["echo", "safe", "safe_lines", "table"]


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
