#!/usr/bin/env python3
"""The browser page under load: 1,000 events/s for a minute through ``gracectl web``.

    python bench/web.py [--rate 1000] [--seconds 60]

Starts a real graced, the real ``gracectl web`` relay and headless Chromium (Debian's,
through Selenium, as the tests do), opens the page and waits until it shows a verified
stream. Then graced publishes ``--rate`` signed events a second (``gracectl emit --rate``)
for ``--seconds``; every second the bench reads what the page verified (its Worker's
count and last seq) and graced's head seq (the journal), and times a round trip to the
page's main thread (a script run there: what a click waits for). Prints the frames the
page verified per second, the lag behind the head seq, the browser's CPU (every Chromium
process, % of one core) and the main thread's responsiveness. Target: the page keeps up
(verified/s ≈ the rate; lag under one second's worth of events) and never fails
verification.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.stats import cores, p50, p99  # noqa: E402
from tests.conftest import Graced  # noqa: E402
from tests.helpers.browser import chromium  # noqa: E402
from tests.test_web_e2e import Relay  # noqa: E402


def head_seq(db: Path) -> int:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return int(conn.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0])


def cpu_seconds(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rate", type=float, default=1000.0)
    ap.add_argument("--seconds", type=float, default=60.0)
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="gw", dir="/tmp"))
    g = Graced(base, heartbeat=1.0)
    g.start()
    relay = Relay(g)
    gd = psutil.Process(g.proc.pid)  # type: ignore[union-attr]
    try:
        with chromium() as b:
            b.driver.get(relay.url)
            b.wait(lambda: b.js("return window.grace.verified > 0 && "
                                "document.getElementById('banner').className") == "banner green",
                   30, "page verified")
            browser = psutil.Process(b.driver.service.process.pid).children(recursive=True)
            relay_proc = psutil.Process(relay.proc.pid)
            db = g.state / "journal.db"
            count = int(args.rate * args.seconds)
            payload = json.dumps({"bench": "web", "note": "x" * 120})
            t0 = time.monotonic()
            c0, g0, r0 = cpu_seconds(browser), cpu_seconds([gd]), cpu_seconds([relay_proc])
            start_seq = head_seq(db)
            g.ctl("emit", "user.bench", "--payload", payload, "--count", str(count),
                  "--rate", str(args.rate), "--no-wait", check=True)
            per_second: list[float] = []
            lags: list[int] = []
            rtts: list[float] = []
            last_verified = b.js("return window.grace.verified")
            last_t = time.monotonic()
            while time.monotonic() - t0 < args.seconds:
                time.sleep(max(0.0, 1.0 - (time.monotonic() - last_t)))  # one sample a second
                head = head_seq(db)
                before = time.monotonic()
                verified, seen, failure = b.js(
                    "const g = window.grace; return [g.verified, g.lastSeq, g.failure]")
                rtts.append((time.monotonic() - before) * 1000)
                now = time.monotonic()
                if failure:
                    raise SystemExit(f"the page failed verification: {failure}")
                per_second.append((verified - last_verified) / (now - last_t))
                lags.append(max(0, head - (seen or 0)))
                last_verified, last_t = verified, now
            wall = time.monotonic() - t0
            c1, g1, r1 = cpu_seconds(browser), cpu_seconds([gd]), cpu_seconds([relay_proc])
            # The tail: how long until the page has verified everything published.
            final = start_seq + count
            caught = time.monotonic()
            b.wait(lambda: (b.js("return window.grace.lastSeq") or 0) >= final, 120,
                   "page caught up")
            behind = time.monotonic() - caught
            verified_total = b.js("return window.grace.verified")
            banner = b.text("banner")
            b.screenshot("bench-web")
    finally:
        relay.close()
        g.stop()
        g.close()
    steady = per_second[2:] or per_second  # the first seconds include the ramp
    print(f"bench/web.py  (graced -> gracectl web -> headless Chromium {len(browser)} processes; "
          f"{args.rate:.0f} events/s for {wall:.0f} s; {cores()} usable cores)")
    print(f"  frames verified by the page: {sum(per_second) / len(per_second):.0f}/s mean, "
          f"{p50(steady):.0f}/s p50, {min(steady):.0f}/s min (after the first 2 s); "
          f"{verified_total} in all")
    print(f"  lag behind graced's head seq (sampled each second): p50 {p50(lags):.0f}, "
          f"p99 {p99(lags):.0f}, max {max(lags)} events "
          f"(= {1000 * p99(lags) / args.rate:.0f} ms at p99); caught up "
          f"{behind:.2f} s after the load ended")
    print(f"  browser CPU: {100 * (c1 - c0) / wall:.1f} % of one core (all Chromium processes)")
    print(f"  page main thread round trip: p50 {p50(rtts):.1f} ms, p99 {p99(rtts):.1f} ms, "
          f"max {max(rtts):.1f} ms")
    print(f"  meanwhile: graced {100 * (g1 - g0) / wall:.1f} %, gracectl web relay "
          f"{100 * (r1 - r0) / wall:.1f} % of one core")
    keeps_up = p50(steady) >= 0.95 * args.rate and p99(lags) <= args.rate
    print(f"  banner at the end: {banner!r}")
    print(f"  keeps up (p50 verified/s >= 95 % of the rate, p99 lag <= 1 s of events): "
          f"{'PASS' if keeps_up else 'FAIL'}")


if __name__ == "__main__":
    main()
