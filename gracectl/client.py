"""The client side of the wire: connect, send requests, check signed responses.

A :class:`Connection` runs a reader task that splits each message into frames
(newline-separated), hands responses to the request waiting for them, and puts
events on :attr:`Connection.events`. Responses are checked against the trusted key
when one is known, and must echo the request's nonce.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import trio
import trio_websocket
from trio_websocket import ConnectionClosed, WebSocketConnection

from graced.protocol import ExitCode, Signer, check_signature, key_id
from graced.protocol.wire import ERROR_EXIT, request_signing_bytes

from . import trust
from .errors import CtlError, NotAuthorised, NotFound, RemoteError, Unreachable


@dataclass(frozen=True)
class Endpoint:
    """Where the daemon is: a Unix socket path or a ws:// URL."""

    socket: str | None = None
    url: str | None = None

    @property
    def name(self) -> str:
        return self.url or f"unix:{os.path.abspath(self.socket or '')}"


class Closed(Exception):
    """The connection ended; ``code``/``reason`` from the close frame, if any."""

    def __init__(self, code: int | None, reason: str | None) -> None:
        super().__init__(f"connection closed ({code}: {reason or 'no reason'})")
        self.code = code
        self.reason = reason


class Connection:
    def __init__(self, ws: WebSocketConnection, trusted_key: bytes | None,
                 client_key: Signer | None = None) -> None:
        self.ws = ws
        self.trusted_key = trusted_key
        self.client_key = client_key
        self._next_id = 1
        self._waiting: dict[int, trio.MemorySendChannel[dict[str, Any]]] = {}
        self.events_send, self.events = trio.open_memory_channel[tuple[str, dict[str, Any]]](
            1_000_000
        )
        self.notices: list[dict[str, Any]] = []
        self.closed: Closed | None = None
        self.daemon_id: str | None = None  # learnt from hello before signing a request

    async def reader(self) -> None:
        try:
            while True:
                message = await self.ws.get_message()
                if isinstance(message, bytes):
                    continue
                for line in message.split("\n"):
                    try:
                        frame = json.loads(line)
                    except ValueError:
                        frame = {"_unparsable": line}
                    if not isinstance(frame, dict):
                        frame = {"_unparsable": line}
                    kind = frame.get("type")
                    if kind == "response":
                        waiter = self._waiting.get(frame.get("id"))  # type: ignore[arg-type]
                        if waiter is not None:
                            waiter.send_nowait(frame)
                    elif kind == "notice":
                        self.notices.append(frame)
                    else:
                        self.events_send.send_nowait((line, frame))
        except ConnectionClosed as exc:
            reason = exc.reason
            self.closed = Closed(reason.code if reason else None, reason.reason if reason else None)
        finally:
            self.events_send.close()
            for waiter in self._waiting.values():
                waiter.close()

    async def request(self, method: str, params: dict[str, Any] | None = None) -> Any:
        """Send one request and return its result; raises a typed error on failure.

        With a client key, the request is signed and bound to the daemon's id, which a
        first (unsigned) ``hello`` on this connection tells.
        """
        if self.client_key is not None and self.daemon_id is None:
            hello = await self._request("hello", {}, sign=False)
            self.daemon_id = str(hello.get("daemon_id", "")) if isinstance(hello, dict) else ""
            if method == "hello":
                return hello
        return await self._request(method, params, sign=self.client_key is not None)

    async def _request(self, method: str, params: dict[str, Any] | None, sign: bool) -> Any:
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
            except ConnectionClosed:
                raise Unreachable("the daemon closed the connection") from None
            try:
                frame = await recv.receive()
            except trio.EndOfChannel:
                why = f" ({self.closed.reason})" if self.closed and self.closed.reason else ""
                raise Unreachable(f"the daemon closed the connection{why}") from None
        finally:
            del self._waiting[req_id]
        self.check_frame(frame, nonce)
        if frame.get("ok"):
            return frame.get("result")
        err = frame.get("error") or {}
        code = str(err.get("code", "error"))
        message = str(err.get("message", "request failed"))
        exit_code = ERROR_EXIT.get(code, ExitCode.ERROR)
        if exit_code == ExitCode.NOT_AUTHORISED:
            raise NotAuthorised(message)
        if exit_code == ExitCode.NOT_FOUND:
            raise NotFound(message)
        raise RemoteError(code, message, exit_code)

    def check_frame(self, frame: dict[str, Any], nonce: str) -> None:
        if frame.get("nonce") != nonce:
            raise CtlError("response does not echo our nonce (replayed response?)",
                           ExitCode.REPLAYED)
        if self.trusted_key is not None:
            if frame.get("kid") != key_id(self.trusted_key):
                raise CtlError(
                    f"response signed by unknown key {frame.get('kid')} "
                    f"(trusted key is {key_id(self.trusted_key)})", ExitCode.BAD_SIGNATURE)
            if not check_signature(frame, self.trusted_key):
                raise CtlError("response has a bad signature", ExitCode.BAD_SIGNATURE)


async def decide(conn: Connection, mission_id: int, approve: bool, comment: str,
                 plan: str | None = None) -> Any:
    """Approve or reject a mission, naming it by id and the time it opened, and (an
    approval) the plan approved: ``plan``, else the plan it waits with as read now.

    A signed decision is then good for that mission only: not for a mission that
    opens later, nor on another daemon; an approval is good for that plan only.
    """
    shown = (await conn.request("missions.get", {"id": mission_id}))["mission"]
    method = "missions.approve" if approve else "missions.reject"
    params = {"id": mission_id, "comment": comment, "opened": shown["opened_at"]}
    if approve:
        plan = plan or (shown.get("plan") or {}).get("sha256")
        if plan:
            params["plan"] = plan
    return await conn.request(method, params)


def sole_exception(group: BaseExceptionGroup) -> BaseException:
    """The one leaf of a nursery's exception group (or the group if there are several)."""
    leaf: BaseException = group
    while isinstance(leaf, BaseExceptionGroup) and len(leaf.exceptions) == 1:
        leaf = leaf.exceptions[0]
    return leaf


@asynccontextmanager
async def connect(endpoint: Endpoint, trusted_key: bytes | None = None,
                  timeout: float = 10.0, client_key: Signer | None = None
                  ) -> AsyncIterator[Connection]:
    """Open a connection; raises :class:`Unreachable` if the daemon cannot be reached.

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
            ws = await _open(nursery, endpoint, timeout)
            conn = Connection(ws, trusted_key, client_key)
            nursery.start_soon(conn.reader)
            try:
                yield conn
            finally:
                with trio.move_on_after(1) as cs:
                    cs.shield = True
                    await ws.aclose()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        leaf = sole_exception(group)
        if isinstance(leaf, trio_websocket.ConnectionRejected):
            body = leaf.body.decode("utf-8", "replace") if leaf.body else ""
            raise Unreachable(f"graced at {endpoint.url or endpoint.socket} refused the "
                              f"connection ({leaf.status_code}: {body})") from None
        raise leaf from None


async def _open(nursery: trio.Nursery, endpoint: Endpoint, timeout: float) -> WebSocketConnection:
    try:
        with trio.fail_after(timeout):
            if endpoint.url:
                return await trio_websocket.connect_websocket_url(
                    nursery, endpoint.url, max_message_size=64 << 20
                )
            stream = await trio.open_unix_socket(endpoint.socket or "")
            return await trio_websocket.wrap_client_stream(
                nursery, stream, "localhost", "/", max_message_size=64 << 20
            )
    except (OSError, trio_websocket.HandshakeError, trio.TooSlowError,
            ConnectionClosed) as exc:
        where = endpoint.url or endpoint.socket
        detail = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        if isinstance(exc, trio_websocket.ConnectionRejected):
            detail = f"refused: {exc.body.decode('utf-8', 'replace') if exc.body else ''}"
        raise Unreachable(f"cannot reach graced at {where}: {detail}") from None
