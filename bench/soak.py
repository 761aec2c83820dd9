#!/usr/bin/env python3
"""Soak: graced under steady load for a long time, with clients coming and going.

    python bench/soak.py [--minutes 30] [--rate 500] [--clients 20]

graced (embedded default detectors, its own state dir) publishes --rate events/s for
--minutes (``gracectl emit --rate``). --clients subscribers (separate processes, 10
clients each) connect, read for 5 to 30 s, disconnect and reconnect with ``since`` =
the next seq they expect, for the whole run; each checks that it sees every seq exactly
once, in order, across its reconnects. Every 10 s the script samples graced's RSS and
open file descriptors.

Prints, per 5-minute window: p50/p99 delivery latency (event ts to receipt), RSS, fds.
Then: RSS growth from the end of warm-up (5 min: the replay ring fills) to the end
(target < 5 %), fd spread after warm-up (target: flat), seq gaps and duplicates over
all clients (target 0), and the p99 spread across windows (stable).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.served import wait_serving  # noqa: E402
from bench.stats import cores, p50, p99  # noqa: E402

BIN = Path(sys.executable).parent


def client_main(sock: str, clients: int, seconds: float, first_seq: int) -> None:
    """Run ``clients`` reconnecting subscribers; print one JSON summary at the end."""
    import trio

    from gracectl.client import Endpoint, connect
    from gracectl.errors import CtlError
    from graced.protocol import parse_ts

    endpoint = Endpoint(socket=sock)
    results: list[dict[str, Any]] = []

    async def one(idx: int) -> None:
        rng = random.Random(idx)
        next_seq = first_seq
        gaps = dups = received = reconnects = errors = 0
        lat: list[tuple[float, float]] = []  # (receive time, latency) of user.soak events
        end = trio.current_time() + seconds
        while trio.current_time() < end:
            stay = min(rng.uniform(5, 30), end - trio.current_time())
            try:
                async with connect(endpoint) as conn:
                    await conn.request("subscribe", {"patterns": ["*"], "since": next_seq})
                    with trio.move_on_after(stay):
                        while True:
                            try:
                                _, ev = await conn.events.receive()
                            except trio.EndOfChannel:
                                errors += 1
                                break
                            seq = ev.get("seq")
                            if not isinstance(seq, int):
                                continue
                            if seq < next_seq:
                                dups += 1
                                continue
                            if seq > next_seq:
                                gaps += seq - next_seq
                            next_seq = seq + 1
                            received += 1
                            if ev.get("topic") == "user.soak" and received % 10 == 0:
                                now = time.time()
                                lat.append((now, now - parse_ts(ev["ts"])))
            except CtlError:
                errors += 1
                await trio.sleep(0.5)
            reconnects += 1
        results.append({"client": idx, "received": received, "gaps": gaps, "dups": dups,
                        "reconnects": reconnects, "errors": errors, "last_seq": next_seq - 1,
                        "lat": lat})

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for i in range(clients):
                nursery.start_soon(one, i)

    trio.run(main)
    print(json.dumps(results))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--rate", type=float, default=500.0)
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--client-proc", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.client_proc:
        sock, n, secs, first = args.client_proc
        client_main(sock, int(n), float(secs), int(first))
        return
    import tomllib

    import tomli_w

    base = Path(tempfile.mkdtemp(prefix="gs", dir="/tmp"))
    sock = f"{base}/g.sock"
    default = tomllib.loads(subprocess.run([str(BIN / "graced"), "config", "default"],
                                           check=True, capture_output=True, text=True).stdout)
    default.setdefault("daemon", {}).update(state_dir=f"{base}/state", socket=sock)
    (base / "graced.toml").write_text(tomli_w.dumps(default))
    daemon = subprocess.Popen([str(BIN / "graced"), "run", "--config", str(base / "graced.toml")],
                              stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    wait_serving(daemon)
    env = dict(os.environ, GRACE_SOCKET=sock, HOME=str(base))
    seconds = args.minutes * 60
    count = int(args.rate * seconds)
    status = json.loads(subprocess.run([str(BIN / "gracectl"), "status", "--json"], env=env,
                                       check=True, capture_output=True, text=True).stdout)
    first = int(status["head_seq"]) + 1
    procs = []
    per = 10
    for start in range(0, args.clients, per):
        n = min(per, args.clients - start)
        procs.append(subprocess.Popen([sys.executable, __file__, "--client-proc", sock, str(n),
                                       str(seconds), str(first)], stdout=subprocess.PIPE,
                                      text=True))
    subprocess.run([str(BIN / "gracectl"), "emit", "user.soak", "--count", str(count),
                    "--rate", str(args.rate), "--no-wait"], env=env, check=True,
                   capture_output=True)
    gd = psutil.Process(daemon.pid)
    samples: list[tuple[float, float, int]] = []
    t0 = time.time()
    while time.time() - t0 < seconds:
        samples.append((time.time(), gd.memory_info().rss / 2**20, gd.num_fds()))
        time.sleep(10)  # RSS and descriptors are sampled every 10 s (a cadence, not a wait)
    results = []
    for p in procs:
        out, _ = p.communicate(timeout=120)
        results += json.loads(out)
    final = json.loads(subprocess.run([str(BIN / "gracectl"), "status", "--json"], env=env,
                                      check=True, capture_output=True, text=True).stdout)
    daemon.terminate()
    daemon.wait(30)
    subprocess.run(["rm", "-rf", str(base)], check=False)

    print(f"bench/soak.py  ({args.minutes:g} min at {args.rate:g} events/s, {len(results)} "
          f"reconnecting clients in {len(procs)} processes; {cores()} cores; Unix socket)")
    window = 300.0
    lat = [pt for r in results for pt in r["lat"]]
    print(f"  {'window':>9}  {'p50 ms':>7}  {'p99 ms':>7}  {'RSS MB':>7}  {'fds':>4}")
    p99s = []
    n_windows = max(1, int(seconds // window))
    for w in range(n_windows):
        lo, hi = t0 + w * window, t0 + (w + 1) * window
        ls = [x for t, x in lat if lo <= t < hi]
        ss = [s for s in samples if lo <= s[0] < hi]
        if not ls or not ss:
            continue
        median, worst = p50(ls) * 1000, p99(ls) * 1000
        p99s.append(worst)
        print(f"  {w * 5:>3}-{(w + 1) * 5:<3}min  {median:7.2f}  {worst:7.2f}  {ss[-1][1]:7.1f}  "
              f"{ss[-1][2]:4d}")
    # Warm-up: the ring of 65,536 recent events fills in 131 s at 500/s.
    warm = [s for s in samples if s[0] >= t0 + min(300, seconds / 4)]
    rss0, rss1 = warm[0][1], warm[-1][1]
    fds = [s[2] for s in warm]
    growth = 100 * (rss1 - rss0) / rss0
    gaps = sum(r["gaps"] for r in results)
    dups = sum(r["dups"] for r in results)
    recon = sum(r["reconnects"] for r in results)
    received = sum(r["received"] for r in results)
    print(f"  events published {count:,}; head seq {final['head_seq']:,}; delivered "
          f"{received:,} across {recon} connections; client errors "
          f"{sum(r['errors'] for r in results)}; slow clients dropped "
          f"{final['wire']['dropped_total']}")
    print(f"  RSS after warm-up {rss0:.1f} MB -> end {rss1:.1f} MB: growth {growth:+.1f} % "
          f"(target < 5 %): {'PASS' if growth < 5 else 'FAIL'}")
    print(f"  fds after warm-up: min {min(fds)} max {max(fds)} (flat: "
          f"{'PASS' if max(fds) - min(fds) <= args.clients + 4 else 'FAIL'}; clients come "
          "and go)")
    print(f"  seq gaps {gaps}, duplicates {dups} (target 0): "
          f"{'PASS' if gaps == 0 and dups == 0 else 'FAIL'}")
    if p99s:
        print(f"  p99 per window: min {min(p99s):.2f} ms, max {max(p99s):.2f} ms, median "
              f"{statistics.median(p99s):.2f} ms")


if __name__ == "__main__":
    main()
