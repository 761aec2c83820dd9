"""A hostile graced impostor on a Unix socket, for testing what gracectl accepts.

    python -m tests.helpers.fake_daemon SOCKET KEYFILE MODE

It speaks the wire protocol (WebSocket over the socket) and holds the *trusted* key
(KEYFILE: a base64 Ed25519 seed), so it can also sign what it sends: what is tested is
everything a verifier must refuse besides a plain wrong key. Prints ``ready`` once
listening. Modes:

- ``unsigned-event`` / ``forged-event``: after ``subscribe``, a ``mission.resolved``
  event for mission 1 that is unsigned / signed by another key;
- ``unsigned-response`` / ``forged-response``: every answer but ``hello`` unsigned /
  signed by another key (``missions.approve`` answers "approved, FORGED");
- ``bad-sig-event`` / ``altered-event``: after ``subscribe``, a ``mission.resolved``
  event for mission 1 under the trusted key id whose signature is wrong (one bit
  flipped) / whose payload was changed after signing (its reason says FORGED);
- ``bad-sig-response`` / ``altered-response``: every answer but ``hello`` under the
  trusted key id, its signature wrong (one bit flipped) / its result changed after
  signing (a mission's reason, or the host, says FORGED): only the signature check
  itself can catch these, not the key-id check;
- ``error-object`` / ``error-long``: every answer but ``hello`` a signed error whose
  code is a list and message an object of 1000 escape sequences / whose message is an
  escape sequence and 100,000 characters;
- ``deep``: answers with a 100,000-deep JSON value;
- ``dup-id``: answers each request twice, both signed;
- ``list-id``: answers with an id that is a list;
- ``forged-stopping``: after ``subscribe``, a signed heartbeat (seq 101), then a
  ``daemon.stopping`` (seq 102) under the trusted key id whose signature is wrong, and
  the connection closed, as a daemon that stops would;
- ``flood``: after ``subscribe``, a million junk frames;
- ``signed-flood``: after ``subscribe``, 30,000 validly signed unrelated events, then
  nothing (a client waiting for something else must stay bounded).
- ``bad-time-*``: validly signed answers whose time fields hold no time: ``-string``
  ("not-a-time"), ``-huge`` (1e308), ``-bool`` (true), ``-leap`` (a leap second),
  ``-year0`` (year 0), ``-list`` ([1, 2]).
- ``empty-status`` / ``odd-status``: a validly signed ``status`` answer that is ``{}`` /
  that holds every key but one of the wrong type (``uptime`` a word).
- ``status-*`` (:data:`BAD_STATUS`): a validly signed, well-formed ``status`` answer
  with one field set to what is named (``status-fine``: none).

Raw modes: the WebSocket handshake done by hand, then frames written byte by byte as
a hostile peer would (no library in the way); ``hello`` is never answered, so the
client must be given the key:

- ``silent``: reads every request, answers none;
- ``drip``: answers each request with a frame announcing 1000 bytes, then one byte
  every 0.2 s;
- ``ping-flood``: a ping every 10 ms, for ever, never an answer;
- ``deaf-ping-flood``: 125-byte pings, a hundred per write, for ever, and nothing read
  after the handshake (the client's pongs fill its socket);
- ``fragments``: a text frame without FIN, then empty continuation frames for ever;
- ``unsubscribed-events``: validly signed events, for ever, on a connection that never
  subscribed, never the answer.
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
import sys
import time
from typing import Any

import nacl.signing
import trio
import trio_websocket

from graced.protocol import GENESIS_PREV, Signer, canonical_text, format_ts


def _signed(signer: Signer, frame: dict[str, Any]) -> str:
    return canonical_text(signer.sign_frame(frame))


def _flip(sig: str) -> str:
    """The same signature with one bit of its first byte flipped (still well formed)."""
    raw = bytearray(base64.b64decode(sig))
    raw[0] ^= 1
    return base64.b64encode(bytes(raw)).decode()


def _altered(result: Any) -> Any:
    """``result`` with what a user reads changed: a mission's reason, else the host."""
    if isinstance(result, dict) and isinstance(result.get("mission"), dict):
        return {**result, "mission": {**result["mission"], "reason": "FORGED"}}
    if isinstance(result, dict):
        return {**result, "host": "FORGED"}
    return result


class Fake:
    def __init__(self, key: Signer, mode: str) -> None:
        self.key = key
        self.other = Signer(nacl.signing.SigningKey.generate())
        self.mode = mode
        self.seq = 100

    def answer(self, req: dict[str, Any], result: Any) -> list[str]:
        frame = {"type": "response", "id": req["id"], "nonce": req["nonce"], "ok": True,
                 "result": result, "ts": format_ts(time.time())}
        mode = self.mode
        if req["method"] == "hello":
            return [_signed(self.key, frame)]
        if mode == "unsigned-response":
            return [canonical_text(frame)]
        if mode == "forged-response":
            return [_signed(self.other, frame)]
        if mode == "bad-sig-response":
            signed = self.key.sign_frame(frame)
            return [canonical_text({**signed, "sig": _flip(signed["sig"])})]
        if mode == "altered-response":
            signed = self.key.sign_frame(frame)
            return [canonical_text({**signed, "result": _altered(result)})]
        if mode == "deep":
            frame["result"] = {"x": 1}
            text = _signed(self.key, frame)
            return [text.replace('{"x":1}', "[" * 100_000 + "]" * 100_000)]
        if mode in ("error-object", "error-long"):
            del frame["result"]
            frame["ok"] = False
            frame["error"] = ({"code": ["x"], "message": {"a": "\x1b[31m" * 1000}}
                              if mode == "error-object" else
                              {"code": "invalid", "message": "\x1b[2J" + "x" * 100_000})
            return [_signed(self.key, frame)]
        if mode == "dup-id":
            return [_signed(self.key, frame), _signed(self.key, frame)]
        if mode == "list-id":
            frame["id"] = [req["id"]]
            return [_signed(self.key, frame)]
        return [_signed(self.key, frame)]

    def result(self, method: str, params: dict[str, Any]) -> Any:
        mission = {"id": 1, "state": "awaiting_approval", "reason": "", "severity": "high",
                   "summary": "s", "detector": "d", "subject": "x", "opened_at": 1.0}
        if method == "hello":
            return {"daemon_id": "fake", "version": "0", "host": "fake", "pid": 1,
                    "kid": self.key.kid,
                    "public_key": base64.b64encode(self.key.public_key).decode(),
                    "head_seq": self.seq, "heartbeat_interval": 5.0, "peer": {},
                    "can_control": True}
        if self.mode.startswith("bad-time-"):
            when = {"string": "not-a-time", "huge": 1e308, "bool": True,
                    "leap": "2026-12-31T23:59:60.000000Z",
                    "year0": "0000-01-01T00:00:00.000000Z", "list": [1, 2]}[self.mode[9:]]
            mission = {**mission, "opened_at": when}
            if method == "missions.list":
                return {"missions": [mission], "now": 1.0}
            if method == "missions.get":
                return {"mission": mission}
            return {"daemon_id": "fake", "version": "0", "host": "fake", "pid": 1,
                    "uptime": 1, "kid": self.key.kid, "head_seq": self.seq,
                    "started_at": when}
        if method == "status" and self.mode == "empty-status":
            return {}
        if method == "status" and self.mode == "odd-status":
            # Every key a status answer holds, one of them not what it should be.
            return {**self.status(), "uptime": "long"}
        if method == "status" and self.mode in BAD_STATUS:
            st = self.status()
            for path, value in BAD_STATUS[self.mode].items():
                *parts, last = path.split(".")
                place = st
                for part in parts:
                    place = place.setdefault(part, {})
                place[last] = value() if callable(value) else value
            return st
        if method == "missions.approve":
            return {"mission": {**mission, "state": "approved", "reason": "FORGED"}}
        if method == "missions.get":
            return {"mission": mission}
        if method == "subscribe":
            return {"head_seq": self.seq}
        return {"daemon_id": "fake", "version": "0", "host": "fake", "pid": 1, "uptime": 1,
                "kid": self.key.kid, "head_seq": self.seq}

    def status(self) -> dict[str, Any]:
        """A status answer with every key graced's holds, each of the right kind."""
        return {"daemon_id": "fake", "version": "0", "host": "fake", "pid": 1,
                "uptime": 1, "kid": self.key.kid, "head_seq": self.seq,
                "config": "-", "state_dir": "/x", "missions": {}, "degraded": [],
                "failing_detectors": {}, "detectors_total": 0,
                "executor": {"paused": False, "mode": "auto", "actions_last_hour": 0,
                             "max_actions_per_hour": 20},
                "journal": {"size_bytes": 0, "commit_latency_ms": 0, "commit_errors": 0,
                            "last_error": None},
                "wire": {"clients": 1, "subscribers": 0, "dropped_total": 0,
                         "refused_total": 0, "socket": "/x", "tcp_ports": []}}

    def event(self, signer: Signer | None, topic: str, payload: Any) -> str:
        self.seq += 1
        ev = (signer or self.key).make_event(seq=self.seq, ts=time.time(), topic=topic,
                                             payload=payload, prev=GENESIS_PREV)
        if signer is None and self.mode == "unsigned-event":
            fields = dict(ev.fields)
            del fields["sig"]
            return canonical_text(fields)
        return ev.text

    async def after_subscribe(self, ws: trio_websocket.WebSocketConnection) -> None:
        mode = self.mode
        if mode == "unsigned-event":
            await ws.send_message(self.event(None, "mission.resolved",
                                             {"id": 1, "state": "resolved", "reason": "FORGED"}))
        elif mode == "forged-event":
            await ws.send_message(self.event(self.other, "mission.resolved",
                                             {"id": 1, "state": "resolved", "reason": "FORGED"}))
        elif mode in ("bad-sig-event", "altered-event"):
            self.seq += 1
            ev = self.key.make_event(seq=self.seq, ts=time.time(), topic="mission.resolved",
                                     payload={"id": 1, "state": "resolved", "reason": ""},
                                     prev=GENESIS_PREV)
            fields = dict(ev.fields)
            if mode == "bad-sig-event":
                fields["sig"] = _flip(fields["sig"])
            else:
                fields["payload"] = {**fields["payload"], "reason": "FORGED"}
            await ws.send_message(canonical_text(fields))
        elif mode == "forged-stopping":
            beat = self.key.make_event(seq=101, ts=time.time(), topic="daemon.heartbeat",
                                       payload={"interval": 5.0}, prev=GENESIS_PREV)
            stop = self.key.make_event(seq=102, ts=time.time(), topic="daemon.stopping",
                                       payload={}, prev=beat.hash)
            await ws.send_message(beat.text)
            await ws.send_message(canonical_text({**stop.fields,
                                                  "sig": _flip(stop.fields["sig"])}))
            await ws.aclose(1001, "stopping")
        elif mode == "flood":
            junk = "\n".join(['{"junk":' + str(i) + "}" for i in range(10_000)])
            for _ in range(100):
                await ws.send_message(junk)
        elif mode == "signed-flood":
            batch: list[str] = []
            for _ in range(30_000):
                batch.append(self.event(None, "user.flood", {"pad": "x" * 100}))
                if len(batch) == 500:
                    await ws.send_message("\n".join(batch))
                    batch = []

    async def serve(self, stream: trio.SocketStream) -> None:
        async with trio.open_nursery() as nursery:
            try:
                request = await trio_websocket.wrap_server_stream(nursery, stream)
                ws_conn = await request.accept()
                while True:
                    req = json.loads(await ws_conn.get_message())
                    result = self.result(req["method"], req.get("params") or {})
                    await ws_conn.send_message("\n".join(self.answer(req, result)))
                    if req["method"] == "subscribe":
                        await self.after_subscribe(ws_conn)
            except (trio_websocket.ConnectionClosed, trio.BrokenResourceError,
                    trio.ClosedResourceError):
                pass
            nursery.cancel_scope.cancel()


BAD_STATUS: dict[str, dict[str, Any]] = {
    # mode -> {dotted field: value (or what makes it)} set in a well-formed status answer
    "status-fine": {},
    "status-paused-word": {"executor.paused": "false"},
    "status-pid-list": {"pid": [1, 2]},
    "status-head-word": {"head_seq": "many"},
    "status-degraded-object": {"degraded": {"journal": 1}},
    "status-degraded-word": {"degraded": "false"},
    "status-huge-rate": {"learning": lambda: {"strategy": "x", "patterns": 1, "outcomes": 1,
                                              "success_rate_7d": "A" * (15 << 20),
                                              "consulted_share": 0.5}},
    "status-future-failing": {"journal.failing_since": lambda: time.time() + 30 * 86400,
                              "journal.pending": 1},
    "status-huge-max-age": {"journal.retention": {"max_size": 1, "max_age": 1e300}},
}


RAW_MODES = ("silent", "drip", "ping-flood", "deaf-ping-flood", "fragments",
             "unsubscribed-events")
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def _frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """An unmasked server frame."""
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | opcode])
    if n < 126:
        head += bytes([n])
    elif n < 65536:
        head += bytes([126]) + struct.pack("!H", n)
    else:
        head += bytes([127]) + struct.pack("!Q", n)
    return head + payload


async def serve_raw(fake: Fake, stream: trio.SocketStream) -> None:
    """A raw mode's connection: the handshake by hand, then what the mode sends."""
    head = b""
    try:
        while b"\r\n\r\n" not in head:
            chunk = await stream.receive_some(4096)
            if not chunk:
                return
            head += chunk
        key = next(line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")
                   if line.lower().startswith(b"sec-websocket-key:"))
        accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
        await stream.send_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                              b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept
                              + b"\r\n\r\n")
        async with trio.open_nursery() as nursery:
            # Requests are read and ignored; the client leaving ends the connection.
            if fake.mode != "deaf-ping-flood":
                nursery.start_soon(_drain, stream, nursery.cancel_scope)
            nursery.start_soon(_send_mode, fake, stream, nursery.cancel_scope)
    except (trio.BrokenResourceError, trio.ClosedResourceError, StopIteration):
        pass


async def _send_mode(fake: Fake, stream: trio.SocketStream, scope: trio.CancelScope) -> None:
    mode = fake.mode
    try:
        if mode == "drip":
            await stream.send_all(bytes([0x81, 126]) + struct.pack("!H", 1000))
            while True:
                await trio.sleep(0.2)
                await stream.send_all(b" ")
        elif mode == "ping-flood":
            while True:
                await stream.send_all(_frame(0x9, b"p"))
                await trio.sleep(0.01)
        elif mode == "deaf-ping-flood":
            pings = _frame(0x9, b"p" * 125) * 100
            while True:
                await stream.send_all(pings)
        elif mode == "fragments":
            await stream.send_all(_frame(0x1, b"{", fin=False))
            empty = _frame(0x0, b"", fin=False) * 512
            while True:
                await stream.send_all(empty)
        elif mode == "unsubscribed-events":
            while True:
                batch = "\n".join(fake.event(None, "user.flood", {"pad": "x" * 100})
                                  for _ in range(200))
                await stream.send_all(_frame(0x1, batch.encode()))
        else:  # silent
            await trio.sleep_forever()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        scope.cancel()


async def _drain(stream: trio.SocketStream, scope: trio.CancelScope) -> None:
    try:
        while await stream.receive_some(65536):
            pass
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    scope.cancel()


async def main(path: str, seed: bytes, mode: str) -> None:
    fake = Fake(Signer(nacl.signing.SigningKey(seed)), mode)
    listeners = [trio.SocketListener(await _bind(path))]
    print("ready", flush=True)

    async def serve(stream: trio.SocketStream) -> None:
        await (serve_raw(fake, stream) if mode in RAW_MODES else fake.serve(stream))

    await trio.serve_listeners(serve, listeners)


async def _bind(path: str) -> trio.socket.SocketType:
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(path)
    sock.listen(16)
    return sock


if __name__ == "__main__":
    with open(sys.argv[2]) as f:
        key_seed = base64.b64decode(f.read().strip())
    trio.run(main, sys.argv[1], key_seed, sys.argv[3])
