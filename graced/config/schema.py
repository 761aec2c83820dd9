"""The machinery every config section shares: checks, type coercion, error locations.

A section is a frozen dataclass; each field is a key, its type hint is the key's type
and ``field(metadata=check(fn))`` adds a range check: ``fn(value)`` returns None when
the value is fine, else the reason. A table with a ``kind`` (detectors, notifiers) or an
``action`` (playbook steps) accepts only the keys its kind declares; :func:`build_table`
enforces that with ``allowed`` and narrows ranges with ``ranges``.
"""

from __future__ import annotations

import dataclasses
import re
import types
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import Any, Union, get_args, get_origin, get_type_hints
from urllib.parse import urlsplit

from ..owners import MAX_UID, check_user
from ..redact import redact_text

Check = Callable[[Any], "str | None"]
# Where a key is, for a message: (table, key, index of the table) -> "FILE:LINE: ".
Where = Callable[..., str]


class ConfigError(Exception):
    """A config file that cannot be used; the message says where and why."""


def check(fn: Check) -> dict[str, Any]:
    """Field metadata that gives a key its range check."""
    return {"check": fn}


def internal() -> dict[str, Any]:
    """Field metadata for what graced fills in itself (not a key of the file)."""
    return {"internal": True}


# --- checks: each returns None when the value is fine, else the reason ---------------

def positive(v: float) -> str | None:
    return None if v > 0 else "must be greater than 0"


def non_negative(v: float) -> str | None:
    return None if v >= 0 else "must not be negative"


def at_least(low: float, unit: str = "") -> Check:
    def fn(v: float) -> str | None:
        return None if v >= low else f"must be at least {low:g}{unit}"
    return fn


def between(low: float, high: float, *, open_low: bool = False) -> Check:
    """low <= v <= high (low < v with ``open_low``)."""
    def fn(v: float) -> str | None:
        ok = (low < v if open_low else low <= v) and v <= high
        return None if ok else (f"must be in ({low:g}, {high:g}]" if open_low
                                else f"must be between {low:g} and {high:g}")
    return fn


def one_of(choices: Collection[str]) -> Check:
    quoted = [f'"{x}"' for x in choices]
    reason = (f"must be {quoted[0]} or {quoted[1]}" if len(quoted) == 2
              else "must be one of " + ", ".join(quoted))

    def fn(v: str) -> str | None:
        return None if v in choices else reason
    return fn


def each(inner: Check) -> Check:
    """Check every item of a list."""
    def fn(v: list[Any]) -> str | None:
        for item in v:
            problem = inner(item)
            if problem:
                return f"{item!r}: {problem}"
        return None
    return fn


def non_empty(v: str) -> str | None:
    return None if v.strip() else "must not be empty"


def known_user(v: str) -> str | None:
    """A ``user`` key (signal steps, process detectors): a name or a uid this host's
    user database knows (graced.owners.check_user)."""
    return non_empty(v) or check_user(v)


def user_as_text(raw: dict[str, Any], table: str, at: Where, label: str) -> dict[str, Any]:
    """``raw`` with its ``user`` key as :func:`known_user` checks it: a uid written as a
    TOML integer is the same uid as its decimal string; anything but a string or a whole
    number in range is refused, naming the key."""
    user = raw.get("user")
    if isinstance(user, int) and not isinstance(user, bool):
        if not 0 <= user <= MAX_UID:
            raise ConfigError(f"{at(table, 'user')}{label} user: uid {user} is out of range "
                              f"(0 to {MAX_UID})")
        return {**raw, "user": str(user)}
    if user is not None and not isinstance(user, str):
        raise ConfigError(f"{at(table, 'user')}{label} user: expected a name or a uid, got "
                          f"{_type_name(user)}")
    return raw


def non_empty_list(v: list[Any]) -> str | None:
    return None if v else "must not be empty"


def absolute_path(v: str) -> str | None:
    return None if v.startswith("/") else "must be an absolute path"


def regex(v: str) -> str | None:
    try:
        re.compile(v)
    except re.error as exc:
        return f"not a valid regular expression: {exc}"
    return None


def http_url(v: str) -> str | None:
    if not v.startswith(("http://", "https://")):
        return "must be an http(s) URL"
    try:  # what a request would raise at run time (the URL is not echoed: secrets)
        parts = urlsplit(v)
        parts.port  # noqa: B018 - raises for a port out of range or not a number
    except ValueError as exc:
        return f"is not a usable URL ({exc})"
    if not parts.hostname:
        return "names no host"
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in v):
        return "holds white space or a control character"
    return None


def proxy_setting(v: str) -> str | None:
    return None if v in ("none", "env") or v.startswith("http://") else (
        'must be "none", "env" or an http:// proxy URL')


# --- where in the file ----------------------------------------------------------------

class Locator:
    """Finds the line of ``[table] key = ...`` in the TOML text, for error messages."""

    def __init__(self, text: str) -> None:
        self.lines = text.splitlines()

    def line_of(self, table: str, key: str | None, index: int = 0) -> int | None:
        """Line of ``key`` in the ``index``-th ``[table]`` (or its header if key is None)."""
        current, seen = "", -1
        for no, raw in enumerate(self.lines, 1):
            line = raw.strip()
            header = re.fullmatch(r"\[\[?\s*([^\]]+?)\s*\]\]?(\s*#.*)?", line)
            if header:
                current = header.group(1)
                if current == table:
                    seen += 1
                    if key is None and seen == index:
                        return no
                continue
            m = re.match(r"([A-Za-z0-9_\-\"']+)\s*=", line)
            if (m and current == table and m.group(1).strip("\"'") == key
                    and (seen == index or table == "")):
                return no
        return None


# --- types ----------------------------------------------------------------------------

def _type_name(value: Any) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string",
            list: "array", dict: "table"}.get(type(value), type(value).__name__)


def _coerce(value: Any, hint: Any) -> tuple[bool, Any]:
    """Return (ok, value) for a TOML value against a type hint."""
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        for arg in get_args(hint):
            ok, out = _coerce(value, arg)
            if ok:
                return ok, out
        return False, None
    if hint is type(None):
        return False, None
    if origin is list:
        (inner,) = get_args(hint)
        if not isinstance(value, list):
            return False, None
        out = []
        for item in value:
            ok, v = _coerce(item, inner)
            if not ok:
                return False, None
            out.append(v)
        return True, out
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        return False, None
    if hint is int:
        return (isinstance(value, int) and not isinstance(value, bool)), value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is str:
        return isinstance(value, str), value
    return False, None


def _expected(hint: Any) -> str:
    if get_origin(hint) in (Union, types.UnionType):
        return " or ".join(_expected(a) for a in get_args(hint) if a is not type(None))
    if get_origin(hint) is list:
        return "an array of " + _expected(get_args(hint)[0]).split(" ", 1)[1] + "s"
    return {float: "a number", int: "an integer", bool: "a boolean", str: "a string"}.get(
        hint, str(hint)
    )


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\0" in value
    return isinstance(value, list) and any(_has_nul(v) for v in value)


def keys_of(cls: type) -> list[str]:
    """The keys a section's dataclass declares (what a file may set)."""
    return [f.name for f in dataclasses.fields(cls) if not f.metadata.get("internal")]


def build_table(cls: type, data: Any, table: str, where: Where, label: str = "", *,
                allowed: Collection[str] | None = None, owner: str = "",
                ranges: Mapping[str, Check | None] | None = None) -> Any:
    """Check one TOML table against ``cls`` and return the instance.

    ``allowed`` limits the keys (those of one kind, named by ``owner`` in the message);
    ``ranges`` adds a kind's own range check to a key.
    """
    label = label or f"[{table}]"
    if not isinstance(data, dict):
        raise ConfigError(f"{where(table, None)}{label} must be a table")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    known = [k for k in fields if allowed is None or k in allowed]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in known:
            choices = ", ".join(sorted(known))
            what = f"not a key of {owner}" if owner else "unknown key"
            raise ConfigError(f"{where(table, key)}{label} {key}: {what} "
                              f"(known keys: {choices})")
        hint = hints[key]
        ok, out = _coerce(value, hint)
        if not ok:
            shown = redact_text(repr(value))  # a URL's credentials are never echoed
            shown = shown if len(shown) <= 80 else shown[:77] + "..."
            raise ConfigError(
                f"{where(table, key)}{label} {key}: expected {_expected(hint)}, "
                f"got {_type_name(value)} {shown}"
            )
        if _has_nul(out):
            # No path, argument or environment string can hold one: exec and open refuse it.
            raise ConfigError(f"{where(table, key)}{label} {key}: must not contain a NUL "
                              "character")
        for fn in (fields[key].metadata.get("check"), (ranges or {}).get(key)):
            problem = fn(out) if fn and out is not None else None
            if problem:
                raise ConfigError(f"{where(table, key)}{label} {key}: {problem}")
        kwargs[key] = out
    return cls(**kwargs)


def tables(value: Any, name: str, where: Where) -> Iterator[tuple[Any, Where, str]]:
    """Each table of an array of tables, with its locator and a label for messages."""
    if not isinstance(value, list):
        raise ConfigError(f"{where('', name)}{name}: must be an array of tables ([[{name}]])")
    for index, item in enumerate(value):
        def at(table: str, key: str | None, index: int = index) -> str:
            return where(table, key, index)

        title = item.get("name") if isinstance(item, dict) else None
        label = f"[[{name}]] #{index + 1}" + (f" ({title})" if isinstance(title, str) else "")
        if not isinstance(item, dict):
            raise ConfigError(f"{at(name, None)}{label} must be a table")
        yield item, at, label


def kind_of(item: dict[str, Any], key: str, choices: Collection[str], at: Where, label: str,
            table: str) -> str:
    """The ``kind`` (or ``action``) of a table, checked before its other keys."""
    value = item.get(key)
    if value is None:
        raise ConfigError(f"{at(table, None)}{label} {key}: missing")
    if value not in choices:
        raise ConfigError(f"{at(table, key)}{label} {key}: " + str(one_of(choices)(value)))
    assert isinstance(value, str)
    return value


def require(item: dict[str, Any], keys: Collection[str], at: Where, label: str, table: str,
            owner: str) -> None:
    """Each of ``keys`` is set in the table (the kind ``owner`` needs it)."""
    for key in keys:
        if key not in item:
            raise ConfigError(f"{at(table, None)}{label} {key}: required for {owner}")


def unique_name(name: str, names: set[str], at: Where, label: str, table: str) -> None:
    """The name is present and unique among its tables."""
    if not name:
        raise ConfigError(f"{at(table, None)}{label} name: missing")
    if name in names:
        raise ConfigError(f"{at(table, 'name')}{label} name: duplicate {table} name")
    names.add(name)
