"""Canonical JSON: the exact bytes that are hashed and signed.

Protocol version 2 (the current one) uses RFC 8785, the JSON Canonicalization Scheme
(JCS): UTF-8, object keys sorted by their UTF-16 code units, no insignificant
whitespace, strings escaped as ECMAScript's ``JSON.stringify`` does, numbers as
ECMAScript writes an IEEE 754 double (``5.0`` -> ``5``, ``1e-7``, ``1e+21``); integers
beyond 2**53 - 1, NaN and infinities cannot be represented and are refused.

Version 1 (events journaled by 0.1.0) used Python's ``json`` with sorted keys and floats
as ``repr`` writes them; :func:`canonical_bytes_v1` keeps those events verifiable.

Speed matters (the daemon canonicalises every event it signs, a verifier every event it
checks), so :func:`canonical_bytes` runs the C ``json`` encoder after a walk that turns
the few values where JCS and Python differ into values where they agree, and falls
back to the reference encoder (the ``rfc8785`` package) for the rare rest.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import rfc8785

MAX_DEPTH = 64
"""Deepest nesting a canonical value may have (a verifier refuses deeper input)."""

SAFE_INT = 2**53 - 1
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")

_ENCODER = json.JSONEncoder(
    ensure_ascii=False, allow_nan=False, sort_keys=True, separators=(",", ":")
)
_encode = _ENCODER.encode


class CanonicalError(ValueError):
    """A value that has no canonical form (NaN, a huge integer, a lone surrogate...)."""


class _Slow(Exception):
    """Raised inside the walk: this value needs the reference encoder."""


def _prepare(obj: Any, depth: int, parsed: bool = False) -> Any:
    """Return ``obj`` (or a copy) that the C encoder writes exactly as JCS does.

    ``parsed``: ``obj`` was read from JSON text, where every number is a double, so an
    integer beyond 2**53 stands for the nearest double (published, it is refused: its
    value would not survive).
    """
    t = type(obj)
    if t is str or t is bool or obj is None:
        return obj
    if t is int:
        if -SAFE_INT <= obj <= SAFE_INT:
            return obj
        if parsed:
            raise _Slow
        raise CanonicalError(f"integer {obj} is beyond 2**53-1 (not exact in JSON)")
    if depth > MAX_DEPTH:
        raise CanonicalError(f"nested deeper than {MAX_DEPTH}")
    if t is float:
        if not math.isfinite(obj):
            raise CanonicalError(f"{obj!r} is not a JSON number")
        if obj.is_integer():
            if abs(obj) <= SAFE_INT:
                return int(obj)  # JCS writes 5.0 as 5, -0.0 as 0
            raise _Slow
        text = repr(obj)
        if "e-0" in text:  # Python 1e-07 / 1e-05, JCS 1e-7 / 0.00001
            raise _Slow
        return obj
    if t is dict:
        out = None
        for k, v in obj.items():
            if type(k) is not str:
                raise CanonicalError("object keys must be strings")
            if not k.isascii() and any(ord(c) > 0xFFFF for c in k):
                raise _Slow  # JCS sorts by UTF-16 code units, Python by code points
            p = _prepare(v, depth + 1, parsed)
            if p is not v:
                if out is None:
                    out = dict(obj)
                out[k] = p
        return obj if out is None else out
    if t is list or t is tuple:
        items = None
        for i, v in enumerate(obj):
            p = _prepare(v, depth + 1, parsed)
            if p is not v:
                if items is None:
                    items = list(obj)
                items[i] = p
        return obj if items is None else items
    if isinstance(obj, (str, int, float, dict, list, tuple)):  # subclasses (enums...)
        raise _Slow
    raise CanonicalError(f"{t.__name__} is not a JSON value")


def canonical_text(obj: Any) -> str:
    """Return the canonical (RFC 8785) JSON text of ``obj``; raises CanonicalError."""
    try:
        text = _encode(_prepare(obj, 1))
        # A lone surrogate has no UTF-8 form: refuse it here, not when it is sent.
        if not text.isascii():
            text.encode("utf-8")
        return text
    except _Slow:
        return _reference(obj).decode("utf-8")
    except (ValueError, RecursionError) as exc:
        raise _why(exc) from None


def canonical_bytes(obj: Any) -> bytes:
    """Return the canonical (RFC 8785) JSON bytes of ``obj``; raises CanonicalError."""
    try:
        return _encode(_prepare(obj, 1)).encode("utf-8")
    except _Slow:
        return _reference(obj)
    except (ValueError, RecursionError) as exc:
        raise _why(exc) from None


def _why(exc: BaseException) -> CanonicalError:
    if isinstance(exc, CanonicalError):
        return exc
    if isinstance(exc, UnicodeEncodeError):
        return CanonicalError("a string holds a lone surrogate (it has no UTF-8 form)")
    if isinstance(exc, RecursionError):
        return CanonicalError(f"nested deeper than {MAX_DEPTH}")
    return CanonicalError(str(exc))


def _as_doubles(obj: Any, depth: int = 1) -> Any:
    """A parsed value with its integers beyond 2**53 turned into the doubles they mean."""
    if type(obj) is int and not -SAFE_INT <= obj <= SAFE_INT:
        try:
            return float(obj)
        except OverflowError:
            raise CanonicalError("a number beyond the range of doubles") from None
    if depth > MAX_DEPTH:
        raise CanonicalError(f"nested deeper than {MAX_DEPTH}")
    if type(obj) is dict:
        return {k: _as_doubles(v, depth + 1) for k, v in obj.items()}
    if type(obj) is list:
        return [_as_doubles(v, depth + 1) for v in obj]
    return obj


_ASTRAL = re.compile(rb"[\xf0-\xf4]")


def is_canonical_line(line: bytes, text: str, obj: Any, numbers_ok: bool) -> bool:
    """Whether ``line`` (UTF-8 ``text``, parsed to ``obj``) is its own JCS form.

    The fast way for the common line: when no number needs JCS's own spelling
    (``numbers_ok``: the parser saw no float that is integral or in exponent form and no
    integer of 16 digits or more), no key or string holds a character beyond U+FFFF
    (UTF-16 order) and nesting is shallow, JCS and Python's sorted ``json`` agree, so the
    C encoder decides. Anything else takes :func:`canonical_bytes_parsed`.
    """
    if (numbers_ok and line.count(b"[") + line.count(b"{") <= MAX_DEPTH
            and (line.isascii() or not _ASTRAL.search(line))):
        try:
            return _encode(obj) == text
        except (ValueError, RecursionError):
            return False
    try:
        return canonical_bytes_parsed(obj) == line
    except (ValueError, RecursionError):
        return False


def canonical_bytes_parsed(obj: Any) -> bytes:
    """The canonical bytes of a value parsed from JSON text (numbers are doubles)."""
    try:
        return _encode(_prepare(obj, 1, True)).encode("utf-8")
    except _Slow:
        return _reference(_as_doubles(obj))
    except (ValueError, RecursionError) as exc:
        raise _why(exc) from None


def _reference(obj: Any) -> bytes:
    try:
        return rfc8785.dumps(obj)
    except (rfc8785.CanonicalizationError, RecursionError, ValueError) as exc:
        raise _why(exc.__cause__ if isinstance(exc.__cause__, UnicodeEncodeError)
                   else exc) from None


def json_safe(obj: Any, depth: int = 1) -> Any:
    """``obj`` with what has no canonical form made representable: NaN and infinities
    become null, integers beyond 2**53 strings, lone surrogates U+FFFD, nesting past the
    limit null. For reading back data stored before these were refused."""
    t = type(obj)
    if t is float:
        return obj if math.isfinite(obj) else None
    if t is int:
        return obj if -SAFE_INT <= obj <= SAFE_INT else str(obj)
    if t is str:
        return obj if obj.isascii() else _LONE_SURROGATE.sub("\ufffd", obj)
    if depth > MAX_DEPTH:
        return None
    if t is dict:
        return {json_safe(k) if type(k) is str else str(k): json_safe(v, depth + 1)
                for k, v in obj.items()}
    if t is list or t is tuple:
        return [json_safe(v, depth + 1) for v in obj]
    return obj


def canonical_text_v1(obj: Any) -> str:
    """Version 1's canonical text: Python's ``json``, keys sorted, floats as ``repr``."""
    try:
        text = _encode(obj)
        if not text.isascii():
            text.encode("utf-8")
        return text
    except (ValueError, TypeError, RecursionError) as exc:
        raise _why(exc) from None


def canonical_bytes_v1(obj: Any) -> bytes:
    """Version 1's canonical bytes (see :func:`canonical_text_v1`)."""
    return canonical_text_v1(obj).encode("utf-8")


def canonical_bytes_for(version: int, obj: Any, *, parsed: bool = False) -> bytes:
    """The canonical bytes of ``obj`` under protocol ``version`` (1 or 2); ``parsed``
    if ``obj`` was read from JSON text (see :func:`canonical_bytes_parsed`)."""
    if version == 1:
        return canonical_bytes_v1(obj)
    return canonical_bytes_parsed(obj) if parsed else canonical_bytes(obj)
