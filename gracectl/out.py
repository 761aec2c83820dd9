"""gracectl's one output module: width, colour, clock and escaping for a human's terminal.

- **Escaping.** Whatever the daemon or the monitored world sent is shown with its control
  characters escaped, so a log line or a probe's output cannot move the cursor, set the
  title or the colours, or hide text (C0 and C1 controls, DEL, line and paragraph
  separators, bidirectional overrides). ``--json`` output is exact data and never goes
  through here.
- **Width.** Tables fit the terminal: a column too wide is cut with ``…`` (a subject
  from the left, keeping the end that tells paths apart). Nothing is cut when stdout is
  not a terminal (a pipe, a file) or with ``--wide``.
- **Colour** only on a terminal, never with ``NO_COLOR`` (https://no-color.org) set and
  not empty, nor with ``--color=never``; ``--color=always`` forces it, NO_COLOR or not
  (a flag overrides the environment).
- **One clock.** Human output shows local time with its UTC offset in ISO 8601
  (``2026-11-24T10:00:05+01:00``); ``--utc`` shows UTC (``…Z``).
- **Values** are shown as JSON shows them (``null``, ``true``, ``1.5``), and a string is
  quoted when it holds a space, a quote, an ``=`` or nothing at all.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO, Any

from graced.protocol.text import safe

__all__ = ["SETTINGS", "Cell", "Column", "echo", "fit", "fold", "kv", "quantity",
           "quantity_in", "reason", "safe", "safe_lines", "table", "terminal_width",
           "use_colour", "value", "when"]

ELLIPSIS = "…"
TAIL_OUTPUTS = ("short", "short-iso", "json", "jsonl", "cat")
"""tail -o: short (time, seq, topic, payload; short-iso the same, as its times are ISO
8601 already), json and jsonl (each event in its exact signed form, one a line), cat (the
payload alone)."""


@dataclass
class Settings:
    """What the command line asked for (the root's --color, each command's --wide/--utc)."""

    colour: str = "auto"  # auto | always | never
    wide: bool = False
    utc: bool = False


SETTINGS = Settings()


# -- colour -------------------------------------------------------------------------

def use_colour(stream: IO[str] | None = None) -> bool:
    """Colour for this stream: --color=never or always (or GRACE_COLOR) decide; else
    (auto) never with NO_COLOR set and not empty (https://no-color.org: a flag overrides
    it), else only on a terminal that is not 'dumb'."""
    if SETTINGS.colour in ("never", "always"):
        return SETTINGS.colour == "always"
    if os.environ.get("NO_COLOR"):
        return False
    stream = stream or sys.stdout
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        tty = False
    return tty and os.environ.get("TERM") != "dumb"


_SGR = {"red": "31", "green": "32", "yellow": "33", "blue": "34", "magenta": "35",
        "cyan": "36", "bold": "1", "dim": "2"}


def paint(text: str, colour: str | None, stream: IO[str] | None = None) -> str:
    """``text`` in ``colour`` when colour is on for ``stream`` (already escaped text)."""
    if not colour or colour not in _SGR or not use_colour(stream):
        return text
    return f"\x1b[{_SGR[colour]}m{text}\x1b[0m"


# -- width --------------------------------------------------------------------------

def terminal_width(stream: IO[str] | None = None) -> int | None:
    """Columns to fit in, or None for no limit (--wide, or not a terminal)."""
    if SETTINGS.wide:
        return None
    stream = stream or sys.stdout
    try:
        if not stream.isatty():
            return None
        return os.get_terminal_size(stream.fileno()).columns or None
    except (AttributeError, ValueError, OSError):
        try:
            return int(os.environ.get("COLUMNS", "")) or None
        except ValueError:
            return None


def fit(text: str, width: int, keep_end: bool = False) -> str:
    """``text`` in at most ``width`` characters, cut with ``…`` (at the start when
    ``keep_end``: a path's last part is what tells it apart)."""
    if len(text) <= width:
        return text
    if width <= 1:
        return ELLIPSIS[:width]
    return ELLIPSIS + text[-(width - 1):] if keep_end else text[:width - 1] + ELLIPSIS


@dataclass
class Cell:
    """A table cell with a colour (the text is escaped and measured without it)."""

    text: str
    colour: str | None = None


@dataclass
class Column:
    """A table column: ``shrink`` (0 never; higher gives up width first) down to
    ``minimum`` (never below the header's width); ``keep_end`` cuts from the left;
    ``right`` aligns right. A ``spill`` column (a reason, a match) that would be cut
    moves under each row instead, wrapped at words, so it is read whole. A column with a
    ``drop`` rank is left out (the highest rank first) when the table, every column at
    its minimum, is still wider than the terminal: a column that is never cut (a name a
    command takes) keeps its width."""

    header: str
    shrink: int = 0
    minimum: int = 8
    keep_end: bool = False
    right: bool = False
    spill: bool = False
    drop: int = 0


SPILL_INDENT = "    "


def table(rows: Sequence[Sequence[Any]], headers: Sequence[str | Column],
          width: int | None = -1, stream: IO[str] | None = None,
          dropped: list[str] | None = None) -> str:
    """A plain-text table: a header line, a rule, the rows; cells escaped; fitted to the
    terminal (``width`` -1) unless piped or --wide. The headers of the columns left out
    to fit are appended to ``dropped`` (for the caller's note)."""
    every = [h if isinstance(h, Column) else Column(h) for h in headers]
    if width == -1:
        width = terminal_width(stream)
    cells = [[c if isinstance(c, Cell) else Cell(_plain(c)) for c in row] for row in rows]
    for row in cells:
        row.extend(Cell("") for _ in range(len(every) - len(row)))
        for c in row:
            c.text = safe(c.text)
    natural = [max([len(col.header)] + [len(r[i].text) for r in cells])
               for i, col in enumerate(every)]
    shown = list(range(len(every)))  # the columns on the row's line, by index
    widths = list(natural)
    spilled: int | None = None
    if width is not None and _total(widths) > width:
        _shrink(every, widths, width)
        spill = next((i for i, c in enumerate(every) if c.spill), None)
        if spill is not None and (widths[spill] < natural[spill] or _total(widths) > width):
            spilled = spill
            shown.remove(spill)
            widths = list(natural)
            _shrink(every, widths, width, shown)
        for i in sorted((i for i in shown if every[i].drop), key=lambda i: -every[i].drop):
            if _total([widths[j] for j in shown]) <= width:
                break
            shown.remove(i)
            if dropped is not None:
                dropped.append(every[i].header)
            widths = list(natural)
            _shrink(every, widths, width, shown)
    cols = [every[i] for i in shown]
    colour = use_colour(stream)

    def line(parts: list[Cell]) -> str:
        out = []
        for col, i, c in zip(cols, shown, parts, strict=True):
            text = fit(c.text, widths[i], col.keep_end)
            pad = " " * (widths[i] - len(text))
            if colour and c.colour:
                text = paint(text, c.colour, stream)
            out.append(pad + text if col.right else text + pad)
        return "  ".join(out).rstrip()

    lines = [line([Cell(c.header) for c in cols]), "  ".join("-" * widths[i] for i in shown)]
    for row in cells:
        lines.append(line([row[i] for i in shown]))
        if spilled is None:
            continue
        extra = row[spilled]
        if extra.text and extra.text != "-":  # nothing to say: no line for it
            assert width is not None
            # Whole: wrapped at words under the row (a word longer than a line split).
            for text in _spill_lines(extra.text, width):
                lines.append(text[:len(SPILL_INDENT)] + (
                    paint(text[len(SPILL_INDENT):], extra.colour, stream)
                    if colour and extra.colour else text[len(SPILL_INDENT):]))
    return "\n".join(lines)


def _spill_lines(text: str, width: int) -> list[str]:
    """A spilled cell's lines under its row: indented, wrapped at words to ``width``,
    its continuation lines indented two more (none of it cut)."""
    import textwrap

    if len(SPILL_INDENT) + len(text) <= width:
        return [SPILL_INDENT + text]
    return textwrap.wrap(text, max(len(SPILL_INDENT) + 12, width),
                         initial_indent=SPILL_INDENT, subsequent_indent=SPILL_INDENT + "  ",
                         break_long_words=True, break_on_hyphens=False) or [SPILL_INDENT]


def _total(widths: list[int]) -> int:
    return sum(widths) + 2 * (len(widths) - 1)


def _shrink(cols: list[Column], widths: list[int], limit: int,
            shown: list[int] | None = None) -> None:
    """Narrow the shrinkable columns of ``shown`` (default: all), the widest first (by
    weight), until those fit or each is at its minimum."""
    shown = list(range(len(cols))) if shown is None else shown
    floor = [max(c.minimum, len(c.header), 1) for c in cols]
    while _total([widths[i] for i in shown]) > limit:
        able = [i for i in shown if cols[i].shrink and widths[i] > floor[i]]
        if not able:
            return
        i = max(able, key=lambda j: (widths[j] - floor[j]) * cols[j].shrink)
        widths[i] -= 1


_LABEL = re.compile(r"^(\s*)(\S+(?: \S+)?\s{2,}|(?:\d+\. )?[\w-]+(?: [\w-]+)?: +)?")
"""A line's leading spaces and its label: a column label (``outcome   ``), a field
(``plan: ``, ``targets now: ``, ``values: ``) or a numbered step's (``1. run: ``)."""
HANG = 2
"""How much deeper than its line a continuation without a label is indented."""


def fold(text: str, width: int | None = -1, stream: IO[str] | None = None) -> str:
    """Prose lines for a human's terminal (escaped already): each one longer than the
    terminal is wrapped at spaces, its continuation indented under its text (after a
    label such as ``outcome   `` or ``plan: ``; without one, ``HANG`` deeper than the
    line), a word longer than a line cut into pieces; nothing changes when piped or with
    --wide. Every plan (missions show, approve, playbooks run) is folded by it."""
    if width == -1:
        width = terminal_width(stream)
    if width is None:
        return text
    import textwrap

    out: list[str] = []
    for line in text.split("\n"):
        if len(line) <= width:
            out.append(line)
            continue
        m = _LABEL.match(line)
        assert m is not None  # every part of it is optional
        indent = len(m.group(0)) if m.group(2) else len(m.group(1)) + HANG
        if indent > width // 2:
            indent = len(m.group(1)) + HANG
        out.extend(textwrap.wrap(line, width, subsequent_indent=" " * min(indent, width // 2),
                                 break_long_words=True, break_on_hyphens=False,
                                 drop_whitespace=True) or [""])
    return "\n".join(out)


# -- values -------------------------------------------------------------------------

_NEEDS_QUOTES = re.compile(r"[\s\"'=\\]")


def value(v: Any) -> str:
    """A value as JSON writes it (null, true, 1.5, lists and objects), a string bare
    unless it holds a space, a quote, an '=' or a backslash, or is empty: then JSON-quoted."""
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False) if not v or _NEEDS_QUOTES.search(v) else v
    return json.dumps(v, ensure_ascii=False, sort_keys=True)


def _plain(v: Any) -> str:
    """A table cell: a string as it is, None as '-', anything else as JSON."""
    if v is None:
        return "-"
    return v if isinstance(v, str) else value(v)


SINGULAR = {"processes": "process", "events": "event"}
"""Count units a detector names in the plural, and their singular (``1 process``)."""
SHORT_UNITS = {"per core": "/core", "processes": "procs", "process": "proc",
               "events": "ev", "event": "ev", "requests/s": "req/s", "lines/s": "ln/s"}
"""Units abbreviated (whole words, never cut) where a narrow column needs it."""


def quantity(number: float, unit: str, digits: str = "g") -> str:
    """A sample's value and unit (``1 process``, ``3 processes``, ``93.1 %``)."""
    if number == 1:
        unit = SINGULAR.get(unit, unit)
    return f"{number:{digits}} {unit}".strip()


def quantity_in(number: float, unit: str, width: int, digits: str = ".4g") -> str:
    """:func:`quantity` in ``width`` characters: the unit abbreviated, else dropped,
    never cut mid-word (the number is kept whole)."""
    whole = quantity(number, unit, digits)
    if len(whole) <= width:
        return whole
    if number == 1:
        unit = SINGULAR.get(unit, unit)
    short = SHORT_UNITS.get(unit)
    if short is not None:
        text = f"{number:{digits}}" + ("" if short.startswith("/") else " ") + short
        if len(text) <= width:
            return text
    return f"{number:{digits}}"


def kv(payload: Any) -> str:
    """A payload as 'key=value ...' (values as :func:`value` writes them)."""
    if isinstance(payload, dict):
        return " ".join(f"{k}={value(v)}" for k, v in payload.items())
    return value(payload)


def reason(summary: str, detector: str, subject: str) -> str:
    """A mission's or sample's summary without the detector and subject its row shows
    already ('memory host at 93.1 %, above …' -> 'at 93.1 %, above …')."""
    text = summary or ""
    for prefix in (f"{detector} {subject}", detector):
        if prefix and text.startswith(prefix):
            rest = text[len(prefix):]
            if rest[:1] in (":", " ", ""):
                text = rest.lstrip(": ").strip() or text
                break
    return text


# -- time ---------------------------------------------------------------------------

def when(t: float | str | None, ms: bool = False) -> str:
    """A time for a human: local ISO 8601 with its offset (``--utc``: UTC, ``Z``);
    ``t`` is epoch seconds or an event's ISO 8601 ``ts``; '-' when there is none."""
    if t is None or t == "":
        return "-"
    from datetime import UTC, datetime

    try:
        if isinstance(t, str):
            dt = datetime.fromisoformat(t.replace("Z", "+00:00"))
            if dt.tzinfo is None:
                dt = dt.replace(tzinfo=UTC)
        else:
            dt = datetime.fromtimestamp(float(t), UTC)
    except (ValueError, OverflowError, OSError, TypeError):
        return safe(str(t))
    dt = dt.astimezone(UTC) if SETTINGS.utc else dt.astimezone()
    text = dt.isoformat(timespec="milliseconds" if ms else "seconds")
    return text.replace("+00:00", "Z") if SETTINGS.utc else text


# -- printing -----------------------------------------------------------------------

def safe_lines(value: Any) -> list[str]:
    """Multi-line text (a step's output) as safe lines."""
    text = value if isinstance(value, str) else str(value)
    return [safe(line) for line in text.splitlines()]


def _keep_lines(text: str) -> str:
    return "\n".join(safe(line) for line in text.split("\n"))


def safe_text(text: str) -> str:
    """Text made safe line by line (its line breaks kept), as :func:`echo` prints it."""
    return _keep_lines(text)


def echo(text: Any = "", err: bool = False, nl: bool = True) -> None:
    """Print human text: line breaks kept, every other control escaped."""
    stream = sys.stderr if err else sys.stdout
    stream.write(_keep_lines(text if isinstance(text, str) else str(text)) + ("\n" if nl else ""))
    stream.flush()


def write(text: str, err: bool = False) -> None:
    """Print text already made safe (a table: cells escaped, colour ours), as it is."""
    stream = sys.stderr if err else sys.stdout
    stream.write(text + "\n")
    stream.flush()


def stderr_note(message: str) -> None:
    """One line on stderr for a human (what the daemon sent in it shown escaped), folded
    to the width of a terminal (one line when stderr is not a terminal)."""
    print(fold(f"gracectl: {safe(message)}", stream=sys.stderr), file=sys.stderr,
          flush=True)


def progress(label: str) -> Any:
    """A progress reporter for long work: (done, total) to a line on stderr redrawn in
    place, on a terminal only (None elsewhere: a pipe or a log gets nothing)."""
    try:
        if not sys.stderr.isatty():
            return None
    except (AttributeError, ValueError):
        return None

    def report(done: int, total: int) -> None:
        end = "\n" if done >= total else ""
        sys.stderr.write(f"\r{label}: {done}/{total} ({100 * done // max(1, total)}%)"
                         + end)
        sys.stderr.flush()

    return report

def age(seconds: float) -> str:
    """Compact age: 42s, 3m05s, 2h10m, 4d03h."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 86400}d{(s % 86400) // 3600:02d}h"


def as_typed(arg: str) -> str:
    """A command line argument as typed: bytes that were not UTF-8 (which Python decodes
    to lone surrogates) as ``\\xff`` escapes, so an error message can quote it."""
    try:
        return arg.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return ascii(arg)[1:-1]
