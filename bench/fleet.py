#!/usr/bin/env python3
"""Fleet benchmark: many hosts forwarding to one NATS JetStream, one fleet view.

    python bench/fleet.py [--hosts 50] [--rate 1.0] [--seconds 60] [--burst 2000]

The simulated hosts are processes, one per host, each running graced's real forwarding
code (graced/fleet/forwarder.py) on graced's real mesh, journal (SQLite WAL) and
Ed25519 key, so every event is signed, hash-chained and journaled as in graced; only the
detectors, the wire and the executor are left out (the events come from a generator at
the given rate, shaped like mission events: ~300-byte payloads, plus a heartbeat every
5 s). They forward to one nats-server (Debian's 2.9.10, JetStream file store, loopback)
started here; the fleet view is a JetStream ordered consumer on grace.> in this process,
as gracectl fleet tail uses.

Prints:
  * end-to-end latency, an event made on a host -> seen by the fleet view, p50 and p99,
    at --rate events/s per host on every host at once;
  * forwarding throughput per host: --burst events made at once on one host alone, then
    on every host at once (median and slowest host), with the total;
  * JetStream storage: bytes per stored event and per host per day at --rate.
Needs nats-server on PATH (or /usr/sbin) and nats-py (pip install '.[fleet]' in this checkout).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.stats import cores, p50, p99  # noqa: E402

STREAM = "GRACE"


# -- one simulated host (a child process) -------------------------------------------

async def _host(nats_url: str, state: Path) -> None:
    import trio
    import trio.lowlevel

    from graced import keys
    from graced.config.fleet import FleetConfig
    from graced.fleet import Forwarder
    from graced.journal import Journal
    from graced.mesh import Mesh

    signer, _ = keys.load_or_create(state)
    journal = Journal(state / "journal.db", synchronous="normal")
    mesh = Mesh(journal, signer)
    daemon_id = str(uuid.uuid4())

    async def no_answer(text: str, peer: str) -> str:
        return ""

    fwd = Forwarder(FleetConfig(url=nats_url, stream=STREAM), daemon_id=daemon_id, mesh=mesh,
                    journal_path=journal.path, acked=None, answer=no_answer)

    async def drained() -> float:
        """Once a last durable event is journaled, until JetStream acked it."""
        await mesh.publish("daemon.heartbeat", {"interval": 5.0, "uptime": 0})
        await fwd.wait_acked(mesh.delivered_seq)
        return time.time()

    def payload(i: int) -> dict[str, Any]:
        return {"id": i, "detector": "http-api", "kind": "http", "subject": "https://api",
                "severity": "high", "state": "open", "occurrences": i % 7 + 1,
                "summary": "latency 2300 ms above the threshold 500 ms for 3 samples",
                "last_value": 2300.5, "flapping": False, "opened_at": time.time(),
                "playbook": "restart-api", "risk": "medium", "reason": "anomaly"}

    async with trio.open_nursery() as nursery:
        await nursery.start(mesh.run)
        await nursery.start(fwd.run)
        mesh.publish_nowait("daemon.started", {"daemon_id": daemon_id, "host": "sim",
                                               "kid": signer.kid})
        await drained()
        print(json.dumps({"ready": daemon_id}), flush=True)
        while True:
            line = await trio.to_thread.run_sync(sys.stdin.readline)
            if not line:
                break
            cmd, *args = line.split()
            if cmd == "steady":
                rate, seconds = float(args[0]), float(args[1])
                start, n, last_beat = trio.current_time(), 0, -5.0
                while trio.current_time() - start < seconds:
                    now = trio.current_time() - start
                    if now - last_beat >= 5.0:
                        mesh.publish_nowait("daemon.heartbeat", {"interval": 5.0,
                                                                 "uptime": now})
                        last_beat = now
                    mesh.publish_nowait("mission.updated", payload(n))
                    n += 1
                    await trio.sleep_until(start + n / rate)
                await drained()
                print(json.dumps({"steady": n}), flush=True)
            elif cmd == "burst":
                count = int(args[0])
                t0 = time.time()
                for i in range(count):
                    mesh.publish_nowait("mission.updated", payload(i))
                    if i % 512 == 511:
                        await mesh.wait_room()
                        await trio.lowlevel.checkpoint()
                done = await drained()
                print(json.dumps({"burst": count, "seconds": done - t0}), flush=True)
        nursery.cancel_scope.cancel()
    journal.close()


# -- the driver ------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _nats_server(base: Path) -> tuple[subprocess.Popen[bytes], str]:
    binary = shutil.which("nats-server") or "/usr/sbin/nats-server"
    if not os.path.exists(binary):
        sys.exit("bench/fleet.py needs nats-server (apt-get install nats-server)")
    port, monitor = _free_port(), _free_port()
    proc = subprocess.Popen([binary, "-js", "-sd", str(base / "js"), "-a", "127.0.0.1",
                             "-p", str(port), "-m", str(monitor)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{monitor}/healthz", timeout=1) as r:
                if json.loads(r.read()).get("status") == "ok":
                    return proc, f"nats://127.0.0.1:{port}"
        except (OSError, ValueError):
            time.sleep(0.1)
    proc.kill()
    sys.exit("nats-server did not become healthy")


class View:
    """The fleet view: an ordered consumer on grace.> recording each event's latency."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.latencies: dict[int, float] = {}  # stream seq -> seconds from host to view
        self.sizes: dict[int, int] = {}  # stream seq -> bytes of the event
        self.last_seen = 0
        self.nc: Any = None
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        asyncio.run_coroutine_threadsafe(self._run(), self.loop)
        if not self.ready.wait(30):
            sys.exit("the fleet view could not subscribe")

    async def _run(self) -> None:
        import nats
        from nats.js.api import DeliverPolicy

        from graced.protocol import parse_ts

        async def quiet(*_: Any) -> None:
            pass

        nc = self.nc = await nats.connect(self.url, error_cb=quiet, disconnected_cb=quiet,
                                          max_reconnect_attempts=0)
        js = nc.jetstream()
        while True:
            try:
                sub = await js.subscribe("grace.>", stream=STREAM, ordered_consumer=True,
                                         deliver_policy=DeliverPolicy.NEW)
                break
            except Exception:  # noqa: BLE001 - the stream is made by the first host
                await asyncio.sleep(0.2)
        self.ready.set()
        async for msg in sub.messages:
            event = json.loads(msg.data)
            seq = msg.metadata.sequence.stream
            self.latencies[seq] = time.time() - parse_ts(event["ts"])
            self.sizes[seq] = len(msg.data)
            self.last_seen = seq

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.nc.close(), self.loop).result(10)

    def stream_state(self) -> Any:
        import nats

        async def go() -> Any:
            nc = await nats.connect(self.url)
            info = await nc.jetstream().stream_info(STREAM)
            await nc.close()
            return info.state

        return asyncio.run_coroutine_threadsafe(go(), self.loop).result()


def _send(hosts: list[subprocess.Popen[str]], line: str) -> list[dict[str, Any]]:
    for h in hosts:
        assert h.stdin is not None
        h.stdin.write(line + "\n")
        h.stdin.flush()
    out = []
    for h in hosts:
        assert h.stdout is not None
        out.append(json.loads(h.stdout.readline()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hosts", type=int, default=50)
    ap.add_argument("--rate", type=float, default=1.0, help="events/s per host (steady)")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--burst", type=int, default=2000)
    ap.add_argument("--host-worker", nargs=2, metavar=("URL", "STATE"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.host_worker:
        import trio

        state = Path(args.host_worker[1])
        state.mkdir(mode=0o700, parents=True, exist_ok=True)
        trio.run(_host, args.host_worker[0], state)
        return

    base = Path(tempfile.mkdtemp(prefix="gfleet", dir="/tmp"))
    server, url = _nats_server(base)
    hosts: list[subprocess.Popen[str]] = []
    try:
        for i in range(args.hosts):
            hosts.append(subprocess.Popen(
                [sys.executable, __file__, "--host-worker", url, str(base / f"h{i}")],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
        for h in hosts:
            assert h.stdout is not None
            json.loads(h.stdout.readline())
        view = View(url)
        before = view.stream_state()
        print(f"fleet bench: {args.hosts} simulated hosts, each a process running graced's "
              "real forwarder (graced/fleet/forwarder.py) on a real mesh, journal and "
              f"Ed25519 key; one nats-server, JetStream file store, loopback; {cores()} "
              "cores shared by all")
        done = _send(hosts, f"steady {args.rate} {args.seconds}")
        after = view.stream_state()
        deadline = time.monotonic() + 60
        while view.last_seen < after.last_seq and time.monotonic() < deadline:
            time.sleep(0.1)  # the view may trail: every stored event counts, the slow too
        made = sum(d["steady"] for d in done)
        lat = [x * 1000 for seq, x in view.latencies.items()
               if before.last_seq < seq <= after.last_seq]
        print(f"steady: {args.rate:g} events/s per host for {args.seconds:g} s on every host "
              f"({made} events and the heartbeats: {len(lat)} stored, each seen by the "
              f"fleet view): latency host -> fleet view p50 {p50(lat):.1f} ms, p99 "
              f"{p99(lat):.1f} ms; load average {os.getloadavg()[0]:.1f} on {cores()} cores")
        stored = after.messages - before.messages
        per_event = (after.bytes - before.bytes) / max(1, stored)
        sizes = [n for seq, n in view.sizes.items() if before.last_seq < seq <= after.last_seq]
        body = sum(sizes) / max(1, len(sizes))
        per_day = per_event * args.rate * 86400
        print(f"storage: {per_event:.0f} bytes per stored event of {body:.0f} bytes (JetStream "
              f"file store: {per_event - body:.0f} bytes of subject, headers and index); at "
              f"{args.rate:g} events/s a host needs {per_day / 1e6:.1f} MB per day "
              f"({per_day * 30 / 1e9:.2f} GB for 30 days of retention)")
        one = _send(hosts[:1], f"burst {args.burst}")[0]
        alone = one["burst"] / one["seconds"]
        every = _send(hosts, f"burst {args.burst}")
        rates = sorted(d["burst"] / d["seconds"] for d in every)
        total = sum(d["burst"] for d in every) / max(d["seconds"] for d in every)
        print(f"throughput: {args.burst} events made at once, forwarded and acked: one host "
              f"alone {alone:.0f} events/s; all {args.hosts} at once: per host median "
              f"{p50(rates):.0f}, slowest {rates[0]:.0f} events/s, {total:.0f} events/s in all")
        view.close()
    finally:
        for h in hosts:
            if h.stdin is not None:
                h.stdin.close()
        for h in hosts:
            try:
                h.wait(10)
            except subprocess.TimeoutExpired:
                h.kill()
        server.terminate()
        server.wait(10)
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
