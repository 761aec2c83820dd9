"""Secrets out of what graced and gracectl show: credentials, query strings, path
parameters and, when asked, the whole path of URLs.

A URL in a config (an http detector's target, a webhook) or on gracectl's command line
may carry ``user:password@``, ``?token=…``, ``;jsessionid=…`` or a token in its path
(a Slack webhook's ``/services/T…/B…/SECRET``, a health check's UUID); wherever a
subject, event, log line or output shows such a URL it goes through
:func:`redact_url` first. Pure code, shared by both sides (graced/protocol imports
nothing else of graced).
"""

from __future__ import annotations

import hashlib
import re
from urllib.parse import urlsplit, urlunsplit

HIDDEN = "REDACTED"
_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s\"'<>]+")


def _params(segment: str) -> str:
    """A path segment with its ``;name=value`` parameters' values hidden."""
    name, sep, rest = segment.partition(";")
    if not sep:
        return segment
    hidden = [f"{p.split('=', 1)[0]}={HIDDEN}" if "=" in p else HIDDEN
              for p in rest.split(";")]
    return ";".join([name, *hidden])


def hidden_path(path: str) -> str:
    """What stands for a path kept secret: the first 12 hex digits of its SHA-256, so
    two URLs still differ where their paths do."""
    digest = hashlib.sha256(path.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"/{HIDDEN}-{digest}" if path not in ("", "/") else path


def redact_url(url: str, *, hide_path: bool = False) -> str:
    """``url`` without its password, user, query values (``?token=REDACTED``), path
    parameters' values (``;jsessionid=REDACTED``) and fragment; with ``hide_path``,
    its path shown as :func:`hidden_path`."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return HIDDEN
    if (parts.username is None and parts.password is None and not parts.query
            and not parts.fragment and ";" not in parts.path and not hide_path):
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
    path = parts.path
    if hide_path:
        path = hidden_path(path)
    else:
        path = "/".join(_params(seg) for seg in path.split("/"))
    return urlunsplit((url[:len(parts.scheme)], netloc, path, query, fragment))


def redact_text(text: str) -> str:
    """Every URL in free text (an error message) redacted."""
    return _URL.sub(lambda m: redact_url(m.group(0)), text)
