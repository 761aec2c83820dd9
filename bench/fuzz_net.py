"""The TCP, TLS and authentication part of bench/fuzz.py (see its --net).

Against a graced serving wss:// with a self-signed certificate and one read key and one
control key: unsigned requests to every method, signed requests with every way a
signature can be wrong (unknown key, bad signature, wrong daemon, stale or future
timestamp, replayed nonce, malformed auth, read key for a control method), and raw
abuse of the TLS port (garbage before the handshake, plaintext HTTP, a TLS handshake
cut short, idle connections). Each request must be refused with its own error code; no
refusal may be journaled; graced must keep answering.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import socket
import ssl
import time
from typing import Any

import trio
import trio_websocket

from graced.protocol import Signer
from graced.protocol.wire import request_signing_bytes

METHODS = ["status", "subscribe", "keys", "missions.list", "missions.get", "detectors",
           "knowledge.list", "knowledge.stats", "missions.approve", "missions.reject",
           "pause", "resume", "emit", "knowledge.import", "reload", "no.such.method"]
CONTROL = {"missions.approve", "missions.reject", "pause", "resume", "emit",
           "knowledge.import", "reload"}
KINDS = ["unsigned", "unknown_key", "bad_sig", "wrong_daemon", "stale", "future",
         "replayed", "bad_kid", "read_for_control", "huge_field"]


def case(kind: str, rng: random.Random, keys: dict[str, Signer], daemon: str,
         used: list[dict[str, Any]]) -> tuple[dict[str, Any], set[str]]:
    """One request of ``kind`` and the error codes allowed for it."""
    method = rng.choice([m for m in METHODS if m != "no.such.method"])
    params: dict[str, Any] = {"id": rng.randrange(1, 5), "comment": "x" * rng.randrange(50)}
    req: dict[str, Any] = {"id": rng.randrange(1 << 30), "nonce": secrets.token_hex(8),
                           "method": method, "params": params}
    if kind == "unsigned":
        return req, {"not_authorised"}
    if kind == "replayed" and used:
        return dict(used[rng.randrange(len(used))]), {"not_authorised"}
    signer = keys["control"]
    ts, dmn = time.time(), daemon
    if kind == "unknown_key":
        signer = keys["stranger"]
    elif kind == "wrong_daemon":
        dmn = "another-daemon"
    elif kind == "stale":
        ts -= 3600
    elif kind == "future":
        ts += 3600
    elif kind == "read_for_control":
        signer = keys["read"]
        req["method"] = method = rng.choice(sorted(CONTROL - {"reload"}))
    data = request_signing_bytes(req["id"], req["nonce"], method, params, ts, signer.kid, dmn)
    sig = signer.sign_bytes(data)
    if kind == "bad_sig":
        sig = keys["stranger"].sign_bytes(data)
    req["auth"] = {"kid": signer.kid, "ts": ts, "daemon": dmn, "sig": sig}
    if kind == "bad_kid":
        req["auth"]["kid"] = rng.choice(["", "XYZ", "0" * 17, "g" * 16, "x" * 60_000])
        return req, {"bad_request"}
    if kind == "huge_field":
        req["auth"]["daemon"] = "d" * 60_000
        return req, {"bad_request"}
    if kind == "replayed":  # first use of a good request: remembered, replayed later
        used.append(dict(req))
        return req, {"ok", "not_authorised", "not_found", "invalid", "bad_request",
                     "plan_changed", "unknown_method"}
    return req, {"not_authorised"}


async def run_requests(host: str, port: int, cafile: str, n: int, seed: int,
                       keys: dict[str, Signer], daemon: str) -> tuple[dict[str, int],
                                                                     list[str]]:
    rng = random.Random(seed)
    outcomes: dict[str, int] = {}
    failures: list[str] = []
    used: list[dict[str, Any]] = []
    ctx = ssl.create_default_context(cafile=cafile)
    per_conn = 100
    done = 0
    while done < n:
        tcp = await trio.open_tcp_stream(host, port)
        tls = trio.SSLStream(tcp, ctx, server_hostname=host, https_compatible=True)
        async with trio.open_nursery() as nursery:
            ws = await trio_websocket.wrap_client_stream(nursery, tls, f"{host}:{port}", "/",
                                                         max_message_size=1 << 24)
            try:
                for _ in range(min(per_conn, n - done)):
                    kind = rng.choice(KINDS)
                    req, allowed = case(kind, rng, keys, daemon, used)
                    await ws.send_message(json.dumps(req))
                    with trio.fail_after(10):
                        while True:
                            frame = json.loads(str(await ws.get_message()).split("\n")[0])
                            if frame.get("type") == "response":
                                break
                    done += 1
                    code = "ok" if frame.get("ok") else frame["error"]["code"]
                    key = f"{kind}:{code}"
                    outcomes[key] = outcomes.get(key, 0) + 1
                    if code not in allowed:
                        failures.append(f"{kind} {req['method']}: {code} "
                                        f"{frame.get('error', {}).get('message', '')[:120]}")
                await ws.aclose()
            except trio_websocket.ConnectionClosed as exc:
                # A connection that has not proved a key may send 4 requests: the 5th
                # closes it (1008). That request was not served: not replayable either.
                done += 1
                reason = exc.reason
                key = f"{kind}:closed {reason.code}"
                outcomes[key] = outcomes.get(key, 0) + 1
                if used and used[-1]["nonce"] == req["nonce"]:
                    used.pop()
                if reason.code != 1008 or "before one signed" not in (reason.reason or ""):
                    failures.append(f"{kind} {req['method']}: closed {reason.code} "
                                    f"{reason.reason}")
            nursery.cancel_scope.cancel()
    return outcomes, failures


def raw_tls_abuse(host: str, port: int, rng: random.Random) -> str:
    """One abuse of the TLS port; returns what it was."""
    s = socket.create_connection((host, port), timeout=5)
    kind = rng.choice(["garbage", "plaintext_http", "cut_handshake", "connect_close"])
    try:
        if kind == "garbage":
            s.sendall(os.urandom(rng.randrange(1, 2048)))
        elif kind == "plaintext_http":
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n")
        elif kind == "cut_handshake":
            s.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(40))
    except OSError:
        pass
    s.close()
    return kind


def self_signed(where: str) -> tuple[str, str]:
    import subprocess

    cert, key = os.path.join(where, "cert.pem"), os.path.join(where, "cert.key")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "2", "-subj", "/CN=localhost", "-addext",
                    "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True, stdin=subprocess.DEVNULL)
    return cert, key
