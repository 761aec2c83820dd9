#!/usr/bin/env python3
"""A flood of requests by NATS against one real graced: does a legitimate one get through?

    python bench/fleet_flood.py [--flood 100000]

Starts one nats-server (loopback, JetStream) and one real graced forwarding to it, then
publishes --flood unsigned ``missions.approve`` requests to ``grace-rpc.<daemon-id>`` as
fast as one client can (what anyone allowed to publish there can do), and right after
them sends three ``hello`` requests, one after the other. Prints how long after the
flood each hello was answered, how many requests graced dropped (``status``:
fleet.requests_dropped) and graced's resident memory before and after.
Needs nats-server on PATH (or /usr/sbin) and nats-py (pip install 'grace[fleet]').
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.fleet import _nats_server  # noqa: E402
from bench.stats import cores  # noqa: E402

BIN = Path(sys.executable).parent


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def _flood(url: str, subject: str, count: int) -> list[float]:
    import nats

    nc = await nats.connect(url)
    body = json.dumps({"id": 1, "nonce": "n" * 32, "method": "missions.approve",
                       "params": {"id": 999, "opened": 1.0}}).encode()
    for _ in range(count):
        await nc.publish(subject, body, reply="flood.inbox")
    await nc.flush()
    flooded = time.monotonic()
    answered = []
    for i in range(3):
        hello = json.dumps({"id": 1, "nonce": f"{i:032d}", "method": "hello", "params": {}})
        try:
            await nc.request(subject, hello.encode(), timeout=60)
            answered.append(time.monotonic() - flooded)
        except Exception:  # noqa: BLE001 - not answered within 60 s
            answered.append(float("inf"))
    await nc.close()
    return answered


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--flood", type=int, default=100_000, help="unsigned requests sent")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="grace-flood-") as tmp:
        base = Path(tmp)
        server, url = _nats_server(base)
        cfg = base / "graced.toml"
        cfg.write_text(f'version = 1\ndetector = []\n[daemon]\nstate_dir = "{base}/state"\n'
                       f'socket = "{base}/g.sock"\n[fleet]\nurl = "{url}"\n')
        env = {**os.environ, "GRACE_SOCKET": str(base / "g.sock"), "HOME": str(base / "home"),
               "XDG_CONFIG_HOME": str(base / "home" / ".config")}
        env.pop("GRACE_URL", None)
        daemon = subprocess.Popen([str(BIN / "graced"), "run", "--config", str(cfg)], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            def status() -> dict[str, Any]:
                out = subprocess.run([str(BIN / "gracectl"), "status", "--json"], env=env,
                                     capture_output=True, text=True, check=False)
                return dict(json.loads(out.stdout)) if out.returncode == 0 else {}

            deadline = time.monotonic() + 30
            while not (status().get("fleet") or {}).get("connected"):
                if time.monotonic() > deadline:
                    sys.exit("graced did not connect to NATS")
                time.sleep(0.2)
            daemon_id = status()["daemon_id"]
            before = _rss_mb(daemon.pid)
            answered = asyncio.run(_flood(url, f"grace-rpc.{daemon_id}", args.flood))
            after = _rss_mb(daemon.pid)
            dropped = status()["fleet"]["requests_dropped"]
        finally:
            daemon.terminate()
            daemon.wait(20)
            server.terminate()
            server.wait(20)
    load = os.getloadavg()[0]
    print(f"fleet flood: {args.flood} unsigned requests on grace-rpc.<id>, then 3 hellos "
          f"({cores()} cores, load average {load:.1f})")
    print("hello answered after the flood: " + ", ".join(f"{s:.2f} s" for s in answered))
    print(f"requests graced dropped unanswered: {dropped} of {args.flood} (any more are "
          "dropped by nats-py's subscription limit, uncounted)")
    print(f"graced RSS: {before:.0f} MB before, {after:.0f} MB after (+{after - before:.0f} MB)")


if __name__ == "__main__":
    main()
