"""Where graced is: a Unix socket path or a ws:// or wss:// URL (no I/O here)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import urlsplit

from graced.protocol.wire import loopback_host

ANSWER_TIMEOUT = 10.0
"""Seconds a request waits for its answer by default (--answer-timeout)."""


def no_answer(where: str, method: str, seconds: float) -> str:
    """The message of a request not answered in time (exit 3: graced is not answering)."""
    return (f"graced at {where} did not answer {method} within {seconds:g} s "
            "(--answer-timeout)")


@dataclass(frozen=True)
class Endpoint:
    """Where the daemon is: a Unix socket path or a ws:// or wss:// URL.

    ``cacert``: a PEM file of the CA (or the self-signed certificate) to trust for
    wss:// instead of the system's store. ``answer_timeout``: seconds a request waits for
    its answer (--answer-timeout) before gracectl gives up (exit 3).
    """

    socket: str | None = None
    url: str | None = None
    key_file: str | None = None
    cacert: str | None = None
    answer_timeout: float = ANSWER_TIMEOUT

    @property
    def name(self) -> str:
        return self.url or f"unix:{os.path.abspath(self.socket or '')}"


def url_problem(url: str) -> str | None:
    """Why ``url`` (ws:// or wss://) cannot be used, before any connection: no host, a
    bad port, or plain ws:// to an address that is not loopback (sent in clear)."""
    shown = ascii(url[:80])
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises for a port out of range or not a number
    except ValueError as exc:
        return f"--url {shown}: {exc}"
    host = parts.hostname
    if not host:
        return f"--url names no host: {shown}"
    if parts.scheme == "ws" and not loopback_host(host):
        return (f"--url {shown}: ws:// is plain text, only for a loopback address "
                "(127.0.0.1, ::1, localhost); use wss:// with graced's tls_cert")
    return None
