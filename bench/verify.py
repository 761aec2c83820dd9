#!/usr/bin/env python3
"""Offline verification speed: ``gracectl verify`` against PyNaCl's bare verify rate.

    python bench/verify.py [--events 1000000] [--reuse DIR] [--runs 2]

Starts a real graced on a private state dir, publishes --events ``user.bench`` events
(``gracectl emit --count``), saves the whole stream as ``gracectl tail --json --since 1``
received it, stops graced (so the stream ends with ``daemon.stopping``), then times
``gracectl verify`` of the file: every line strictly canonical, every signature, the
chain, seq continuity, time gaps, genesis to ``daemon.stopping``.

In the same run, just before and just after, it measures PyNaCl's bare Ed25519 verify
rate on one core over the same stream's signing bytes with ``VerifyKey.verify`` (the
baseline), and prints the ratio of gracectl's rate to that rate times the cores this
process may use (os.sched_getaffinity). Target: >= 0.9. The load average is printed
with the figure: other processes on the machine take cores from both sides of the
ratio unevenly, so the same ratio per CPU second is printed too. For reference it also
prints the rate of the raw binding gracectl itself calls (libsodium's
``crypto_sign_open`` through PyNaCl's cffi ``lib``, from a C loop), which skips
``VerifyKey.verify``'s Python wrapper: the baseline stays PyNaCl's own verify. And as
the machine is shared, it also runs the VerifyKey.verify loop in one process per usable
core at once and prints gracectl's rate against that measured total (the target's
verdict stays on the product above). Last, it measures in turns in this one process, the
least of five rounds each, the CPU per event of VerifyKey.verify, of the binding and of a
``gracectl verify`` worker's whole path over the same 20,000 lines: what gracectl adds
to each verify, which other load hardly moves.
``gracectl verify`` runs twice (``--runs``) and its best run counts, as the baseline's
rates are each the best of two runs (on a shared machine a run that other load slows
says more about the load than about the code); every run's rate is printed.
``--reuse DIR`` keeps (or reuses) the saved stream in DIR to re-run the timing alone.
"""

from __future__ import annotations

import argparse
import base64
import multiprocessing
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from itertools import repeat
from pathlib import Path

import nacl.signing
from nacl._sodium import ffi, lib

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
BIN = Path(sys.executable).parent

from bench.served import wait_serving  # noqa: E402
from graced.keys import parse_public_key  # noqa: E402
from graced.protocol import parse_event_line  # noqa: E402


def make_stream(base: Path, events: int) -> tuple[Path, Path]:
    """A real graced's complete stream of ``events`` user events; (file, key.pub)."""
    cfg = base / "graced.toml"
    cfg.write_text(f'version = 1\ndetector = []\n[daemon]\nstate_dir = "{base}/state"\n'
                   f'socket = "{base}/g.sock"\n')
    env = {**os.environ, "GRACE_SOCKET": f"{base}/g.sock", "HOME": str(base),
           "XDG_CONFIG_HOME": f"{base}/.config"}
    daemon = subprocess.Popen([str(BIN / "graced"), "run", "--config", str(cfg)],
                              stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                              env=env)
    wait_serving(daemon)
    stream = base / "stream.jsonl"
    try:
        started = time.monotonic()
        payload = '{"n": 1, "host": "bench", "value": 42.5, "note": "a user event"}'
        subprocess.run([str(BIN / "gracectl"), "emit", "user.bench", "--count", str(events),
                        "--payload", payload], check=True, env=env, stdout=subprocess.DEVNULL)
        print(f"  published {events} events in {time.monotonic() - started:.0f} s",
              file=sys.stderr)
        with stream.open("wb") as out:
            tail = subprocess.Popen([str(BIN / "gracectl"), "tail", "--json", "--since", "1",
                                     "--reconnect-timeout", "0"], stdout=out, env=env,
                                    stderr=subprocess.DEVNULL)
            # Wait until the tail has every published event, then stop graced: the
            # tail receives daemon.stopping and ends.
            with stream.open("rb") as f:
                while True:
                    f.seek(max(0, stream.stat().st_size - 8192))
                    tail_bytes = f.read()
                    seq = tail_bytes.rfind(b'"seq":')
                    if seq >= 0 and int(tail_bytes[seq + 6:].split(b",")[0]) >= events:
                        break
                    if tail.poll() is not None:
                        raise SystemExit("gracectl tail ended early")
                    time.sleep(0.2)
            daemon.terminate()
            daemon.wait(30)
            tail.wait(60)
    finally:
        if daemon.poll() is None:
            daemon.kill()
    return stream, base / "state" / "key.pub"


def _timers(msgs: list[tuple[bytes, bytes]],
            public_key: bytes) -> dict[str, Callable[[], None]]:
    """The two bare verifies of ``msgs`` ((signature, signed bytes) pairs), each one pass
    over them: ``VerifyKey.verify`` (PyNaCl) and ``binding`` (``crypto_sign_open`` through
    PyNaCl's cffi binding, from a C loop into one buffer, as ``verify_all`` calls it)."""
    key = nacl.signing.VerifyKey(public_key)
    signed = [sig + data for sig, data in msgs]
    out, out_len = ffi.new("unsigned char[]", max(map(len, signed))), ffi.new(
        "unsigned long long *")

    def pynacl() -> None:
        for sig, data in msgs:
            key.verify(data, sig)

    def binding() -> None:
        results = list(map(lib.crypto_sign_open, repeat(out), repeat(out_len), signed,
                           map(len, signed), repeat(public_key)))
        assert results.count(0) == len(results)

    return {"VerifyKey.verify": pynacl, "binding": binding}


def bare_rates(stream: Path, public_key: bytes,
               sample: int = 20000) -> dict[str, tuple[float, float]]:
    """Bare Ed25519 verifies per second on one core over the stream's own messages, as
    (per second of wall time, per second of CPU time), by the two calls of
    :func:`_timers`: ``VerifyKey.verify``, the baseline the target is measured against,
    and ``binding``, as ``gracectl verify`` calls libsodium.
    """
    msgs = []
    with stream.open("rb") as f:
        for line in f:
            event, signing = parse_event_line(line.rstrip(b"\n"))
            msgs.append((base64.b64decode(event["sig"]), signing))
            if len(msgs) >= sample:
                break
    rates = {}
    for name, run in _timers(msgs, public_key).items():
        best = best_cpu = 0.0
        for _ in range(2):
            t0, c0 = time.perf_counter(), time.process_time()
            run()
            best = max(best, len(msgs) / (time.perf_counter() - t0))
            best_cpu = max(best_cpu, len(msgs) / (time.process_time() - c0))
        rates[name] = (best, best_cpu)
    # The same VerifyKey.verify loop in one process per usable core at once: what bare
    # PyNaCl gets from all the cores now, measured rather than multiplied.
    cores = len(os.sched_getaffinity(0))
    _SAMPLE[:] = [(public_key, msgs)]  # the forked workers have it: nothing is pickled
    with multiprocessing.get_context("fork").Pool(cores) as pool:
        t0 = time.perf_counter()
        pool.map(_verify_sample, range(cores), chunksize=1)
        rates["VerifyKey.verify, all cores"] = (cores * len(msgs) / (time.perf_counter() - t0),
                                                0.0)
    return rates


_SAMPLE: list[tuple[bytes, list[tuple[bytes, bytes]]]] = []


def worker_costs(stream: Path, public_key: bytes, sample: int = 20000,
                 rounds: int = 5) -> dict[str, float]:
    """CPU microseconds per event, measured in turns in this one process, the least of
    ``rounds`` (a round that other load slows loses to one it spared, on every side
    alike): ``VerifyKey.verify`` and the raw binding over ``sample`` lines from the middle
    of the stream, and ``worker``: a ``gracectl verify`` worker's whole path over the
    same lines' bytes (read, strict parse, signatures, chain, seq, key and time checks)."""
    from gracectl.verify import _verify_chunk

    with stream.open("rb") as f:
        f.seek(stream.stat().st_size // 2)
        f.readline()
        start = f.tell()
        lines = [f.readline() for _ in range(sample)]
    end = start + sum(map(len, lines))
    msgs = [(base64.b64decode(event["sig"]), data)
            for event, data in map(parse_event_line, (line.rstrip(b"\n") for line in lines))]

    def worker() -> None:
        chunk = _verify_chunk(str(stream), start, end, public_key, None)
        assert chunk is not None and chunk.count == sample

    runs = {**_timers(msgs, public_key), "worker": worker}
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(rounds):
        for name, run in runs.items():
            c0 = time.process_time()
            run()
            best[name] = min(best[name], (time.process_time() - c0) / sample * 1e6)
    return best


def _verify_sample(_: int) -> None:
    public_key, msgs = _SAMPLE[0]
    key = nacl.signing.VerifyKey(public_key)
    for sig, data in msgs:
        key.verify(data, sig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--reuse", type=Path, help="keep or reuse the saved stream in this dir")
    ap.add_argument("--runs", type=int, default=2,
                    help="runs of gracectl verify; the best counts (default 2, as the baseline)")
    args = ap.parse_args()
    base = args.reuse or Path(tempfile.mkdtemp(prefix="gv", dir="/tmp"))
    base.mkdir(parents=True, exist_ok=True)
    stream, key_file = base / "stream.jsonl", base / "state" / "key.pub"
    try:
        if not (args.reuse and stream.exists() and key_file.exists()):
            stream, key_file = make_stream(base, args.events)
        public_key = parse_public_key(key_file.read_text())
        lines = sum(1 for _ in stream.open("rb"))
        cores = len(os.sched_getaffinity(0))
        load_before = os.getloadavg()[0]
        before = bare_rates(stream, public_key)
        runs = []  # (wall, cpu) of each run; the best of them, as for the baseline
        for _ in range(max(1, args.runs)):
            t0 = time.perf_counter()
            c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            res = subprocess.run([str(BIN / "gracectl"), "verify", "--key", str(key_file),
                                  str(stream)], capture_output=True, text=True)
            wall = time.perf_counter() - t0
            c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            if res.returncode != 0:
                raise SystemExit(f"gracectl verify failed ({res.returncode}): {res.stderr}")
            runs.append((wall, (c1.ru_utime + c1.ru_stime) - (c0.ru_utime + c0.ru_stime)))
        wall, cpu = min(w for w, _ in runs), min(c for _, c in runs)
        after = bare_rates(stream, public_key)
        costs = worker_costs(stream, public_key)
        load = max(load_before, os.getloadavg()[0])
        # Measured just before and just after: other load moves both sides.
        bare, bare_cpu = (sum(r["VerifyKey.verify"][i] for r in (before, after)) / 2
                          for i in (0, 1))
        raw, raw_cpu = (sum(r["binding"][i] for r in (before, after)) / 2 for i in (0, 1))
        rate, rate_cpu = lines / wall, lines / cpu
        ratio = rate / (bare * cores)
        together = sum(r["VerifyKey.verify, all cores"][0] for r in (before, after)) / 2
        print(f"bench/verify.py  (a real graced's complete stream: {lines} events, "
              f"{stream.stat().st_size / 1e6:.0f} MB; {cores} usable cores; load average "
              f"{load:.1f} during the run)")
        print(f"  gracectl verify: {rate:,.0f} events/s ({lines} events in {wall:.1f} s, "
              f"{cpu:.1f} s of CPU, the best of {len(runs)} runs as the baseline's rates are "
              f"the best of 2 (runs: {', '.join(f'{lines / w:,.0f}/s' for w, _ in runs)}); "
              "strict canonical lines, signatures, chain, time gaps, genesis to "
              "daemon.stopping)")
        print(f"  PyNaCl bare verify (VerifyKey.verify, the baseline): {bare:,.0f}/s on one "
              f"core x {cores} cores = {bare * cores:,.0f}/s")
        print(f"  ratio {ratio:.2f} (target >= 0.9): {'PASS' if ratio >= 0.9 else 'FAIL'}")
        print(f"  (VerifyKey.verify in {cores} processes at once, measured: {together:,.0f}/s; "
              f"gracectl verify is {rate / together:.2f} of it)")
        print(f"  per CPU second (what other load does not move): gracectl verify "
              f"{rate_cpu:,.0f} events, VerifyKey.verify {bare_cpu:,.0f} verifies: "
              f"{rate_cpu / bare_cpu:.2f} of bare on each core used "
              f"({'PASS' if rate_cpu / bare_cpu >= 0.9 else 'FAIL'})")
        print(f"  for reference, the raw binding gracectl calls (crypto_sign_open through "
              f"PyNaCl's cffi lib, from a C loop): {raw:,.0f}/s wall, {raw_cpu:,.0f} per CPU "
              f"second; gracectl verify is {rate_cpu / raw_cpu:.2f} of it per CPU second")
        us, worker = costs["VerifyKey.verify"], costs["worker"]
        print(f"  per event, in turns in one process (least of 5 rounds of 20000 lines): "
              f"VerifyKey.verify {us:.1f} us of CPU, the binding {costs['binding']:.1f} us, "
              f"a gracectl verify worker's whole path {worker:.1f} us (the binding + "
              f"{worker - costs['binding']:.1f} us of reading, strict parsing, chain hash, "
              f"seq, key and time checks): {us / worker:.2f} of bare on a core")
        if res.stderr.strip():
            print(f"  {res.stderr.strip()}")
    finally:
        if args.reuse is None:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
