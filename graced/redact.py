"""Secrets out of what graced shows: see :mod:`graced.protocol.redact` (shared with
gracectl, which shows URLs given on its command line)."""

from __future__ import annotations

from .protocol.redact import HIDDEN, hidden_path, redact_text, redact_url

__all__ = ["HIDDEN", "hidden_path", "redact_text", "redact_url"]
