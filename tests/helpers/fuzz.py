"""Wire fuzzing against a live graced: hypothesis strategies for malformed frames, and a
client that sends one frame and reports what the daemon did about it.

Used by tests/test_fuzz_e2e.py (a few hundred cases) and bench/fuzz.py (50,000+).

Outcomes a frame may have:
  ``reply:<code>``   a signed response (``ok`` for a frame that happened to be valid)
  ``closed:<code>``  the daemon closed the connection with a close frame (e.g. 1007)

The oracle, :func:`allowed`, says which outcomes each frame may have: a text frame that is
not UTF-8 (sent raw, as no WebSocket library will) fails its connection (1007, or dropped:
see DROPPED_ON_BAD_UTF8) and nothing else; a
binary frame gets a ``bad_request`` reply; a text frame gets a reply (never ``internal``,
``too_large`` exactly when it is over the limit), and no close. Every reply must be signed
and answer this frame: its id and nonce are the request's own (or null where the request's
were unusable), and envelopes carry a fresh nonce per send, so a stale reply cannot pass.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import socket
import struct
import threading
from dataclasses import dataclass
from typing import Any

import trio
import trio_websocket
from hypothesis import strategies as st

from graced.protocol import check_signature

# Replaced by a fresh random nonce each time a frame is sent (see FuzzClient.send).
FRESH_NONCE = "fresh-nonce-9f3c1a"
MAX_ID = MAX_NONCE = 128  # docs/protocol.md: the longest id and nonce a request may carry


# RFC 6455 8.1 and 7.1.7: invalid UTF-8 in a text frame fails the connection, and a server
# SHOULD say so with a 1007 close frame first. trio-websocket alone closes the TCP stream
# without one; graced/wsconn.py sends it. So a drop without a close frame is a failure.
DROPPED_ON_BAD_UTF8 = False


@dataclass(frozen=True)
class RawText:
    """A text frame whose payload is not UTF-8: sent as raw bytes on the socket."""

    payload: bytes

# Methods a fuzzed frame may name. ``emit`` is left out on purpose: for a controlling
# user it is a load generator (up to 10 million events per request), so random params
# would fill the disk rather than find bugs; its validation is tested directly.
METHODS = ("hello", "status", "subscribe", "keys", "missions.list", "missions.get",
           "missions.approve", "missions.reject", "missions.similar", "detectors",
           "knowledge.list", "knowledge.show", "knowledge.export", "knowledge.stats",
           "knowledge.import", "pause", "resume")

huge_ints = st.one_of(st.integers(), st.integers(min_value=2**53, max_value=10**40),
                      st.integers(max_value=-(2**53), min_value=-(10**40)))
scalars = st.one_of(st.none(), st.booleans(), huge_ints, st.floats(allow_nan=False),
                    st.text(max_size=40))
json_values = st.recursive(
    scalars, lambda children: st.one_of(st.lists(children, max_size=5),
                                        st.dictionaries(st.text(max_size=10), children,
                                                        max_size=5)), max_leaves=20)
param_keys = st.sampled_from(["id", "since", "patterns", "limit", "states", "severities",
                              "all", "history", "pattern", "comment", "source", "patterns",
                              "replace", "host", "topic", "payload", "count"])


@st.composite
def envelopes(draw: Any) -> str:
    """A request envelope with fields of the right names and random types or values."""
    obj: dict[str, Any] = {}
    if draw(st.integers(0, 9)):
        obj["id"] = draw(st.one_of(huge_ints, st.text(max_size=200), json_values))
    if draw(st.integers(0, 9)):
        obj["nonce"] = draw(st.one_of(st.just(FRESH_NONCE), st.just(FRESH_NONCE),
                                      st.text(max_size=200), json_values))
    if draw(st.integers(0, 9)):
        obj["method"] = draw(st.one_of(st.sampled_from(METHODS), st.text(max_size=30),
                                       json_values))
    if draw(st.booleans()):
        obj["params"] = draw(st.one_of(
            st.dictionaries(param_keys, json_values, max_size=4), json_values))
    if draw(st.integers(0, 9)) == 0:
        obj["auth"] = draw(json_values)
    if draw(st.integers(0, 19)) == 0:
        obj[draw(st.text(max_size=8))] = draw(json_values)
    return json.dumps(obj)


def _nested(depth: int) -> str:
    return '{"id": 1, "nonce": "n", "method": "hello", "params": {"x": ' + "[" * depth + \
        "]" * depth + "}}"


frames = st.one_of(
    envelopes(),
    json_values.map(json.dumps),
    st.text(max_size=300),                                            # not JSON at all
    st.binary(max_size=300),                                          # binary frames
    st.binary(min_size=1, max_size=64).map(lambda b: b"\xff" + b),    # invalid UTF-8 ...
    st.binary(min_size=1, max_size=64).map(lambda b: RawText(b"\xff" + b)),  # ... as text
    st.sampled_from([b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf"]).map(
        lambda bad: RawText(b'{"id": 1, "nonce": "n", "method": "hello", "x": "' + bad
                            + b'"}')),                                # overlong, surrogate, ...
    st.integers(1, 5000).map(_nested),                                # deep nesting
    st.sampled_from(["1e999", "-1e999", "NaN", "Infinity", "[" * 100000,
                     '{"id": 1e400, "nonce": "n", "method": "hello"}',
                     '{"id": 123456789012345678901234567890, "nonce": "n", "method": "x"}']),
    st.integers(60_000, 300_000).map(lambda n: '{"id": 1, "nonce": "n", "method": "hello", '
                                     '"params": {"pad": "' + "x" * n + '"}}'),  # oversized
)


def _valid_id(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    return (isinstance(value, int) and abs(value) < 2**53) or (
        isinstance(value, str) and len(value) <= MAX_ID)


def _depth(value: Any, limit: int) -> int:
    if limit <= 0 or not isinstance(value, (list, dict)):
        return 0
    children = value.values() if isinstance(value, dict) else value
    return 1 + max((_depth(c, limit - 1) for c in children), default=0)


def expected_echo(frame: str, max_request_bytes: int) -> set[tuple[Any, Any]]:
    """The (id, nonce) a reply to ``frame`` may carry: the request's id once it is
    usable, and its nonce too once both are (null for what the daemon could not read)."""
    if len(frame.encode("utf-8", "surrogatepass")) > max_request_bytes:
        return {(None, None)}
    try:
        obj = json.loads(frame)
    except (ValueError, RecursionError):
        return {(None, None)}
    if not isinstance(obj, dict) or not _valid_id(obj.get("id")):
        return {(None, None)}
    nonce = obj.get("nonce")
    echo = (obj["id"], nonce if isinstance(nonce, str) and 1 <= len(nonce) <= MAX_NONCE
            else None)
    # Nesting deep enough to reach a recursion limit may fail to parse at all there.
    return {echo, (None, None)} if _depth(obj, 200) >= 200 else {echo}


def allowed(frame: str | bytes | RawText, max_request_bytes: int) -> set[str] | None:
    """The outcomes ``frame`` may have; None: any signed reply but ``internal``."""
    if isinstance(frame, RawText):
        return {"closed:1007", "dropped"} if DROPPED_ON_BAD_UTF8 else {"closed:1007"}
    if isinstance(frame, bytes):
        return {"reply:bad_request"}
    if len(frame.encode("utf-8", "surrogatepass")) > max_request_bytes:
        return {"reply:too_large"}
    return None


def check_outcome(frame: str | bytes | RawText, outcome: str, max_request_bytes: int) -> bool:
    ok = allowed(frame, max_request_bytes)
    if ok is None:  # a text frame within the limit: any signed reply but these two
        return outcome.startswith("reply:") and outcome not in ("reply:internal",
                                                                  "reply:too_large")
    return outcome in ok


class FuzzClient:
    """Sends frames to graced over one WebSocket at a time, from a trio loop in a thread.

    :meth:`send` blocks until the daemon replied to the frame or closed the connection,
    and returns the outcome (see the module docstring); it raises AssertionError when the
    daemon did neither within ``timeout`` or broke the connection without a close frame.
    """

    def __init__(self, socket_path: str, public_key: bytes, max_request_bytes: int,
                 timeout: float = 10.0) -> None:
        self.socket_path = socket_path
        self.public_key = public_key
        self.max_request_bytes = max_request_bytes
        self.timeout = timeout
        self._token: trio.lowlevel.TrioToken | None = None
        self._ready = threading.Event()
        self._stop: trio.Event | None = None
        self._ws: trio_websocket.WebSocketConnection | None = None
        self._nursery: trio.Nursery | None = None
        self.connections = 0
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)
        self._thread.start()
        self._ready.wait(10)

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._ready.set()
            await self._stop.wait()
            if self._ws is not None:
                with trio.move_on_after(5):
                    await self._ws.aclose()  # a clean goodbye, so graced frees its side
            nursery.cancel_scope.cancel()

    def close(self) -> None:
        if self._token is not None and self._stop is not None:
            trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join(10)

    def send(self, frame: str | bytes | RawText) -> str:
        """Send one frame; return its outcome. Raises AssertionError when the daemon
        neither answered nor closed in time, broke the connection without a close frame,
        or answered with a reply that is unsigned or not this frame's (id and nonce)."""
        if isinstance(frame, RawText):
            return self._send_raw_text(frame.payload)
        if isinstance(frame, str) and FRESH_NONCE in frame:
            frame = frame.replace(FRESH_NONCE, secrets.token_hex(8))
        return trio.from_thread.run(self._send, frame, trio_token=self._token)  # type: ignore[no-any-return]

    def _send_raw_text(self, payload: bytes) -> str:
        """A WebSocket handshake and one masked text frame written by hand on a new
        connection; returns ``closed:<code>`` from the daemon's close frame."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(self.timeout)
            s.connect(self.socket_path)
            self.connections += 1
            key = base64.b64encode(os.urandom(16)).decode()
            s.sendall(f"GET / HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
                      f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                      f"Sec-WebSocket-Version: 13\r\n\r\n".encode())
            buf = b""
            while b"\r\n\r\n" not in buf:
                chunk = s.recv(4096)
                assert chunk, f"handshake cut short: {buf!r}"
                buf += chunk
            head, _, buf = buf.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 101"), head
            mask = os.urandom(4)
            assert len(payload) < 126
            s.sendall(bytes([0x81, 0x80 | len(payload)]) + mask
                      + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
            try:
                while True:
                    while len(buf) < 2 or len(buf) < 2 + (buf[1] & 0x7F):
                        chunk = s.recv(4096)
                        if not chunk:
                            return "dropped"  # no close frame: see DROPPED_ON_BAD_UTF8
                        buf += chunk
                    opcode, length = buf[0] & 0x0F, buf[1] & 0x7F
                    assert length < 126, "a control frame or reply longer than expected"
                    body, buf = buf[2:2 + length], buf[2 + length:]
                    if opcode == 0x8:
                        return f"closed:{struct.unpack('!H', body[:2])[0] if body else 1005}"
                    return f"reply to invalid UTF-8: {body[:200]!r}"
            except TimeoutError:
                raise AssertionError(f"no close within {self.timeout} s for raw text "
                                     f"{payload!r}") from None

    async def _connect(self) -> trio_websocket.WebSocketConnection:
        assert self._nursery is not None
        stream = await trio.open_unix_socket(self.socket_path)
        self.connections += 1
        return await trio_websocket.wrap_client_stream(self._nursery, stream, "localhost",
                                                       "/", max_message_size=64 << 20)

    async def _send(self, frame: str | bytes) -> str:
        if self._ws is None or self._ws.closed:
            self._ws = await self._connect()
        ws = self._ws
        echo = (expected_echo(frame, self.max_request_bytes) if isinstance(frame, str)
                else {(None, None)})
        try:
            await ws.send_message(frame)
            with trio.fail_after(self.timeout):
                while True:
                    message = await ws.get_message()
                    for line in str(message).split("\n"):
                        reply = json.loads(line)
                        if reply.get("type") != "response":
                            continue  # an event (after a subscribe) or a notice
                        assert check_signature(reply, self.public_key), reply
                        got = (reply.get("id"), reply.get("nonce"))
                        assert got in echo, (
                            f"reply {got} does not answer request {echo}: {reply}")
                        if not reply.get("ok"):
                            return f"reply:{reply['error']['code']}"
                        if "subscribe" in frame:
                            # Events would queue up unread while hypothesis draws the next
                            # frame (and graced rightly drops a client that stops reading).
                            await ws.aclose()
                            self._ws = None
                        return "reply:ok"
        except trio_websocket.ConnectionClosed as exc:
            self._ws = None
            code = exc.reason.code if exc.reason else None
            return f"closed:{code}"
        except trio.TooSlowError:
            raise AssertionError(f"no reply and no close within {self.timeout} s for "
                                 f"{frame[:200]!r}") from None

    def hello_ok(self) -> bool:
        """A fresh, well-formed request on a new connection still gets a good answer."""
        async def check() -> bool:
            ws = await self._connect()
            nonce = secrets.token_hex(8)
            await ws.send_message(json.dumps({"id": 1, "nonce": nonce, "method": "hello"}))
            with trio.fail_after(self.timeout):
                while True:
                    reply = json.loads(str(await ws.get_message()).split("\n")[0])
                    if reply.get("type") == "response":
                        await ws.aclose()
                        return bool(reply["ok"] and reply["nonce"] == nonce
                                    and check_signature(reply, self.public_key))

        return trio.from_thread.run(check, trio_token=self._token)  # type: ignore[no-any-return]
