"""A small blocking HTTP/1.1 client with a total deadline and no redirects.

Used from worker threads by the http probe and the webhook notifier. urllib's
``timeout`` bounds each socket operation, not the request: an endpoint that drips one
byte a second never times out and holds its worker thread for good. Here every
operation gets only what is left of the request's budget, so the thread is back by the
deadline. A redirect is not followed (the status is returned as it is), and the only
host ever contacted is the URL's own.
"""

from __future__ import annotations

import base64
import ipaddress
import os
import socket
import ssl
import time
from typing import Any
from urllib.parse import unquote, urlsplit

MAX_HEAD = 16384


class HttpError(OSError):
    """The request failed: no connection, no answer in time, or not HTTP."""


def _loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost.localdomain") or host.lower().endswith(
            ".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _no_proxy(host: str, port: int, env: dict[str, str]) -> bool:
    """Whether no_proxy (or NO_PROXY) names ``host``: '*', a host, a domain suffix
    ('.example.com' or 'example.com'), an IP, an IP network (CIDR), with ':port' or not."""
    spec = env.get("no_proxy") or env.get("NO_PROXY") or ""
    host = host.lower().strip("[]")
    for entry in (e.strip().lower() for e in spec.split(",")):
        if not entry:
            continue
        if entry == "*":
            return True
        name, _, want_port = entry.rpartition(":") if entry.count(":") == 1 else (
            entry, "", "")
        if want_port and want_port != str(port):
            continue
        name = name.strip("[]")
        try:
            if ipaddress.ip_address(host) in ipaddress.ip_network(name, strict=False):
                return True
        except ValueError:
            pass
        name = name.lstrip("*").lstrip(".")
        if host == name or host.endswith("." + name):
            return True
    return False


def proxy_for(url: str, setting: str, env: dict[str, str] | None = None) -> str | None:
    """The proxy to reach ``url`` through, per the probe's ``proxy`` setting: "none"
    (the default: never), "env" (http_proxy or https_proxy by the URL's scheme, except
    for a loopback host and what no_proxy names), or an http:// proxy URL (except for
    a loopback host)."""
    if setting == "none":
        return None
    parts = urlsplit(url)
    host = parts.hostname or ""
    if _loopback(host):
        return None
    if setting != "env":
        return setting
    env = dict(os.environ) if env is None else env
    port = parts.port or (443 if parts.scheme == "https" else 80)
    if _no_proxy(host, port, env):
        return None
    name = f"{parts.scheme}_proxy"
    return env.get(name) or env.get(name.upper()) or None


def request(method: str, url: str, *, timeout: float, body: bytes = b"",
            headers: dict[str, str] | None = None, proxy: str | None = None) -> int:
    """Send one request, through ``proxy`` (an http:// URL) if given; return the
    response's status code. Blocks at most ``timeout``."""
    parts = urlsplit(url)
    host = parts.hostname
    if parts.scheme not in ("http", "https") or not host:
        raise HttpError(f"not an http(s) URL: {parts.scheme}://")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:  # out of range, not a number
        raise HttpError(f"bad port in the URL: {exc}") from None
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
    # user:password@ in the URL is HTTP Basic authentication, as curl takes it.
    if parts.username is not None and not any(k.lower() == "authorization"
                                              for k in headers or {}):
        lines.append(f"Authorization: {basic(parts.username, parts.password)}")
    via: tuple[str, int] | None = None
    tunnel_auth = ""
    if proxy:
        pp = urlsplit(proxy)
        if pp.scheme != "http" or not pp.hostname:
            raise HttpError("the proxy must be an http:// URL")
        via = (pp.hostname, pp.port or 80)
        if pp.username is not None:
            tunnel_auth = f"Proxy-Authorization: {basic(pp.username, pp.password)}\r\n"
        if parts.scheme == "http":  # the absolute form, to the proxy
            lines[0] = f"{method} http://{hostport}{target} HTTP/1.1"
            if tunnel_auth:
                lines.append(tunnel_auth.rstrip())
    wire = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
    try:
        sock: socket.socket = socket.create_connection(via or (host, port), timeout=left())
    except TimeoutError:
        raise HttpError(f"no connection within {timeout:g} s") from None
    try:
        if via and parts.scheme == "https":
            _connect_tunnel(sock, f"{host}:{port}" if ":" not in host else f"[{host}]:{port}",
                            left, tunnel_auth)
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


def basic(user: str, password: str | None) -> str:
    """The Basic credentials of a URL's (percent-encoded) user and password."""
    pair = f"{unquote(user)}:{unquote(password or '')}".encode()
    return "Basic " + base64.b64encode(pair).decode("ascii")


def _connect_tunnel(sock: socket.socket, hostport: str, left: Any, auth: str = "") -> None:
    """Ask the proxy for a tunnel (CONNECT) to ``hostport``; raises unless it says 200."""
    sock.settimeout(left())
    sock.sendall(f"CONNECT {hostport} HTTP/1.1\r\nHost: {hostport}\r\n{auth}\r\n"
                 .encode("latin-1"))
    head = b""
    while b"\r\n\r\n" not in head:
        sock.settimeout(left())
        chunk = sock.recv(1)  # byte by byte: what follows the head is the tunnel's
        if not chunk or len(head) > MAX_HEAD:
            raise HttpError("the proxy closed or sent no answer to CONNECT")
        head += chunk
    fields = head.split(b"\r\n", 1)[0].split()
    if len(fields) < 2 or fields[1] != b"200":
        raise HttpError(f"the proxy refused the tunnel: {head[:60]!r}")
