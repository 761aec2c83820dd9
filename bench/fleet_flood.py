#!/usr/bin/env python3
"""A flood of requests by NATS against one real graced: does a real approval get through?

    python bench/fleet_flood.py [--flood 100000] [--kind unsigned|forged|both]

Starts one nats-server (loopback, JetStream) and one real graced forwarding to it, with
the operator's key (made here, ``gracectl keys generate``) in its control_keys, and pins
the host's key as an operator does. Then, per kind, one client publishes --flood
``missions.approve`` requests to ``grace-rpc.<daemon-id>`` as fast as it can (what
anyone allowed to publish there can do):

  * none: no flood (the approval's own time, for comparison);
  * unsigned: no ``auth`` at all;
  * forged: an ``auth`` that names the operator's real key id, this daemon and the time
    now, with a fresh nonce each and a well-formed signature that is not the key's (the
    worst case: only the whole signature check tells it from the operator's).

A quarter of the way into the flood, the real gracectl sends ``fleet approve <host> 999
--yes`` (signed by the operator's key; mission 999 does not exist, so the host's signed
answer is "no mission 999", exit 5: the request got through and was checked). Prints how
long that took from the start of the flood and its exit code, how long the flood took
to publish, the requests graced dropped and its resident memory before and after.
Needs nats-server on PATH (or /usr/sbin) and nats-py (pip install '.[fleet]' in this checkout).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import secrets
import subprocess
import sys
import tempfile
import threading
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


def _bodies(kind: str, count: int, daemon_id: str, kid: str) -> list[bytes]:
    """The flood's requests, made before it starts (so making them costs it nothing).
    A forged one carries a well-formed signature (by another key; a random 64 bytes is
    refused by libsodium before the costly part, 4 us instead of 100)."""
    import nacl.signing

    sig = base64.b64encode(nacl.signing.SigningKey.generate().sign(b"x").signature).decode()
    out = []
    for _ in range(count):
        req: dict[str, Any] = {"id": 1, "nonce": secrets.token_hex(16),
                               "method": "missions.approve",
                               "params": {"id": 999, "opened": 1.0}}
        if kind == "forged":
            req["auth"] = {"kid": kid, "ts": time.time(), "daemon": daemon_id,
                           "sig": sig}
        out.append(json.dumps(req).encode())
    return out


async def _flood(url: str, subject: str, bodies: list[bytes], started: threading.Event,
                 quarter: threading.Event) -> float:
    import nats

    nc = await nats.connect(url)
    t0 = time.monotonic()
    started.set()
    for i, body in enumerate(bodies):
        await nc.publish(subject, body, reply="flood.inbox")
        if i == len(bodies) // 4:
            await nc.flush()
            quarter.set()
    await nc.flush()
    quarter.set()  # (no flood at all)
    took = time.monotonic() - t0
    await nc.close()
    return took


def _round(kind: str, count: int, url: str, env: dict[str, str], daemon_id: str,
           kid: str) -> tuple[float, int, str, float]:
    """One flood of ``kind`` with a real approval sent a quarter of the way in: (seconds
    from the flood's start to the approval's answer, its exit code, its stderr, seconds
    the flood took to publish)."""
    bodies = _bodies(kind, count, daemon_id, kid)
    started, quarter = threading.Event(), threading.Event()
    took: list[float] = []
    flooder = threading.Thread(target=lambda: took.append(asyncio.run(_flood(
        url, f"grace-rpc.{daemon_id}", bodies, started, quarter))), daemon=True)
    flooder.start()
    started.wait()
    t0 = time.monotonic()
    quarter.wait()
    res = subprocess.run([str(BIN / "gracectl"), "fleet", "--timeout", "30", "approve",
                          daemon_id, "999", "--yes"], env=env, capture_output=True, text=True,
                         check=False, stdin=subprocess.DEVNULL)
    answered = time.monotonic() - t0
    flooder.join()
    return answered, res.returncode, res.stderr.strip(), took[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--flood", type=int, default=100_000, help="requests per flood")
    ap.add_argument("--kind", choices=("unsigned", "forged", "both"), default="both")
    args = ap.parse_args()
    kinds = ("none", "unsigned", "forged") if args.kind == "both" else ("none", args.kind)
    with tempfile.TemporaryDirectory(prefix="grace-flood-") as tmp:
        base = Path(tmp)
        server, url = _nats_server(base)
        home = base / "home"
        env = {**os.environ, "GRACE_SOCKET": str(base / "g.sock"), "HOME": str(home),
               "XDG_CONFIG_HOME": str(home / ".config"), "GRACE_NATS": url}
        for var in ("GRACE_URL", "GRACE_KNOWN_KEYS", "GRACE_CLIENT_KEY"):
            env.pop(var, None)

        def ctl(*argv: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([str(BIN / "gracectl"), *argv], env=env, text=True,
                                  capture_output=True, check=False, stdin=subprocess.DEVNULL)

        key_line = ctl("keys", "generate").stdout.strip().splitlines()[-1]
        cfg = base / "graced.toml"
        cfg.write_text(f'version = 1\ndetector = []\n[daemon]\nstate_dir = "{base}/state"\n'
                       f'socket = "{base}/g.sock"\n[remediation]\n'
                       f'control_keys = ["{key_line}"]\n[fleet]\nurl = "{url}"\n')
        daemon = subprocess.Popen([str(BIN / "graced"), "run", "--config", str(cfg)], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        rounds = []
        try:
            def status() -> dict[str, Any]:
                out = ctl("status", "--json")
                return dict(json.loads(out.stdout)) if out.returncode == 0 else {}

            deadline = time.monotonic() + 30
            while not (status().get("fleet") or {}).get("connected"):
                if time.monotonic() > deadline:
                    sys.exit("graced did not connect to NATS")
                time.sleep(0.2)
            daemon_id = status()["daemon_id"]
            if ctl("keys", "trust").returncode != 0:
                sys.exit("could not pin the host's key")
            kid = key_line.split()[-1]
            before = _rss_mb(daemon.pid)
            for kind in kinds:
                dropped = status()["fleet"]["requests_dropped"]
                answered, rc, err, took = _round(kind, 0 if kind == "none" else args.flood,
                                                 url, env, daemon_id, kid)
                rounds.append((kind, answered, rc, err, took,
                               status()["fleet"]["requests_dropped"] - dropped))
            after = _rss_mb(daemon.pid)
        finally:
            daemon.terminate()
            daemon.wait(20)
            server.terminate()
            server.wait(20)
    load = os.getloadavg()[0]
    print(f"fleet flood: {args.flood} requests on grace-rpc.<id> per kind, a real fleet "
          f"approve sent a quarter of the way in ({cores()} cores, load average {load:.1f})")
    for kind, answered, rc, err, took, dropped in rounds:
        what = "answered (exit 5: no mission 999)" if rc == 5 else f"exit {rc}: {err[:120]}"
        if kind == "none":
            print(f"no flood: the approval {what} in {answered:.2f} s (gracectl's start, "
                  "finding the host in the stream, two signed requests)")
            continue
        print(f"{kind}: flood published in {took:.2f} s; the approval {what} "
              f"{answered:.2f} s after the flood began; graced dropped {dropped} of "
              f"{args.flood} unanswered")
    print(f"graced RSS: {before:.0f} MB before, {after:.0f} MB after (+{after - before:.0f} MB)")


if __name__ == "__main__":
    main()
