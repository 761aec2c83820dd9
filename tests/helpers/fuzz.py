"""Wire fuzzing against a live graced: hypothesis strategies for malformed frames, and a
client that sends one frame and reports what the daemon did about it.

Used by tests/test_fuzz_e2e.py (a few hundred cases) and bench/fuzz.py (50,000+).

Outcomes a frame may have (anything else is a failure):
  ``reply:<code>``   a signed response (``ok`` for a frame that happened to be valid)
  ``closed:<code>``  the daemon closed the connection with a close frame (e.g. 1009)
"""

from __future__ import annotations

import json
import secrets
import threading
from typing import Any

import trio
import trio_websocket
from hypothesis import strategies as st

from graced.protocol import check_signature

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
        obj["nonce"] = draw(st.one_of(st.text(max_size=200), json_values))
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
    st.binary(min_size=1, max_size=64).map(lambda b: b"\xff" + b),    # invalid UTF-8
    st.integers(1, 5000).map(_nested),                                # deep nesting
    st.sampled_from(["1e999", "-1e999", "NaN", "Infinity", "[" * 100000,
                     '{"id": 1e400, "nonce": "n", "method": "hello"}',
                     '{"id": 123456789012345678901234567890, "nonce": "n", "method": "x"}']),
    st.integers(60_000, 300_000).map(lambda n: '{"id": 1, "nonce": "n", "method": "hello", '
                                     '"params": {"pad": "' + "x" * n + '"}}'),  # oversized
)


class FuzzClient:
    """Sends frames to graced over one WebSocket at a time, from a trio loop in a thread.

    :meth:`send` blocks until the daemon replied to the frame or closed the connection,
    and returns the outcome (see the module docstring); it raises AssertionError when the
    daemon did neither within ``timeout`` or broke the connection without a close frame.
    """

    def __init__(self, socket_path: str, public_key: bytes, timeout: float = 10.0) -> None:
        self.socket_path = socket_path
        self.public_key = public_key
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

    def send(self, frame: str | bytes) -> str:
        return trio.from_thread.run(self._send, frame, trio_token=self._token)  # type: ignore[no-any-return]

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
                        if reply.get("ok"):
                            return "reply:ok"
                        return f"reply:{reply['error']['code']}"
        except trio_websocket.ConnectionClosed as exc:
            self._ws = None
            code = exc.reason.code if exc.reason else None
            assert code is not None and code != 1006, f"connection broken: {exc.reason}"
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
