"""A small blocking HTTP/1.1 client with a total deadline and no redirects.

Used from worker threads by the http probe and the webhook notifier. urllib's
``timeout`` bounds each socket operation, not the request: an endpoint that drips one
byte a second never times out and holds its worker thread for good. Here every
operation gets only what is left of the request's budget, so the thread is back by the
deadline. A redirect is not followed (the status is returned as it is), and the only
host ever contacted is the URL's own.
"""

from __future__ import annotations

import socket
import ssl
import time
from urllib.parse import urlsplit

MAX_HEAD = 16384


class HttpError(OSError):
    """The request failed: no connection, no answer in time, or not HTTP."""


def request(method: str, url: str, *, timeout: float, body: bytes = b"",
            headers: dict[str, str] | None = None) -> int:
    """Send one request; return the response's status code. Blocks at most ``timeout``."""
    parts = urlsplit(url)
    host = parts.hostname
    if parts.scheme not in ("http", "https") or not host:
        raise HttpError(f"not an http(s) URL: {parts.scheme}://")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    deadline = time.monotonic() + timeout

    def left() -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise HttpError(f"no answer within {timeout:g} s")
        return remaining

    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    hostport = host if parts.port is None else f"{host}:{parts.port}"
    if ":" in host and parts.port is None:
        hostport = f"[{host}]"
    lines = [f"{method} {target} HTTP/1.1", f"Host: {hostport}", "Connection: close",
             "User-Agent: graced", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    wire = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
    try:
        sock: socket.socket = socket.create_connection((host, port), timeout=left())
    except TimeoutError:
        raise HttpError(f"no connection within {timeout:g} s") from None
    try:
        if parts.scheme == "https":
            sock.settimeout(left())
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
        sock.settimeout(left())
        sock.sendall(wire)
        head = b""
        while b"\r\n" not in head:
            sock.settimeout(left())
            try:
                chunk = sock.recv(4096)
            except TimeoutError:
                raise HttpError(f"no answer within {timeout:g} s") from None
            if not chunk:
                break
            head += chunk
            if len(head) > MAX_HEAD:
                break
        status_line = head.split(b"\r\n", 1)[0].decode("latin-1", "replace")
        fields = status_line.split()
        if len(fields) < 2 or not fields[0].startswith("HTTP/") or not fields[1].isdigit():
            raise HttpError(f"not an HTTP response: {status_line[:60]!r}")
        return int(fields[1])
    finally:
        sock.close()
