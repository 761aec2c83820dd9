"""A small blocking WebSocket client for one-shot commands over graced's Unix socket.

``gracectl status`` asks one question and prints one answer; a shell script calls it in a
loop. An event loop and a WebSocket library cost more to import than the whole exchange
takes, so one-shot commands speak RFC 6455 here, on a plain socket: the client's side of
the handshake, masked text frames out, unmasked frames in (ping answered, close honoured,
fragments joined, at most :data:`MAX_MESSAGE_BYTES` a message). No extension is offered,
so a frame with a reserved bit set is a protocol violation.

What the daemon sends is checked exactly as :class:`gracectl.client.Connection` checks it:
every response and notice in canonical form and signed by the trusted key, a response to
our request echoing its nonce; an event strictly parsed, signed by the trusted key and
newer than the one before. Every wait has a deadline.
"""

from __future__ import annotations

# socket.py's own core (socket.socket is its subclass): connect, settimeout, sendall,
# recv and close are all this client calls, and socket.py itself (makefile, sendfile,
# enum names for every constant, selectors) would cost 2 ms more at each start.
import _socket
import base64
import grp
import hashlib
import json
import math
import os
import stat
import struct
import time
from typing import Any

from graced.protocol import (
    CanonicalError,
    ExitCode,
    Violation,
    check_signature,
    key_id,
    parse_event_line,
    verify_detached,
)
from graced.protocol.canonical import canonical_bytes_parsed
from graced.protocol.times import VERBATIM, epoch, is_time_key
from graced.protocol.verify import MAX_LINE_BYTES
from graced.protocol.wire import ERROR_EXIT

from .endpoint import ANSWER_TIMEOUT, no_answer
from .errors import (
    CtlError,
    NotAuthorised,
    NotFound,
    ProtocolViolation,
    RemoteError,
    Unreachable,
    check_utf8,
)

MAX_MESSAGE_BYTES = MAX_LINE_BYTES + 1024
MAX_HEAD = 16384
MAX_FRAGMENTS = 4096
"""Frames one message may come in (empty continuation frames would grow the list of
parts for ever without growing its size)."""
MAX_PENDING_BYTES = 64 << 20
"""Events received while waiting for an answer and not yet taken, at most (bytes)."""
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455, 1.3


class TooSlow(Exception):
    """The deadline passed while waiting for the daemon."""


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse_frame(line: str, data: bytes) -> dict[str, Any]:
    """A response or notice, strictly: JSON, an object, in canonical form, of a known
    type; raises ProtocolViolation otherwise. (An event, whose line starts with
    '{"kid":', is parsed by parse_event_line.)"""
    if len(data) > MAX_LINE_BYTES:
        raise ProtocolViolation(f"a frame longer than {MAX_LINE_BYTES} bytes")
    try:
        frame = json.loads(line, parse_constant=_no_constant)
    except RecursionError:
        raise ProtocolViolation("a frame nested too deep") from None
    except ValueError:
        raise ProtocolViolation("an unparsable frame") from None
    if not isinstance(frame, dict):
        raise ProtocolViolation("a frame that is not a JSON object")
    try:
        canonical = canonical_bytes_parsed(frame)
    except CanonicalError as exc:
        raise ProtocolViolation(f"a frame that is not canonical JSON ({exc})") from None
    if canonical != data:
        raise ProtocolViolation("a frame that is not in canonical form")
    kind = frame.get("type")
    if kind not in ("response", "notice"):
        raise ProtocolViolation(f"a frame of unknown type {str(kind)[:40]!r}")
    return frame


def check_signed(frame: dict[str, Any], kind: str, key: bytes | None) -> None:
    """A response or notice must be signed by the trusted ``key`` (None: not checked)."""
    if key is None:
        return
    kid = key_id(key)
    if "sig" not in frame:
        raise CtlError(f"an unsigned {kind} (no sig)", ExitCode.BAD_SIGNATURE)
    if frame.get("kid") != kid:
        raise CtlError(f"a {kind} signed by unknown key {str(frame.get('kid'))[:20]} "
                       f"(trusted key is {kid})", ExitCode.BAD_SIGNATURE)
    if not check_signature(frame, key):
        raise CtlError(f"a {kind} with a bad or missing signature", ExitCode.BAD_SIGNATURE)


LATEST = 1e10  # about the year 2286: no time graced keeps is later


def bad_time(result: Any) -> str | None:
    """What in an answer is a time field (``opened_at``, ``ts``...: graced.protocol.times)
    holding no sane time, or None: each must be null, a finite number of seconds from 0
    to :data:`LATEST`, or the ISO form of one. A detector's own ``detail`` is its data."""
    stack = [result]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            for key, value in item.items():
                if key in VERBATIM:
                    continue
                if is_time_key(key) and value is not None:
                    t = epoch(value)
                    if t is None or not (math.isfinite(t) and 0 <= t <= LATEST) or (
                            isinstance(value, str) and "T" not in value):
                        return f"{key} is not a time ({json.dumps(value)[:40]})"
                else:
                    stack.append(value)
    return None


MAX_REMOTE_TEXT = 400  # characters of a daemon's error message shown (graced's own: ~300)


def remote_text(message: Any) -> str:
    """An error message from the daemon as gracectl shows it: a string (anything else
    as its JSON), cut to MAX_REMOTE_TEXT characters; escaped when printed."""
    text = message if isinstance(message, str) else json.dumps(message)[:MAX_REMOTE_TEXT + 1]
    return text if len(text) <= MAX_REMOTE_TEXT else text[:MAX_REMOTE_TEXT] + "... (cut)"


def answer(frame: dict[str, Any], nonce: str) -> Any:
    """A checked response's result, or its error raised as the typed exception."""
    if frame.get("nonce") != nonce:
        raise CtlError("response does not echo our nonce (replayed response?)",
                       ExitCode.REPLAYED)
    if not isinstance(frame.get("ok"), bool) or (
            frame["ok"] and "result" not in frame) or (
            not frame["ok"] and not isinstance(frame.get("error"), dict)):
        raise ProtocolViolation("a response without ok and result or error")
    if frame["ok"]:
        bad = bad_time(frame["result"])
        if bad:
            raise ProtocolViolation(f"an answer whose {bad}")
        return frame["result"]
    err = frame["error"]
    code = err.get("code", "error")
    code = code if isinstance(code, str) and len(code) <= 64 else "error"
    message = remote_text(err.get("message", "request failed"))
    exit_code = ERROR_EXIT.get(code, ExitCode.ERROR)
    if exit_code == ExitCode.NOT_AUTHORISED:
        raise NotAuthorised(message)
    if exit_code == ExitCode.NOT_FOUND:
        raise NotFound(message)
    raise RemoteError(code, message, exit_code)


class SyncConnection:
    """One WebSocket connection to graced over a Unix socket (use as a context manager).

    ``trusted_key``: every response, notice and event must be signed by it (None: only
    ``hello`` may be asked, to pin a key). ``deadline``: time.monotonic() by which every
    wait ends (TooSlow), else ``timeout`` seconds for the connection and each answer
    (Unreachable, exit 3: a daemon that stopped answering, or a peer that sends nothing
    useful, never holds a one-shot command for ever); with ``answer_too``, both: the
    handshake and each answer within ``timeout`` (exit 3), all by the deadline (TooSlow).
    Events are waited for until the deadline or the ``until`` given.
    """

    def __init__(self, path: str, trusted_key: bytes | None,
                 timeout: float = ANSWER_TIMEOUT, deadline: float | None = None,
                 answer_too: bool = False) -> None:
        self.path = path
        self.answer_too = answer_too  # with a deadline, ``timeout`` still bounds answers
        self.trusted_key = trusted_key
        self.trusted_kid = key_id(trusted_key) if trusted_key is not None else None
        self.timeout = timeout
        self.deadline = deadline
        self.sock: _socket.socket | None = None
        self.buf = bytearray()
        self.pending: list[tuple[str, dict[str, Any]]] = []  # events not yet taken
        self.pending_bytes = 0
        self.subscribed = False  # events are expected only once we subscribed
        self.next_id = 1
        self.last_seq: int | None = None
        self.closed = False
        self.open = False  # the handshake is done

    # -- the socket ---------------------------------------------------------------

    def _answer_by(self, seconds: float) -> tuple[float, bool]:
        """When an answer wanted now must have come, and whether that limit is the answer
        timeout (then Unreachable, exit 3) rather than the deadline (then TooSlow)."""
        limit = time.monotonic() + seconds
        if self.deadline is None or (self.answer_too and limit < self.deadline):
            return limit, True
        return self.deadline, False

    def _left(self, until: float | None = None) -> float:
        until = until if until is not None else self.deadline
        if until is None:
            return self.timeout
        left = until - time.monotonic()
        if left <= 0:
            raise TooSlow
        return left

    def __enter__(self) -> SyncConnection:
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        answer = False
        try:
            sock.settimeout(min(self.timeout, self._left()) if self.deadline else self.timeout)
            sock.connect(self.path)
            self.sock = sock
            until, answer = self._answer_by(self.timeout)
            self._handshake(until)
        except TooSlow:
            sock.close()
            self.sock = None
            if not answer:
                raise
            raise Unreachable(f"graced at {self.path} did not complete the WebSocket "
                              f"handshake within {self.timeout:g} s (--answer-timeout)"
                              ) from None
        except (OSError, ValueError) as exc:
            sock.close()
            detail = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            if isinstance(exc, PermissionError):
                raise NotAuthorised(f"cannot reach graced at {self.path}: {detail} "
                                    f"({socket_hint(self.path)})") from None
            raise Unreachable(f"cannot reach graced at {self.path}: {detail}") from None
        return self

    def __exit__(self, *exc: object) -> None:
        """Close as RFC 6455 asks: our close frame, then wait (briefly) until the daemon
        has closed its end, so it holds nothing of ours once we are gone."""
        if self.sock is None:
            return
        try:
            if not self.closed:
                self.sock.settimeout(0.5)
                self._send_frame(0x8, struct.pack("!H", 1000))
                # Half a second in all: a peer that keeps sending does not hold us.
                until = time.monotonic() + 0.5
                while self.sock.recv(65536):
                    left = until - time.monotonic()
                    if left <= 0:
                        break
                    self.sock.settimeout(left)
        except OSError:
            pass
        finally:
            self.sock.close()
            self.sock = None

    def _recv_more(self, until: float | None = None) -> None:
        """Read what the daemon sent next, waiting until ``until`` or the deadline (then
        TooSlow); with neither, ``timeout`` for one read before the handshake is done,
        and for ever after it (an event stream the user asked to wait on: requests
        always give ``until``)."""
        assert self.sock is not None
        limit = until if until is not None else self.deadline
        if limit is not None:
            self.sock.settimeout(self._left(limit))
        else:
            self.sock.settimeout(None if self.open else self.timeout)
        try:
            chunk = self.sock.recv(65536)
        except OSError as exc:
            raise self._failure(exc, limit, "did not answer") from None
        if not chunk:
            self.closed = True
            raise Unreachable("the daemon closed the connection")
        self.buf += chunk

    def _handshake(self, until: float) -> None:
        assert self.sock is not None
        key = base64.b64encode(os.urandom(16))
        self.sock.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
                          b"Connection: Upgrade\r\nSec-WebSocket-Key: " + key +
                          b"\r\nSec-WebSocket-Version: 13\r\n\r\n")
        # The whole answer by then: a daemon dripping a byte at a time does not hold us.
        while b"\r\n\r\n" not in self.buf:
            if len(self.buf) > MAX_HEAD:
                raise ProtocolViolation("an HTTP answer head over 16 KiB")
            self._recv_more(until)
        head, _, rest = bytes(self.buf).partition(b"\r\n\r\n")
        self.buf = bytearray(rest)
        lines = head.decode("latin-1").split("\r\n")
        status = lines[0].split()
        if len(status) < 2 or status[1] != "101":
            body = rest.decode("utf-8", "replace")[:200]
            raise Unreachable(f"graced at {self.path} refused the connection "
                              f"({' '.join(status[1:2]) or '?'}: {body})")
        fields = {k.strip().lower(): v.strip() for k, _, v in
                  (line.partition(":") for line in lines[1:])}
        accept = base64.b64encode(hashlib.sha1(key + GUID).digest()).decode()
        if fields.get("sec-websocket-accept") != accept:
            raise ProtocolViolation("a WebSocket handshake with a wrong Sec-WebSocket-Accept")
        if fields.get("sec-websocket-extensions"):
            raise ProtocolViolation("a WebSocket extension nobody asked for")
        self.open = True

    def _send_frame(self, opcode: int, payload: bytes) -> None:
        assert self.sock is not None
        n = len(payload)
        head = bytes([0x80 | opcode])
        if n < 126:
            head += bytes([0x80 | n])
        elif n < 65536:
            head += bytes([0x80 | 126]) + struct.pack("!H", n)
        else:
            head += bytes([0x80 | 127]) + struct.pack("!Q", n)
        mask = os.urandom(4)  # what secrets.token_bytes is, without importing it
        masked = (int.from_bytes(payload, "big") ^ int.from_bytes(
            (mask * (n // 4 + 1))[:n], "big")).to_bytes(n, "big") if n else b""
        self.sock.sendall(head + mask + masked)

    def _pong(self, payload: bytes, until: float | None) -> None:
        """Answer a ping, within the time a read would have: a peer that pings and
        never reads (our pongs fill the socket) is one that does not answer, exit 3 (or
        TooSlow past the deadline), never an error of the OS's."""
        assert self.sock is not None
        limit = until if until is not None else self.deadline
        self.sock.settimeout(self._left(limit) if limit is not None else self.timeout)
        try:
            self._send_frame(0xA, payload)
        except OSError as exc:
            raise self._failure(exc, limit, "sends pings and reads no pong") from None

    def _failure(self, exc: OSError, limit: float | None, what: str) -> Exception:
        """A socket's error as gracectl's: a timeout is TooSlow when there is a limit,
        else Unreachable naming --answer-timeout (graced ``what`` within it); any other
        error a connection lost (exit 3 both)."""
        if not isinstance(exc, TimeoutError):
            return Unreachable(f"connection to graced lost: {exc.strerror or exc}")
        if limit is not None:
            return TooSlow()
        return Unreachable(f"graced at {self.path} {what} within {self.timeout:g} s "
                           "(--answer-timeout)")

    def _need(self, n: int, until: float | None) -> None:
        while len(self.buf) < n:
            self._recv_more(until)

    def _message(self, until: float | None = None) -> str:
        """The next text message (pings answered); raises Unreachable on a close."""
        parts: list[bytes] = []
        size = 0
        while True:
            self._need(2, until)
            b0, b1 = self.buf[0], self.buf[1]
            if b0 & 0x70:
                raise ProtocolViolation("a WebSocket frame with a reserved bit set")
            if b1 & 0x80:
                raise ProtocolViolation("a masked WebSocket frame from the server")
            opcode, n, at = b0 & 0x0F, b1 & 0x7F, 2
            if n == 126:
                self._need(4, until)
                n, at = struct.unpack_from("!H", self.buf, 2)[0], 4
            elif n == 127:
                self._need(10, until)
                n, at = struct.unpack_from("!Q", self.buf, 2)[0], 10
            if opcode >= 0x8 and (n > 125 or not b0 & 0x80):
                raise ProtocolViolation("a WebSocket control frame too long or fragmented")
            if size + n > MAX_MESSAGE_BYTES:
                raise ProtocolViolation(f"a message over {MAX_MESSAGE_BYTES} bytes")
            self._need(at + n, until)
            payload = bytes(self.buf[at:at + n])
            del self.buf[:at + n]
            if opcode == 0x9:
                self._pong(payload, until)
                continue
            if opcode == 0xA:
                continue
            if opcode == 0x8:
                self.closed = True
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
                why = payload[2:].decode("utf-8", "replace")
                raise Unreachable("the daemon closed the connection"
                                  + (f" ({why})" if why else f" ({code})" if code else ""))
            if opcode == 0x2 or (opcode == 0x1 and parts) or (opcode == 0x0 and not parts
                                                              and not size):
                raise ProtocolViolation("a binary or out-of-order WebSocket frame")
            parts.append(payload)
            size += n
            if len(parts) > MAX_FRAGMENTS:
                raise ProtocolViolation(f"a message in more than {MAX_FRAGMENTS} fragments")
            if b0 & 0x80:
                try:
                    return b"".join(parts).decode("utf-8")
                except UnicodeDecodeError:
                    raise ProtocolViolation("a text message that is not UTF-8") from None

    # -- frames -------------------------------------------------------------------

    def _frames(self, until: float | None) -> list[tuple[str, dict[str, Any]]]:
        """The next message's frames: ('response', frame) or ('event', event); notices
        are checked and dropped."""
        out: list[tuple[str, dict[str, Any]]] = []
        for line in self._message(until).split("\n"):
            data = line.encode("utf-8", "surrogatepass")
            if not data:
                continue
            if data.startswith(b'{"kid":'):
                if len(data) > MAX_LINE_BYTES:
                    raise ProtocolViolation(f"a frame longer than {MAX_LINE_BYTES} bytes")
                out.append(("event", self._event(data, line)))
                continue
            frame = parse_frame(line, data)
            kind = frame["type"]
            check_signed(frame, kind, self.trusted_key)
            if kind == "response":
                out.append(("response", frame))
        return out

    def _event(self, data: bytes, line: str) -> dict[str, Any]:
        event, signing = parse_event_line(data)
        if self.trusted_key is not None:
            if event["kid"] != self.trusted_kid:
                raise Violation(ExitCode.BAD_SIGNATURE, event["seq"],
                                f"event signed by unknown key {event['kid']} (trusted key "
                                f"is {self.trusted_kid})")
            if not verify_detached(event["sig"], signing, self.trusted_key):
                raise Violation(ExitCode.BAD_SIGNATURE, event["seq"],
                                "event with a bad signature")
        if self.last_seq is not None and event["seq"] <= self.last_seq:
            raise Violation(ExitCode.REPLAYED, event["seq"],
                            f"event replayed or out of order (after seq {self.last_seq})")
        self.last_seq = event["seq"]
        event["_line"] = line
        return event

    # -- requests and events --------------------------------------------------------

    def request(self, method: str, params: dict[str, Any] | None = None,
                timeout: float | None = None) -> Any:
        """Send one request and return its result; raises a typed error on failure.

        The answer is waited for until the deadline (TooSlow), else ``timeout`` seconds
        (the connection's by default; then Unreachable, exit 3), or whichever comes
        first with ``answer_too``."""
        seconds = self.timeout if timeout is None else timeout
        until, answer = self._answer_by(seconds)
        try:
            return self._request(method, params, until)
        except TooSlow:
            if not answer:
                raise
            raise Unreachable(no_answer(self.path, method, seconds)) from None

    def _request(self, method: str, params: dict[str, Any] | None, until: float) -> Any:
        check_utf8(params)
        if method == "subscribe":
            self.subscribed = True
        req_id = self.next_id
        self.next_id += 1
        nonce = os.urandom(16).hex()
        body = json.dumps({"id": req_id, "nonce": nonce, "method": method,
                           "params": params or {}})
        try:
            self._send_frame(0x1, body.encode())
        except OSError:
            raise Unreachable("the daemon closed the connection") from None
        got: dict[str, Any] | None = None
        while got is None:
            # A whole message is checked: a second answer in it (a duplicate, or to no
            # request of ours) is a violation, as it is over trio.
            for kind, frame in self._frames(until):
                if kind == "event":
                    if not self.subscribed:
                        raise ProtocolViolation("an event on a connection that never "
                                                "subscribed")
                    line = frame.pop("_line")
                    self.pending_bytes += len(line)
                    if self.pending_bytes > MAX_PENDING_BYTES:
                        raise ProtocolViolation(f"over {MAX_PENDING_BYTES >> 20} MiB of "
                                                "events before the answer to a request")
                    self.pending.append((line, frame))
                    continue
                if got is not None or type(frame.get("id")) is not int or \
                        frame["id"] != req_id:
                    raise ProtocolViolation("a response to no pending request (id "
                                            f"{json.dumps(frame.get('id'))[:40]}: duplicate "
                                            "or unsolicited)")
                got = frame
        return answer(got, nonce)

    def next_event(self, until: float | None = None) -> tuple[str, dict[str, Any]]:
        """The next event (line, event), checked; TooSlow at ``until``."""
        while not self.pending:
            for kind, frame in self._frames(until):
                if kind == "response":
                    raise ProtocolViolation("a response to no pending request")
                self.pending.append((frame.pop("_line"), frame))
        line, event = self.pending.pop(0)
        self.pending_bytes = max(0, self.pending_bytes - len(line))
        return line, event


def check_hello(hello: Any) -> tuple[bytes, str]:
    """The key and daemon id a ``hello`` offers (not verified: for pinning)."""
    try:
        key = base64.b64decode(hello["public_key"], validate=True)
        daemon_id = hello.get("daemon_id", "")
    except (TypeError, KeyError, ValueError, AttributeError):
        key, daemon_id = b"", ""
    if len(key) != 32 or not isinstance(daemon_id, str):
        raise ProtocolViolation("a hello without a valid public key")
    if hello.get("kid") != key_id(key):
        raise ProtocolViolation("a hello whose kid is not its public key's")
    return key, daemon_id


def socket_hint(path: str | None) -> str:
    """What to do about a socket this user may not open: be in its group."""
    try:
        st = os.stat(path or "")
        group = grp.getgrgid(st.st_gid).gr_name
    except (OSError, KeyError):
        return "ask graced's operator for access: [daemon] socket_group, graced.toml(5)"
    return (f"the socket is mode {stat.S_IMODE(st.st_mode):04o}, group {group}: ask to be "
            f"added to group {group}, see [daemon] socket_group in graced.toml(5)")
