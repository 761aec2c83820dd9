#!/usr/bin/env python3
"""Stream benchmark: signed, journaled events from a real graced vs a plain broadcast.

    python bench/stream.py [--events N] [--quick]

Prints, in one run on loopback (Unix sockets):
  * Ed25519 signing alone: events/s and per-event latency;
  * signed events/s published, journaled and delivered to 1 and to 10 subscribers
    (each subscriber a separate process), and the same for an unsigned trio-websocket
    broadcast server (per-client queue, same framing, no signing, no journal);
  * p50/p99 publish->receive latency at 1,000 events/s to 10 subscribers, for both;
  * the ratios. Targets: p99 < 20 ms at 1,000 events/s to 10 clients; signed
    throughput to 1 client >= 50 % of the like-for-like unsigned baseline (graced's
    framing and batching, no signing, no journal). p50/p99 as in bench/stats.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import trio  # noqa: E402
import trio_websocket  # noqa: E402

from bench.served import wait_serving  # noqa: E402
from bench.stats import machine, p50, p99  # noqa: E402
from graced.protocol import canonical_text, format_ts, parse_ts  # noqa: E402

BIN = Path(sys.executable).parent


# -- subscriber process ------------------------------------------------------------

async def subscriber(sock: str, count: int, kind: str) -> None:
    """Connect, subscribe, print 'ready', receive `count` bench events, print results."""
    latencies: list[float] = []
    first_ts = None
    last_recv = 0.0
    async with trio.open_nursery() as nursery:
        stream = await trio.open_unix_socket(sock)
        ws = await trio_websocket.wrap_client_stream(nursery, stream, "localhost", "/",
                                                     max_message_size=64 << 20)
        req = {"id": 1, "nonce": "bench", "method": "subscribe",
               "params": {"patterns": ["user.bench"], "since": None}}
        await ws.send_message(json.dumps(req))
        got = 0
        ready = False
        while got < count:
            try:
                msg = await ws.get_message()
            except trio_websocket.ConnectionClosed as exc:
                print(json.dumps({"error": f"dropped: {exc}"}), flush=True)
                return
            now = time.time()
            for line in str(msg).split("\n"):
                frame = json.loads(line)
                if frame.get("type") == "response":
                    if not ready:
                        print("ready", flush=True)
                        ready = True
                    continue
                if frame.get("topic") != "user.bench":
                    continue
                ts = parse_ts(frame["ts"])
                if first_ts is None:
                    first_ts = ts
                latencies.append(now - ts)
                got += 1
                last_recv = now
        await ws.aclose()
        nursery.cancel_scope.cancel()
    print(json.dumps({"count": got, "first_ts": first_ts, "last_recv": last_recv,
                      "latencies": latencies}), flush=True)


# -- unsigned baseline server ----------------------------------------------------------

async def baseline_server(sock_path: str, mode: str) -> None:
    """An unsigned trio-websocket broadcast with no journal.

    ``plain``: for each event, ``await ws.send_message`` to each client in turn, one
    message per event. ``coalesced``: graced's own delivery scheme (a bounded queue and
    a sender task per client, queued frames joined into one message), minus signing and
    the journal; the publisher waits when a queue is full instead of dropping.
    """
    clients: dict[Any, trio.MemorySendChannel[str]] = {}

    async def handle(stream: trio.SocketStream) -> None:
        async with trio.open_nursery() as nursery:
            req = await trio_websocket.wrap_server_stream(nursery, stream)
            ws = await req.accept()
            send, recv = trio.open_memory_channel[str](8192)

            async def sender() -> None:
                async for first in recv:
                    frames = [first]
                    while len(frames) < 512:
                        try:
                            frames.append(recv.receive_nowait())
                        except trio.WouldBlock:
                            break
                    await ws.send_message("\n".join(frames))

            if mode == "coalesced":
                nursery.start_soon(sender)
            try:
                while True:
                    msg = json.loads(await ws.get_message())
                    if msg["method"] == "subscribe":
                        clients[ws] = send
                        await ws.send_message(json.dumps(
                            {"type": "response", "id": msg["id"], "ok": True}))
                    elif msg["method"] == "emit":
                        p = msg["params"]
                        nursery.start_soon(emit, p["count"], p.get("rate"), ws, msg["id"])
            except trio_websocket.ConnectionClosed:
                clients.pop(ws, None)
                nursery.cancel_scope.cancel()

    async def emit(count: int, rate: float | None, ws: Any, req_id: int) -> None:
        start = trio.current_time()
        seq = 0
        for i in range(count):
            if rate is not None:
                await trio.sleep_until(start + i / rate)
            elif i % 256 == 0:
                await trio.lowlevel.checkpoint()
            seq += 1
            now = time.time()
            text = canonical_text({"seq": seq, "ts": format_ts(now), "topic": "user.bench",
                                   "payload": {"i": i}})
            for conn, chan in list(clients.items()):
                if conn is ws:
                    continue
                if mode == "plain":
                    await conn.send_message(text)
                else:
                    try:
                        chan.send_nowait(text)  # as graced's fan-out: no yield per frame
                    except trio.WouldBlock:
                        await chan.send(text)
        await ws.send_message(json.dumps({"type": "response", "id": req_id, "ok": True}))

    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(sock_path)
    sock.listen(128)
    print("ready", flush=True)
    await trio.serve_listeners(handle, [trio.SocketListener(sock)])


# -- orchestration ---------------------------------------------------------------------

async def request(sock: str, method: str, params: dict[str, Any]) -> Any:
    async with trio.open_nursery() as nursery:
        stream = await trio.open_unix_socket(sock)
        ws = await trio_websocket.wrap_client_stream(nursery, stream, "localhost", "/")
        await ws.send_message(json.dumps({"id": 7, "nonce": "n", "method": method,
                                          "params": params}))
        while True:
            for line in str(await ws.get_message()).split("\n"):
                frame = json.loads(line)
                if frame.get("type") == "response" and frame.get("id") == 7:
                    await ws.aclose()
                    nursery.cancel_scope.cancel()
                    return frame


def run_round(sock: str, kind: str, subscribers: int, count: int,
              rate: float | None) -> dict[str, float]:
    subs = [subprocess.Popen([sys.executable, __file__, "--subscriber", sock, str(count), kind],
                             stdout=subprocess.PIPE, text=True) for _ in range(subscribers)]
    for p in subs:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    params: dict[str, Any] = {"topic": "user.bench", "count": count, "rate": rate}
    started = time.time()
    trio.run(request, sock, "emit", params)
    results = []
    for p in subs:
        out, _ = p.communicate(timeout=600)
        result = json.loads(out.strip().splitlines()[-1])
        if "error" in result:
            raise SystemExit(f"{kind}: a subscriber was {result['error']}")
        results.append(result)
    lat = [x for r in results for x in r["latencies"]]
    first = min(r["first_ts"] for r in results)
    last = max(r["last_recv"] for r in results)
    return {
        "events_per_s": count / (last - first) if last > first else float("nan"),
        "p50_ms": 1000 * p50(lat),
        "p99_ms": 1000 * p99(lat),
        "wall_s": time.time() - started,
    }


def start_graced(base: Path) -> subprocess.Popen[str]:
    cfg = base / "graced.toml"
    cfg.write_text(f'version = 1\n[daemon]\nstate_dir = "{base}/state"\n'
                   f'socket = "{base}/g.sock"\nheartbeat_interval = 5.0\n'
                   + os.environ.get("BENCH_GRACED_CONFIG", ""))
    proc = subprocess.Popen([str(BIN / "graced"), "run", "--config", str(cfg)],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    wait_serving(proc)
    return proc


def start_baseline(base: Path, mode: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, __file__, "--baseline-server",
                             f"{base}/{mode}.sock", mode],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def bench_signing(n: int) -> dict[str, float]:
    import nacl.signing

    from graced.protocol import GENESIS_PREV, Signer

    signer = Signer(nacl.signing.SigningKey.generate())
    times = []
    prev = GENESIS_PREV
    t0 = time.perf_counter()
    for i in range(n):
        a = time.perf_counter()
        ev = signer.make_event(seq=i + 1, ts=time.time(), topic="user.bench",
                               payload={"i": i}, prev=prev)
        prev = ev.hash
        times.append(time.perf_counter() - a)
    total = time.perf_counter() - t0
    return {"events_per_s": n / total, "p50_ms": 1000 * p50(times),
            "p99_ms": 1000 * p99(times)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--events", type=int, default=30000, help="events per throughput round")
    ap.add_argument("--latency-events", type=int, default=10000,
                    help="events in the 1,000 events/s latency round")
    ap.add_argument("--quick", action="store_true", help="small rounds, for a smoke test")
    args = ap.parse_args()
    if args.quick:
        args.events, args.latency_events = 3000, 1000
    base = Path(tempfile.mkdtemp(prefix="gb", dir="/tmp"))
    kinds = {"signed": "graced (signed, journaled)", "plain": "plain broadcast (unsigned)",
             "coalesced": "graced framing, unsigned"}
    rows: dict[str, dict[str, dict[str, float]]] = {k: {} for k in kinds}
    try:
        sig = bench_signing(20000)
        procs = [start_graced(base), start_baseline(base, "plain"),
                 start_baseline(base, "coalesced")]
        socks = {"signed": f"{base}/g.sock", "plain": f"{base}/plain.sock",
                 "coalesced": f"{base}/coalesced.sock"}
        try:
            for kind, sock in socks.items():
                rows[kind]["1 sub"] = run_round(sock, kind, 1, args.events, None)
                rows[kind]["10 subs"] = run_round(sock, kind, 10, args.events, None)
                rows[kind]["10 subs @1000/s"] = run_round(sock, kind, 10, args.latency_events,
                                                          1000.0)
        finally:
            for p in procs:
                p.terminate()
                p.wait(10)
    finally:
        shutil.rmtree(base, ignore_errors=True)

    print(f"bench/stream.py  (events/round {args.events}, latency round "
          f"{args.latency_events} at 1,000/s; {machine()}; Unix sockets; "
          "subscribers are separate processes)")
    print("(throughput rows: latency of events published as fast as possible, so under "
          "saturation; the '@1000/s' rows: paced latency)")
    print(f"{'':44} {'events/s':>9} {'p50 ms':>8} {'p99 ms':>8}")
    print(f"{'Ed25519 sign + hash alone (per event)':44} {sig['events_per_s']:>9.0f} "
          f"{sig['p50_ms']:>8.3f} {sig['p99_ms']:>8.3f}")
    for kind, label in kinds.items():
        for name, r in rows[kind].items():
            print(f"{label + ', ' + name:44} {r['events_per_s']:>9.0f} {r['p50_ms']:>8.2f} "
                  f"{r['p99_ms']:>8.2f}")

    def ratio(kind: str, name: str, key: str = "events_per_s") -> float:
        return rows["signed"][name][key] / rows[kind][name][key]

    # The target is against the like-for-like baseline: the same framing and batching as
    # graced, without signing or the journal (the plain broadcast is slower, so a ratio
    # against it would flatter graced).
    s1 = ratio("coalesced", "1 sub")
    p99_ms = rows["signed"]["10 subs @1000/s"]["p99_ms"]
    print(f"signed/coalesced throughput, 1 subscriber:  {s1:.2f}  (the cost of signing + "
          f"journaling alone; target >= 0.50: {'PASS' if s1 >= 0.5 else 'FAIL'})")
    print(f"signed/coalesced throughput, 10 subscribers: {ratio('coalesced', '10 subs'):.2f}")
    print(f"signed/plain throughput, 1 subscriber:      {ratio('plain', '1 sub'):.2f}")
    print(f"signed/plain throughput, 10 subscribers:    {ratio('plain', '10 subs'):.2f}")
    print(f"signed/plain p99 at 1,000/s, 10 subscribers: "
          f"{ratio('plain', '10 subs @1000/s', 'p99_ms'):.2f}")
    print(f"signed delivery to 1 subscriber / signing alone: "
          f"{rows['signed']['1 sub']['events_per_s'] / sig['events_per_s']:.2f}")
    print(f"p99 publish->receive at 1,000 events/s, 10 subscribers: {p99_ms:.2f} ms  "
          f"(target < 20 ms: {'PASS' if p99_ms < 20 else 'FAIL'})")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--subscriber":
        trio.run(subscriber, sys.argv[2], int(sys.argv[3]), sys.argv[4])
    elif len(sys.argv) > 1 and sys.argv[1] == "--baseline-server":
        trio.run(baseline_server, sys.argv[2], sys.argv[3])
    else:
        main()
