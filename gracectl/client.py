"""The client side of the wire: connect, send requests, check signed responses.

A :class:`Connection` runs a reader task that splits each message into frames
(newline-separated), hands responses to the request waiting for them, and puts
events on :attr:`Connection.events`. Responses are checked against the trusted key
when one is known, and must echo the request's nonce.
"""

from __future__ import annotations

import json
import secrets
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import trio
import trio_websocket
from trio_websocket import ConnectionClosed, WebSocketConnection

from graced.protocol import (
    ExitCode,
    Signer,
    Violation,
    key_id,
    parse_event_line,
    verify_detached,
)
from graced.protocol.redact import redact_text, redact_url
from graced.protocol.verify import MAX_LINE_BYTES
from graced.protocol.wire import CLOSE_REVOKED, request_signing_bytes

from . import trust
from .endpoint import ANSWER_TIMEOUT, Endpoint, no_answer
from .errors import (
    CtlError,
    NotAuthorised,
    ProtocolViolation,
    Unreachable,
    check_utf8,
)
from .wsclient import answer, check_signed, parse_frame, socket_hint

EVENT_QUEUE = 1000
"""Events received but not yet consumed, at most."""
MAX_MESSAGE_BYTES = MAX_LINE_BYTES + 1024
"""The largest WebSocket message taken from the daemon (bigger: closed, code 1009)."""


_Item = tuple[str, dict[str, Any], bytes]
"""An event as received: its line, the event, its signing bytes."""


def _first_bad(batch: list[_Item], public_key: bytes) -> int | None:
    """Index of the first event in ``batch`` whose signature does not verify."""
    for i, (_, event, signing) in enumerate(batch):
        if not verify_detached(event["sig"], signing, public_key):
            return i
    return None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _loose(line: str) -> dict[str, Any]:
    """An event for a consumer that verifies it itself: parsed if it parses."""
    try:
        frame = json.loads(line)
    except (ValueError, RecursionError):
        return {"_unparsable": line[:200]}
    return frame if isinstance(frame, dict) else {"_unparsable": line[:200]}


class Closed(Exception):
    """The connection ended; ``code``/``reason`` from the close frame, if any."""

    def __init__(self, code: int | None, reason: str | None) -> None:
        super().__init__(f"connection closed ({code}: {reason or 'no reason'})")
        self.code = code
        self.reason = reason


def closed_error(closed: Closed | None, what: str) -> CtlError:
    """The error for a connection the daemon closed: not authorised (exit 4) when it
    revoked the key the stream was opened with, else unreachable; with its reason."""
    why = f" ({closed.reason})" if closed and closed.reason else ""
    if closed is not None and closed.code == CLOSE_REVOKED:
        return NotAuthorised(f"not authorised any more{why}")
    return Unreachable(f"{what}{why}")


class Connection:
    def __init__(self, ws: WebSocketConnection, trusted_key: bytes | None,
                 client_key: Signer | None = None, verify_events: bool = True,
                 answer_timeout: float = ANSWER_TIMEOUT, where: str = "") -> None:
        self.ws = ws
        # Seconds each answer is waited for (Unreachable after: exit 3).
        self.answer_timeout = answer_timeout
        self.where = where
        self.trusted_key = trusted_key
        self.trusted_kid = key_id(trusted_key) if trusted_key is not None else None
        self.client_key = client_key
        # A consumer that runs its own ChainVerifier (tail --verify, top) gets events as
        # they came, to tell a forged signature from altered content by the next event.
        self.verify_events = verify_events
        self._next_id = 1
        self._last_seq: int | None = None
        self._waiting: dict[int, trio.MemorySendChannel[dict[str, Any]]] = {}
        # Bounded: when the consumer falls behind, the reader stops reading and the
        # socket's own buffers push back on the daemon.
        self.events_send, self.events = trio.open_memory_channel[tuple[str, dict[str, Any]]](
            EVENT_QUEUE
        )
        self._batches_send, self._batches_recv = trio.open_memory_channel[list[_Item]](4)
        self.notices: list[dict[str, Any]] = []
        self.closed: Closed | None = None
        self.violation: CtlError | Violation | None = None
        self._reader_done = False
        self.daemon_id: str | None = None  # learnt from hello before signing a request

    async def reader(self) -> None:
        """Read messages; responses go to their requests, events (a message's worth at a
        time) to :meth:`checker`. Never returns unless the connection ends."""
        try:
            while True:
                message = await self.ws.get_message()
                if isinstance(message, bytes):
                    raise ProtocolViolation("a binary message")
                batch: list[_Item] = []
                for line in message.split("\n"):
                    item = self._frame(line)
                    if item is not None:
                        batch.append(item)
                if batch:
                    await self._batches_send.send(batch)
        except ConnectionClosed as exc:
            reason = exc.reason
            self.closed = Closed(reason.code if reason else None, reason.reason if reason else None)
        except (CtlError, Violation) as exc:
            self.violation = exc
        finally:
            self._reader_done = True
            self._batches_send.close()
            for waiter in self._waiting.values():
                waiter.close()
            self._waiting.clear()

    async def checker(self) -> None:
        """Check the events' signatures, in a worker thread for a large batch (libsodium
        releases the GIL: the reader parses the next message meanwhile), and pass them on
        in order; stops at the first bad one."""
        try:
            async for batch in self._batches_recv:
                bad = None
                if self.verify_events and self.trusted_key is not None:
                    if len(batch) >= 16:
                        bad = await trio.to_thread.run_sync(_first_bad, batch, self.trusted_key)
                    else:
                        bad = _first_bad(batch, self.trusted_key)
                for i, (line, event, _) in enumerate(batch):
                    if i == bad:
                        self.violation = Violation(ExitCode.BAD_SIGNATURE, event["seq"],
                                                   "event with a bad signature")
                        return
                    await self.events_send.send((line, event))
        finally:
            self.events_send.close()

    def _frame(self, line: str) -> _Item | None:
        """Check one frame; hand a response to its request, keep a notice; return an
        event for the events channel. Raises at the first frame that breaks the rules."""
        data = line.encode("utf-8", "surrogatepass")
        if len(data) > MAX_LINE_BYTES:
            raise ProtocolViolation(f"a frame longer than {MAX_LINE_BYTES} bytes")
        if data.startswith(b'{"kid":'):
            # An event: its first key is "kid"; a response's or notice's canonical form
            # starts with a key that sorts earlier ("code", "error", "id").
            if self.verify_events:
                return (line, *self._event(data))
            return line, _loose(line), b""
        frame = parse_frame(line, data)
        kind = frame["type"]
        check_signed(frame, kind, self.trusted_key)
        if kind == "notice":
            self.notices.append(frame)
            del self.notices[:-8]
            return None
        req_id = frame.get("id")
        if type(req_id) is not int:
            raise ProtocolViolation("a response whose id is not one of ours "
                                    f"({json.dumps(req_id)[:40]})")
        waiter = self._waiting.pop(req_id, None)
        if waiter is None:
            raise ProtocolViolation(f"a response to no pending request (id {req_id}: "
                                    "duplicate or unsolicited)")
        waiter.send_nowait(frame)
        return None

    def _event(self, data: bytes) -> tuple[dict[str, Any], bytes]:
        """A strictly parsed event by the trusted key, newer than the last one, and its
        signing bytes (the signature is checked by :meth:`checker`)."""
        event, signing = parse_event_line(data)
        if self.trusted_key is not None and event["kid"] != self.trusted_kid:
            raise Violation(ExitCode.BAD_SIGNATURE, event["seq"],
                            f"event signed by unknown key {event['kid']} (trusted key "
                            f"is {self.trusted_kid})")
        if self._last_seq is not None and event["seq"] <= self._last_seq:
            raise Violation(ExitCode.REPLAYED, event["seq"],
                            f"event replayed or out of order (after seq {self._last_seq})")
        self._last_seq = event["seq"]
        return event, signing

    async def next_event(self) -> tuple[str, dict[str, Any]]:
        """The next event; raises the connection's violation, or EndOfChannel when the
        connection ended."""
        try:
            return await self.events.receive()
        except trio.EndOfChannel:
            if self.violation is not None:
                raise self.violation from None
            raise

    async def request(self, method: str, params: dict[str, Any] | None = None,
                      timeout: float | None = None) -> Any:
        """Send one request and return its result; raises a typed error on failure.

        With a client key, the request is signed and bound to the daemon's id, which a
        first (unsigned) ``hello`` on this connection tells. The answer is waited for
        ``timeout`` seconds (the connection's ``answer_timeout`` by default), then
        Unreachable (exit 3).
        """
        seconds = self.answer_timeout if timeout is None else timeout
        with trio.move_on_after(seconds):
            return await self._request_signed(method, params)
        raise Unreachable(no_answer(self.where, method, seconds))

    async def _request_signed(self, method: str, params: dict[str, Any] | None) -> Any:
        if self.client_key is not None and self.daemon_id is None:
            hello = await self._request("hello", {}, sign=False)
            self.daemon_id = str(hello.get("daemon_id", "")) if isinstance(hello, dict) else ""
            if method == "hello":
                return hello
        return await self._request(method, params, sign=self.client_key is not None)

    async def _request(self, method: str, params: dict[str, Any] | None, sign: bool) -> Any:
        if self.violation is not None:
            raise self.violation
        if self._reader_done:
            raise closed_error(self.closed, "the daemon closed the connection")
        check_utf8(params)
        req_id = self._next_id
        self._next_id += 1
        nonce = secrets.token_hex(16)
        send, recv = trio.open_memory_channel[dict[str, Any]](1)
        self._waiting[req_id] = send
        try:
            out: dict[str, Any] = {"id": req_id, "nonce": nonce, "method": method,
                                   "params": params or {}}
            if sign and self.client_key is not None:
                ts = time.time()
                daemon = self.daemon_id or ""
                data = request_signing_bytes(req_id, nonce, method, out["params"], ts,
                                             self.client_key.kid, daemon)
                out["auth"] = {"kid": self.client_key.kid, "ts": ts, "daemon": daemon,
                               "sig": self.client_key.sign_bytes(data)}
            try:
                await self.ws.send_message(json.dumps(out))
            except ConnectionClosed as exc:
                reason = exc.reason
                raise closed_error(self.closed or Closed(
                    reason.code if reason else None, reason.reason if reason else None),
                    "the daemon closed the connection") from None
            try:
                frame = await recv.receive()
            except trio.EndOfChannel:
                if self.violation is not None:
                    raise self.violation from None
                raise closed_error(self.closed, "the daemon closed the connection") from None
        finally:
            self._waiting.pop(req_id, None)
        return answer(frame, nonce)


async def decide(conn: Connection, mission_id: int, approve: bool, comment: str,
                 plan: str | None = None, clearing: bool = False) -> Any:
    """Approve or reject a mission, naming it by id and the time it opened, and (an
    approval) the plan approved: ``plan``, else the plan it waits with as read now.

    A signed decision is then good for that mission only: not for a mission that
    opens later, nor on another daemon; an approval is good for that plan only.
    """
    shown = (await conn.request("missions.get", {"id": mission_id}))["mission"]
    method = "missions.approve" if approve else "missions.reject"
    params = {"id": mission_id, "comment": comment, "opened": shown["opened_at"]}
    if approve:
        full = (shown.get("plan") or {}).get("sha256")
        # A prefix of the plan shown is sent as its full hash; any other as given (graced
        # then says it does not match).
        plan = full if not plan or (full and full.startswith(plan)) else plan
        if plan:
            params["plan"] = plan
        if clearing:
            params["clearing"] = True
    return await conn.request(method, params)


def sole_exception(group: BaseExceptionGroup) -> BaseException:
    """The one leaf of a nursery's exception group (or the group if there are several)."""
    leaf: BaseException = group
    while isinstance(leaf, BaseExceptionGroup) and len(leaf.exceptions) == 1:
        leaf = leaf.exceptions[0]
    return leaf


@asynccontextmanager
async def connect(endpoint: Endpoint, trusted_key: bytes | None = None,
                  timeout: float | None = None, client_key: Signer | None = None,
                  verify_events: bool = True) -> AsyncIterator[Connection]:
    """Open a connection; raises :class:`Unreachable` if the daemon cannot be reached.

    With ``trusted_key`` every response and notice must be signed by it, and (with
    ``verify_events``) every event; without it only ``hello`` may be asked (to pin a
    key). A frame that breaks the protocol ends the connection, and its error is raised
    by whatever waits on the connection, and at the end of the block.
    Over TCP every request is signed with this user's key (``gracectl keys generate``)
    unless ``client_key`` is given. Errors raised in the body come out as themselves,
    not wrapped in an exception group.
    """
    if client_key is None and endpoint.url:
        try:
            client_key = trust.load_client_key()
        except ValueError as exc:
            raise CtlError(str(exc)) from None
    try:
        async with trio.open_nursery() as nursery:
            ws = await _open(nursery, endpoint,
                             endpoint.answer_timeout if timeout is None else timeout)
            conn = Connection(ws, trusted_key, client_key, verify_events,
                              endpoint.answer_timeout, endpoint.url or endpoint.socket or "")
            nursery.start_soon(conn.reader)
            nursery.start_soon(conn.checker)
            try:
                yield conn
            finally:
                # A clean close waits for the daemon's close frame, which the reader
                # tasks receive; if we are being cancelled (q in top, a deadline), they
                # are too: send ours and go, rather than wait out the second.
                cancelled = trio.current_effective_deadline() == float("-inf")
                with trio.move_on_after(0.05 if cancelled else 1) as cs:
                    cs.shield = True
                    await ws.aclose()
                nursery.cancel_scope.cancel()
            if conn.violation is not None:
                raise conn.violation
    except BaseExceptionGroup as group:
        leaf = sole_exception(group)
        if isinstance(leaf, trio_websocket.ConnectionRejected):
            body = leaf.body.decode("utf-8", "replace") if leaf.body else ""
            raise Unreachable(f"graced at {_where(endpoint)} refused the "
                              f"connection ({leaf.status_code}: {body})") from None
        raise leaf from None


async def _open(nursery: trio.Nursery, endpoint: Endpoint, timeout: float) -> WebSocketConnection:
    try:
        with trio.fail_after(timeout):
            if endpoint.url and endpoint.url.startswith("wss://"):
                # The TLS handshake first, on its own: a certificate that does not
                # verify is then an error that says so, not a stalled WebSocket.
                parts = urlsplit(endpoint.url)
                host = parts.hostname or ""
                tcp = await trio.open_tcp_stream(host, parts.port or 443)
                tls = trio.SSLStream(tcp, ssl.create_default_context(cafile=endpoint.cacert),
                                     server_hostname=host, https_compatible=True)
                try:
                    await tls.do_handshake()
                except BaseException:
                    await trio.aclose_forcefully(tcp)
                    raise
                netloc = host if parts.port is None else f"{host}:{parts.port}"
                return await trio_websocket.wrap_client_stream(
                    nursery, tls, netloc, parts.path or "/", max_message_size=MAX_MESSAGE_BYTES)
            if endpoint.url:
                return await trio_websocket.connect_websocket_url(
                    nursery, endpoint.url, max_message_size=MAX_MESSAGE_BYTES
                )
            stream = await trio.open_unix_socket(endpoint.socket or "")
            return await trio_websocket.wrap_client_stream(
                nursery, stream, "localhost", "/", max_message_size=MAX_MESSAGE_BYTES
            )
    except (OSError, ssl.SSLError, trio.BrokenResourceError, trio_websocket.HandshakeError,
            trio.TooSlowError, ConnectionClosed) as exc:
        where = _where(endpoint)
        if isinstance(exc, trio.TooSlowError):  # as the one-shot commands say it
            raise Unreachable(f"graced at {where} did not complete the WebSocket handshake "
                              f"within {timeout:g} s (--answer-timeout)") from None
        detail = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        if isinstance(exc, trio.BrokenResourceError) and exc.__cause__ is not None:
            detail = str(exc.__cause__)  # trio's SSLStream wraps the ssl error
        if isinstance(exc, trio_websocket.ConnectionRejected):
            detail = f"refused: {exc.body.decode('utf-8', 'replace') if exc.body else ''}"
        if isinstance(exc, PermissionError) and not endpoint.url:
            raise NotAuthorised(f"cannot reach graced at {where}: {detail} ({socket_hint(where)})"
                                ) from None
        raise Unreachable(f"cannot reach graced at {where}: {redact_text(detail)}") from None


def _where(endpoint: Endpoint) -> str:
    """The endpoint as a message shows it: a URL without its credentials or query."""
    return redact_url(endpoint.url) if endpoint.url else str(endpoint.socket)

