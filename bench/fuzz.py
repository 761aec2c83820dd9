#!/usr/bin/env python3
"""Wire fuzzing at volume: hypothesis-generated malformed frames against a live graced.

    python bench/fuzz.py [--cases 50000] [--raw 2000] [--net 5000] [--net-raw 1000] [--seed N]

Sends --cases frames (bad JSON, wrong types, huge numbers, deep nesting, invalid UTF-8 in
binary and in raw text frames, oversized frames, unknown methods, random params to every
method but emit; see tests/helpers/fuzz.py) and --raw raw-socket abuses (half-open
handshakes, garbage before the handshake, abrupt disconnects mid-frame). Every frame must
have an outcome its case allows (a signed reply with the request's id and nonce, or the
close its case calls for); a verifying ``gracectl tail --verify`` bystander must see
the stream whole throughout; graced must still answer, with its descriptors back at
their baseline. Then --net requests over TCP with TLS to a second graced serving wss://
(unsigned, and signed every wrong way: bench/fuzz_net.py) and --net-raw abuses of its TLS
port: each must be refused with its own code, none journaled. Prints the outcome counts
and PASS/FAIL.
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import sys
import tempfile
import time
from pathlib import Path

import psutil
from hypothesis import HealthCheck, given, seed, settings

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from graced.keys import parse_public_key  # noqa: E402
from tests.conftest import Graced  # noqa: E402
from tests.helpers.fuzz import FuzzClient, RawText, check_outcome, frames  # noqa: E402
from tests.helpers.procs import LineCollector, poll_until  # noqa: E402


def fd_names(pid: int) -> list[str]:
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            continue
    return out


def raw_abuse(path: str, rng: random.Random) -> str:
    """One abuse; returns what became of it: ``done``, or ``reset`` when graced cut the
    connection first (over its connection budget while earlier half-open ones wait out
    their handshake deadline: the budget at work, not a failure)."""
    try:
        _raw_abuse(path, rng)
    except (ConnectionResetError, BrokenPipeError):
        return "reset"
    return "done"


def _raw_abuse(path: str, rng: random.Random) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    kind = rng.randrange(4)
    if kind == 0:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # half a handshake, then gone
    elif kind == 1:
        s.sendall(os.urandom(rng.randrange(1, 512)))
    elif kind == 2:
        s.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
                  b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                  b"Sec-WebSocket-Version: 13\r\n\r\n")
        s.recv(4096)
        s.sendall(b"\x81\xfe\x10\x00\x00\x00\x00\x00partial")  # a frame cut short
    s.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, default=50_000)
    ap.add_argument("--raw", type=int, default=2000)
    ap.add_argument("--net", type=int, default=5000)
    ap.add_argument("--net-raw", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=random.randrange(2**32),
                    help="hypothesis seed (default: a new one each run, printed)")
    args = ap.parse_args()
    max_request_bytes = 65536  # graced's default
    base = Path(tempfile.mkdtemp(prefix="gf", dir="/tmp"))
    g = Graced(base)
    g.start()
    g.ctl("keys", "trust", check=True)
    proc = psutil.Process(g.proc.pid)  # type: ignore[union-attr]
    bystander = LineCollector(g.ctl_popen("tail", "--verify", "--json", "user.*"))
    client = FuzzClient(str(g.socket), parse_public_key((g.state / "key.pub").read_text()),
                        max_request_bytes)
    # The baseline once the bystander is connected and streaming.
    g.ctl("emit", "user.before-fuzz", check=True)
    assert bystander.wait_for(lambda ls: any("user.before-fuzz" in x for x in ls), 10)
    fds0, rss0 = proc.num_fds(), proc.memory_info().rss / 2**20
    names0 = fd_names(proc.pid)
    outcomes: dict[str, int] = {}
    failures: list[str] = []

    @seed(args.seed)
    @settings(max_examples=args.cases, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(frame=frames)
    def fuzz(frame: str | bytes | RawText) -> None:
        try:
            outcome = client.send(frame)
        except AssertionError as exc:
            failures.append(str(exc)[:300])
            outcome = "FAILED"
        if outcome != "FAILED" and not check_outcome(frame, outcome, max_request_bytes):
            failures.append(f"{outcome} not allowed for {repr(frame)[:200]}")
        outcomes[outcome] = outcomes.get(outcome, 0) + 1

    t0 = time.monotonic()
    fuzz()
    t1 = time.monotonic()
    rng = random.Random(1)
    raw: dict[str, int] = {}
    for _ in range(args.raw):
        what = raw_abuse(str(g.socket), rng)
        raw[what] = raw.get(what, 0) + 1
    t2 = time.monotonic()
    # Half-open handshakes the abuses left hold their slots until the handshake deadline
    # (10 s): graced refuses connections over its budget meanwhile, then serves again.
    poll_until(lambda: g.ctl("emit", "user.after-fuzz").returncode == 0, 30,
               "graced serving again after the raw abuses", pause=0.5)
    seen = bystander.wait_for(lambda ls: any("user.after-fuzz" in x for x in ls), 10)
    alive = proc.is_running() and client.hello_ok()
    client.close()
    fds1 = proc.num_fds()
    # Closes finish asynchronously; a connection that never completes its handshake is
    # dropped by graced after 10 s.
    try:
        poll_until(lambda: proc.num_fds() <= fds0, 15, "descriptors back", pause=0.2)
    except AssertionError:
        pass  # reported below as the count it stayed at
    fds1 = proc.num_fds()
    rss1 = proc.memory_info().rss / 2**20
    after = fd_names(proc.pid)
    extra = [n for n in set(after) if after.count(n) > names0.count(n)]
    bystander_ok = bystander.proc.poll() is None and seen
    bystander.proc.terminate()
    g.close()
    total = sum(outcomes.values())
    print(f"bench/fuzz.py  ({total:,} hypothesis cases in {t1 - t0:.0f} s, "
          f"{total / (t1 - t0):.0f}/s, over {client.connections:,} connections; "
          f"{args.raw:,} raw-socket abuses in {t2 - t1:.0f} s "
          f"({', '.join(f'{v:,} {k}' for k, v in sorted(raw.items()))}); seed {args.seed}, "
          f"replay with --seed {args.seed})")
    for k, v in sorted(outcomes.items(), key=lambda kv: -kv[1]):
        print(f"  {k:<26} {v:>7,}")
    print(f"  daemon alive and answering: {alive}; bystander tail --verify unaffected: "
          f"{bystander_ok}")
    print(f"  descriptors {fds0} -> {fds1}" + (f" (new: {extra})" if extra else "")
          + f"; RSS {rss0:.1f} -> {rss1:.1f} MB")
    net_ok = net(base, args.net, args.net_raw, args.seed)
    ok = not failures and alive and bystander_ok and fds1 <= fds0 and total >= args.cases \
        and "reply:internal" not in outcomes and net_ok
    for f in failures[:5]:
        print(f"  failure: {f}")
    print(f"  {'PASS' if ok else 'FAIL'}")


def net(base: Path, n: int, n_raw: int, seed_: int) -> bool:
    """The TCP/TLS/authentication part; prints its counts; True if it passed."""
    import base64
    import json

    import nacl.signing
    import trio

    from bench.fuzz_net import raw_tls_abuse, run_requests, self_signed
    from graced.protocol import Signer

    keys = {name: Signer(nacl.signing.SigningKey.generate())
            for name in ("read", "control", "stranger")}

    def line(s: Signer) -> str:
        return f"ed25519 {base64.b64encode(s.public_key).decode()} {s.kid}"

    where = base / "net"
    where.mkdir()
    cert, key = self_signed(str(where))
    g = Graced(where, f'listen = ["127.0.0.1:0"]\ntls_cert = "{cert}"\ntls_key = "{key}"\n'
               f'[remediation]\nread_keys = ["{line(keys["read"])}"]\n'
               f'control_keys = ["{line(keys["control"])}"]\n')
    g.start()
    st = json.loads(g.ctl("status", "--json", check=True).stdout)
    port, head0 = st["wire"]["tcp_ports"][0], st["head_seq"]
    proc = psutil.Process(st["pid"])
    fds0, rss0 = proc.num_fds(), proc.memory_info().rss / 2**20
    t0 = time.monotonic()
    outcomes, failures = trio.run(run_requests, "127.0.0.1", port, cert, n, seed_, keys,
                                  st["daemon_id"])
    t1 = time.monotonic()
    rng = random.Random(seed_)
    raw: dict[str, int] = {}
    for _ in range(n_raw):
        kind = raw_tls_abuse("127.0.0.1", port, rng)
        raw[kind] = raw.get(kind, 0) + 1
    t2 = time.monotonic()
    after = json.loads(g.ctl("status", "--json", check=True).stdout)
    refused = g.ctl("tail", "--json", "--since", str(head0 + 1), "--no-follow",
                    "mission.approval_refused", check=True).stdout.splitlines()
    try:
        poll_until(lambda: proc.num_fds() <= fds0, 20, "descriptors back", pause=0.2)
    except AssertionError:
        pass
    fds1, rss1 = proc.num_fds(), proc.memory_info().rss / 2**20
    g.close()
    total = sum(outcomes.values())
    print(f"  -- TCP + TLS + auth: {total:,} requests over wss:// in {t1 - t0:.0f} s "
          f"({total / max(t1 - t0, 1e-9):.0f}/s); {n_raw:,} raw TLS-port abuses in "
          f"{t2 - t1:.0f} s")
    for k, v in sorted(outcomes.items(), key=lambda kv: -kv[1]):
        print(f"  {k:<34} {v:>7,}")
    for k, v in sorted(raw.items()):
        print(f"  raw {k:<30} {v:>7,}")
    print(f"  refused (status wire.refused_requests): {after['wire']['refused_requests']:,}; "
          f"refusals journaled: {len(refused)}")
    print(f"  descriptors {fds0} -> {fds1}; RSS {rss0:.1f} -> {rss1:.1f} MB")
    for f in failures[:5]:
        print(f"  failure: {f}")
    return not failures and not refused and fds1 <= fds0 and total == n


if __name__ == "__main__":
    main()
