"""Canonical JSON: the exact bytes that are hashed and signed.

Canonical form (see docs/protocol.md): UTF-8, object keys sorted by code point, no
insignificant whitespace (separators ``,`` and ``:``), non-ASCII characters written
as themselves, NaN and infinities forbidden, integers in plain decimal, floats in
their shortest round-trip form (Python ``repr``).
"""

from __future__ import annotations

import json
from typing import Any

_ENCODER = json.JSONEncoder(
    ensure_ascii=False, allow_nan=False, sort_keys=True, separators=(",", ":")
)


def canonical_text(obj: Any) -> str:
    """Return the canonical JSON text of ``obj``."""
    return _ENCODER.encode(obj)


def canonical_bytes(obj: Any) -> bytes:
    """Return the canonical JSON bytes of ``obj`` (UTF-8)."""
    return _ENCODER.encode(obj).encode("utf-8")
