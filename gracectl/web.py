"""``gracectl web``: Mission Control in the browser, relayed from graced's Unix socket.

Theory of operation: one HTTP listener on a loopback address serves the page's static
files (``gracectl/webui/``: plain HTML, CSS and JavaScript modules, a strict
Content-Security-Policy) and, at ``/ws``, a WebSocket. A browser that connects there
first proves the login token (``gracectl web`` prints it once, in the URL's fragment,
which browsers never send to any server). The token is good once: the first page that
presents it gets a session secret of its own in exchange (kept in that tab's
sessionStorage, so a reload reconnects), and the token is spent, so a copy of it read
later (browser history, a session file, a screen) opens nothing. ``--open`` hands the
browser a 0600 launcher file, never the URL: a command line is readable by every user.
The relay then opens its own connection to
graced's Unix socket and passes messages both ways: graced's frames verbatim, byte for
byte, to the browser (which verifies every one itself, in a Worker, against the key it
pinned); the browser's requests to graced only if they are one of the methods the page
uses, bounded in size. graced sees the relay's uid: the page has exactly the rights of
the user who ran ``gracectl web`` (docs/security.md, "The browser").
"""

from __future__ import annotations

import base64
import hmac
import html
import json
import logging
import math
import mimetypes
import os
import secrets
import shutil
import socket
import sys
import tempfile
import webbrowser
from importlib import resources
from pathlib import Path
from typing import Any

import click
import trio
import trio_websocket
from trio_websocket import ConnectionClosed, WebSocketConnection

from graced.protocol import key_id
from graced.protocol.times import is_instant
from graced.protocol.wire import loopback_host

from .client import MAX_MESSAGE_BYTES, Endpoint
from .command import endpoint_of, perform, trusted_key
from .errors import CtlError

log = logging.getLogger("gracectl.web")

MAX_HEAD = 16384  # bytes of an HTTP request head
MAX_REQUEST = 65536  # bytes of one request from the page to graced
# A connection that has not proved the token or a session (a request for a static file,
# a WebSocket before its first message) is done within this many seconds, response
# included, and counts against the unauthenticated caps: in all, and per local user.
UNAUTH_TIMEOUT = 2.0
MAX_UNAUTHENTICATED = 48
MAX_UNAUTHENTICATED_PER_PEER = 12
MAX_AUTHENTICATED = 16  # sessions at once (a page uses one)
# What the page may ask graced: reading, and deciding on a mission (approve/reject). The
# rest (pause, emit, reload, knowledge import, playbooks run, silences) stays with gracectl.
METHODS = frozenset({"hello", "status", "subscribe", "missions.list", "missions.get",
                     "detectors", "knowledge.stats", "keys", "missions.approve",
                     "missions.reject"})
DECISIONS = frozenset({"missions.approve", "missions.reject"})
FILES = ("index.html", "app.js", "worker.js", "verify.js", "chart.js", "style.css",
         "favicon.svg")
CSP = ("default-src 'none'; script-src 'self'; worker-src 'self'; style-src 'self'; "
       "img-src 'self'; connect-src 'self' ws://{host}; base-uri 'none'; "
       "form-action 'none'; frame-ancestors 'none'")


CLEAR_SITE_DATA = 'Clear-Site-Data: "storage"'


def static_files() -> dict[str, bytes]:
    """The page's files, read once from the package."""
    root = resources.files("gracectl") / "webui"
    return {name: (root / name).read_bytes() for name in FILES}


class PrefixedStream(trio.abc.Stream):
    """A stream that first gives back bytes already read from it (the request head)."""

    def __init__(self, stream: trio.abc.Stream, prefix: bytes) -> None:
        self.stream = stream
        self.prefix = prefix

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self.prefix:
            data, self.prefix = self.prefix, b""
            return data
        return bytes(await self.stream.receive_some(max_bytes))

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        pass

    async def aclose(self) -> None:
        await self.stream.aclose()


def check_page_request(text: str) -> tuple[dict[str, Any] | None, str]:
    """A request from the page, checked (pure): the object to pass on, or None and why."""
    if len(text.encode()) > MAX_REQUEST:
        return None, "request too large"
    try:
        req = json.loads(text)
    except (ValueError, RecursionError):
        return None, "not JSON"
    if not isinstance(req, dict):
        return None, "not a JSON object"
    method = req.get("method")
    if method not in METHODS:
        return None, f"method {str(method)[:40]!r} is not served to the browser"
    params = req.get("params", {})
    if not isinstance(params, dict):
        return None, "params must be an object"
    if method in DECISIONS:
        # As gracectl does: the decision names the mission's opened time (the number
        # of an answer, or the ISO form of a new mission.* event's payload), and an
        # approval the full hash of the plan the operator saw.
        if not is_instant(params.get("opened")):
            return None, "a decision must name the mission's opened time"
        plan = params.get("plan")
        if method == "missions.approve" and not (
                isinstance(plan, str) and len(plan) == 64
                and all(c in "0123456789abcdef" for c in plan)):
            return None, "an approval must name the full SHA-256 of the plan it approves"
    return req, ""


def peer_uid(peer: tuple[Any, ...], local: tuple[Any, ...]) -> int | None:
    """The uid owning the loopback TCP socket ``peer`` connected to ``local``, from
    /proc/net/tcp{,6} (the kernel's table: every socket's ends and owner); None if not
    found (another OS, a peer already gone)."""
    def encoded(addr: tuple[Any, ...]) -> str:
        ip = str(addr[0])
        raw = socket.inet_pton(socket.AF_INET6 if ":" in ip else socket.AF_INET, ip)
        words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
        return f"{words.hex().upper()}:{int(addr[1]):04X}"

    try:
        want = (encoded(peer), encoded(local))
    except (OSError, ValueError, IndexError):
        return None
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if len(fields) > 7 and (fields[1], fields[2]) == want:
                return int(fields[7])
    return None


class Relay:
    """Serves the page and relays the stream; :meth:`run` never returns unless cancelled.

    ``token`` is the login token, good once: :meth:`admit` spends it on the first page that
    proves it and gives that page a session secret instead (``on_spent`` is called then).
    """

    def __init__(self, endpoint: Endpoint, host: str, port: int, token: str,
                 files: dict[str, bytes], *, on_spent: Any = None) -> None:
        self.endpoint = endpoint
        self.host = host
        self.port = port
        self.token: str | None = token
        self.sessions: list[str] = []
        self.files = files
        self.on_spent = on_spent
        self.unauthenticated: dict[Any, int] = {}  # per peer (uid, else address)
        self.authenticated = 0

    @property
    def hosts(self) -> set[str]:
        """The Host headers accepted: the address served (DNS rebinding gets a 403)."""
        names = {self.host, "localhost", "127.0.0.1"} if loopback_host(self.host) else {self.host}
        return {f"{n}:{self.port}" for n in names} | {
            f"[{n}]:{self.port}" for n in names if ":" in n}

    def admit(self, first: Any) -> str | None:
        """The session secret for a page's first message, or None: a session it already
        holds, or a new one for the unspent login token (which it spends)."""
        if not isinstance(first, dict):
            return None
        session, token = first.get("session"), first.get("token")
        if isinstance(session, str):
            for held in self.sessions:
                if hmac.compare_digest(session.encode(), held.encode()):
                    return held
        if isinstance(token, str) and self.token is not None and hmac.compare_digest(
                token.encode(), self.token.encode()):
            self.token = None
            secret = secrets.token_urlsafe(32)
            self.sessions.append(secret)
            if self.on_spent is not None:
                self.on_spent()
            return secret
        return None

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self.port, host=self.host)
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self.handle, listeners)

    async def handle(self, stream: trio.SocketStream) -> None:
        try:
            remote = stream.socket.getpeername()
            uid = peer_uid(remote, stream.socket.getsockname())
        except OSError:
            await trio.aclose_forcefully(stream)
            return
        peer = ("uid", uid) if uid is not None else ("address", remote[0])
        if (sum(self.unauthenticated.values()) >= MAX_UNAUTHENTICATED
                or self.unauthenticated.get(peer, 0) >= MAX_UNAUTHENTICATED_PER_PEER):
            await trio.aclose_forcefully(stream)
            return
        self.unauthenticated[peer] = self.unauthenticated.get(peer, 0) + 1
        authenticated = False
        # Until it proves the token or a session, the connection has UNAUTH_TIMEOUT in all.
        scope = trio.CancelScope(deadline=trio.current_time() + UNAUTH_TIMEOUT)

        def promote() -> bool:
            nonlocal authenticated
            if self.authenticated >= MAX_AUTHENTICATED:
                return False
            self._release(peer)
            self.authenticated += 1
            authenticated = True
            scope.deadline = math.inf
            return True

        try:
            with scope:
                await self._handle(stream, promote)
        except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionClosed,
                trio_websocket.HandshakeError, OSError):
            pass
        except Exception:  # noqa: BLE001 - one browser never stops the relay
            log.exception("web: a connection failed")
        finally:
            if authenticated:
                self.authenticated -= 1
            else:
                self._release(peer)
            await trio.aclose_forcefully(stream)

    def _release(self, peer: Any) -> None:
        """One unauthenticated connection of ``peer`` less; a peer with none left has no
        entry (a promoted connection released its count when it proved itself, so its
        close touches this table no more: another connection may have emptied it)."""
        self.unauthenticated[peer] -= 1
        if not self.unauthenticated[peer]:
            del self.unauthenticated[peer]

    async def _handle(self, stream: trio.SocketStream, promote: Any) -> None:
        head = b""
        while b"\r\n\r\n" not in head and len(head) <= MAX_HEAD:
            chunk = await stream.receive_some(4096)
            if not chunk:
                return
            head += chunk
        if b"\r\n\r\n" not in head:
            await _respond(stream, 431, b"bad request\n")
            return
        lines = head.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if len(parts) != 3 or parts[0] != "GET":
            await _respond(stream, 405, b"only GET\n")
            return
        host = headers.get("host", "")
        if host not in self.hosts:
            await _respond(stream, 403, b"unknown Host (open the URL gracectl web printed)\n")
            return
        path = parts[1].split("?", 1)[0]
        if "service-worker" in headers:
            # The relay serves no service worker: a browser asking for one's script is
            # checking a worker someone else registered for this origin (a server that
            # had this port before). Clear-Site-Data removes it (and this origin's storage).
            click.echo(f"gracectl: WARNING: a browser checked a service worker ({path[:80]!r}) "
                       "that this relay never served: someone who served this port before "
                       "planted it and it may have read the page; it was told to clear "
                       "this origin's data", err=True)
            await _respond(stream, 404, b"no service worker here\n", clear=True)
            return
        if path == "/ws" and headers.get("upgrade", "").lower() == "websocket":
            origin = headers.get("origin", "")
            if origin != f"http://{host}":
                await _respond(stream, 403, b"cross-origin WebSocket refused\n")
                return
            async with trio.open_nursery() as nursery:
                request = await trio_websocket.wrap_server_stream(
                    nursery, PrefixedStream(stream, head), max_message_size=MAX_REQUEST)
                ws = await request.accept()
                await self.session(ws, promote)
                nursery.cancel_scope.cancel()
            return
        name = "index.html" if path == "/" else path.lstrip("/")
        body = self.files.get(name)
        if body is None:
            await _respond(stream, 404, b"not found\n", clear=True)
            return
        ctype = mimetypes.guess_type(name)[0] or "application/octet-stream"
        if ctype in ("text/javascript", "application/javascript"):
            ctype = "text/javascript"
        await _respond(stream, 200, body, ctype + "; charset=utf-8", host)

    async def session(self, ws: WebSocketConnection, promote: Any) -> None:
        """One browser: the token or a session secret, the session secret back, then both
        directions until either side closes."""
        first = await ws.get_message()
        try:
            secret = self.admit(json.loads(first) if isinstance(first, str) else None)
        except (ValueError, RecursionError):
            secret = None
        if secret is None:
            await ws.aclose(4001, "bad, spent or missing login token")
            return
        if not promote():
            await ws.aclose(4005, "too many pages at once")
            return
        # Not graced's: the relay's own message, first on every connection, the only one
        # the page takes unsigned (it trusts the relay that serves its code anyway).
        await ws.send_message(json.dumps({"relay": "session", "session": secret}))
        try:
            up_stream = await trio.open_unix_socket(self.endpoint.socket or "")
        except OSError as exc:
            await ws.aclose(4002, f"graced unreachable: {exc.strerror or exc}"[:120])
            return
        async with trio.open_nursery() as nursery:
            up = await trio_websocket.wrap_client_stream(
                nursery, up_stream, "localhost", "/", max_message_size=MAX_MESSAGE_BYTES)

            async def to_daemon() -> None:
                try:
                    while True:
                        text = await ws.get_message()
                        req, why = (check_page_request(text) if isinstance(
                            text, str) else (None, "binary message"))
                        if req is None:
                            await ws.aclose(4003, f"refused: {why}"[:120])
                            break
                        await up.send_message(text)
                except ConnectionClosed:
                    pass
                nursery.cancel_scope.cancel()

            async def to_browser() -> None:
                reason = "graced closed the connection"
                try:
                    while True:
                        message = await up.get_message()
                        await ws.send_message(message)
                except ConnectionClosed as exc:
                    if exc.reason is not None:
                        reason = f"graced closed: {exc.reason.code} {exc.reason.reason or ''}"
                with trio.move_on_after(1):
                    await ws.aclose(4004, reason[:120])
                nursery.cancel_scope.cancel()

            nursery.start_soon(to_daemon)
            nursery.start_soon(to_browser)
        with trio.move_on_after(1) as cs:
            cs.shield = True
            await up.aclose()


async def _respond(stream: trio.abc.Stream, status: int, body: bytes,
                   ctype: str = "text/plain; charset=utf-8", host: str = "",
                   clear: bool = False) -> None:
    reason = {200: "OK", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
              408: "Request Timeout", 431: "Request Header Fields Too Large"}[status]
    head = [f"HTTP/1.1 {status} {reason}", f"Content-Type: {ctype}",
            f"Content-Length: {len(body)}", "Cache-Control: no-store",
            "X-Content-Type-Options: nosniff", "Referrer-Policy: no-referrer",
            "Cross-Origin-Opener-Policy: same-origin",
            "Cross-Origin-Resource-Policy: same-origin", "Connection: close"]
    if host:
        head.append(f"Content-Security-Policy: {CSP.format(host=host)}")
    if clear:
        head.append(CLEAR_SITE_DATA)
    await stream.send_all(("\r\n".join(head) + "\r\n\r\n").encode() + body)


def page_url(host: str, port: int, token: str, public_key: bytes | None) -> str:
    shown = f"[{host}]" if ":" in host else host
    fragment = f"token={token}"
    if public_key is not None:
        fragment += "&key=" + base64.urlsafe_b64encode(public_key).decode().rstrip("=")
    return f"http://{shown}:{port}/#{fragment}"


LAUNCHER = """<!doctype html>
<meta charset="utf-8"><meta name="referrer" content="no-referrer">
<meta http-equiv="refresh" content="0;url={url}">
<title>Grace · Mission Control</title>
<p><a href="{url}">Open Mission Control</a></p>
"""


def write_launcher(url: str) -> Path:
    """A file that sends a browser to ``url``, readable by this user alone (0600, in a
    0700 directory of its own): what ``--open`` hands the browser instead of the URL,
    since a command line (the browser's argv) is readable by every user in /proc."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    folder = Path(tempfile.mkdtemp(prefix="gracectl-web-", dir=runtime if runtime and
                                   os.path.isdir(runtime) else None))
    path = folder / "open.html"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(LAUNCHER.format(url=html.escape(url, quote=True)))
    return path


@click.command()
@click.option("--port", type=click.IntRange(0, 65535), default=0,
              help="TCP port to serve the page on (default: a fresh free port each run, so "
                   "the page's origin is new and nothing another server left in the "
                   "browser for an old origin applies to it).")
@click.option("--bind", "bind", default="127.0.0.1", show_default=True, metavar="ADDRESS",
              help="Loopback address to serve on (a browser verifies only on a loopback "
                   "address or over https; the relay serves no TLS, so nothing else).")
@click.option("--open/--no-open", "open_", default=True, show_default=True,
              help="Open the page in the default browser (through a launcher file only "
                   "this user can read: the token is never on a command line); with no "
                   "browser, says so on stderr.")
@click.pass_context
def web(ctx: click.Context, port: int, bind: str, open_: bool) -> None:
    """Serve Mission Control in the browser, relayed from graced's Unix socket.

    Prints the page's URL on stdout, with a login token good once: the first page that
    uses it gets a session of its own, and the URL opens nothing after that. The page
    verifies every frame itself against the daemon's key: the one gracectl trusts for
    the socket, passed in the URL and pinned by the browser. The page has this user's
    rights on graced: it can approve or reject a mission only if this user may.

    From a laptop, forward the SAME port and fix it: `ssh -L P:127.0.0.1:P HOST`, then
    `gracectl web --port P --no-open` on HOST, and open the URL on the laptop (the page
    checks its Host: another local port gets "unknown Host").
    """
    endpoint = endpoint_of(ctx)
    if endpoint.url:
        raise click.UsageError("gracectl web relays graced's Unix socket; it takes --socket, "
                               "not --url")
    if not loopback_host(bind):
        raise click.UsageError(f"--bind {bind!r} is not a loopback address: the relay serves "
                               "plain http, which a browser verifies only on loopback")
    try:
        files = static_files()
    except OSError as exc:
        raise CtlError(f"the page's files are missing from this install: {exc}") from None
    token = secrets.token_urlsafe(32)
    launcher: list[Path] = []

    def forget_launcher() -> None:
        for path in launcher:
            shutil.rmtree(path.parent, ignore_errors=True)
        launcher.clear()

    def spent() -> None:
        forget_launcher()
        click.echo("gracectl: a page signed in with the login token; it is spent (the URL "
                   "opens nothing more; reloading that page keeps its session)", err=True)

    async def go() -> None:
        key = trusted_key(endpoint)
        relay = Relay(endpoint, bind, port, token, files, on_spent=spent)
        async with trio.open_nursery() as nursery:
            try:
                bound = await nursery.start(relay.run)
            except OSError as exc:
                raise CtlError(f"cannot serve on {bind}:{port}: {exc.strerror or exc}") from None
            url = page_url(bind, bound, token, key)
            click.echo(url)
            sys.stdout.flush()
            click.echo(f"gracectl: Mission Control on http://{bind}:{bound}/ (daemon key "
                       f"{key_id(key)}); open the URL above (once); Ctrl-C stops it", err=True)
            if open_:
                try:
                    launcher.append(write_launcher(url))
                except OSError as exc:
                    click.echo(f"gracectl: cannot write the launcher file ({exc}); open the "
                               "URL above yourself", err=True)
                else:
                    opened = await trio.to_thread.run_sync(webbrowser.open,
                                                           launcher[0].as_uri())
                    if not opened:  # no browser here (a server over ssh): say so
                        forget_launcher()
                        click.echo("gracectl: no browser could be opened; open the URL "
                                   "above", err=True)

    try:
        perform(go)
    except KeyboardInterrupt:
        pass
    finally:
        forget_launcher()
