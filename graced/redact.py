"""Secrets out of what graced shows: credentials and query strings in URLs.

A URL in a config (an http detector's target, a webhook) may carry
``user:password@`` or ``?token=…``; wherever a subject, event, log line or output
shows such a URL it goes through :func:`redact_url` first. Pure code.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

HIDDEN = "REDACTED"
_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s\"'<>]+")


def redact_url(url: str) -> str:
    """``url`` without its password, user and query values (``?token=REDACTED``)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return HIDDEN
    if (parts.username is None and parts.password is None and not parts.query
            and not parts.fragment):
        return url  # nothing to hide: as written (urlsplit would lower-case it)
    netloc = host if ":" not in host else f"[{host}]"
    if port is not None:
        netloc += f":{port}"
    if parts.username is not None or parts.password is not None:
        netloc = f"{HIDDEN}@{netloc}"
    query = parts.query
    if query:
        query = "&".join(
            f"{item.split('=', 1)[0]}={HIDDEN}" if "=" in item else HIDDEN
            for item in query.split("&"))
    fragment = HIDDEN if parts.fragment else ""
    return urlunsplit((url[:len(parts.scheme)], netloc, parts.path, query, fragment))


def redact_text(text: str) -> str:
    """Every URL in free text (an error message) redacted."""
    return _URL.sub(lambda m: redact_url(m.group(0)), text)
