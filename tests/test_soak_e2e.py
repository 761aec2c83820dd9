"""Soak, short version (bench/soak.py runs 30 minutes at 500 events/s with 20 clients):
clients that keep disconnecting and resuming with ``since`` see every seq exactly once,
and graced's descriptors come back to where they were."""

from __future__ import annotations

import json
import subprocess
import sys

import psutil
import pytest

from tests.conftest import ROOT, Graced
from tests.helpers.procs import poll_until

SECONDS = 20
RATE = 300


@pytest.mark.slow
def test_reconnecting_clients_see_every_seq_once_and_descriptors_stay_flat(
        graced: Graced) -> None:
    g = graced
    proc = psutil.Process(g.proc.pid)  # type: ignore[union-attr]
    fds_before = proc.num_fds()
    first = int(json.loads(g.ctl("status", "--json", check=True).stdout)["head_seq"]) + 1
    clients = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "soak.py"), "--client-proc", str(g.socket), "6",
         str(SECONDS), str(first)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    g.ctl("emit", "user.soak", "--count", str(SECONDS * RATE), "--rate", str(RATE),
          "--no-wait", check=True)
    out, _ = clients.communicate(timeout=SECONDS + 60)
    results = json.loads(out)
    assert len(results) == 6
    for r in results:
        assert r["gaps"] == 0 and r["dups"] == 0 and r["errors"] == 0, r
        assert r["reconnects"] >= 1 and r["received"] > SECONDS * RATE // 2, r
    # Every client stopped; descriptors back to the count before them (closes finish
    # asynchronously: ask until the deadline).
    # (a WAL checkpoint holds one for a moment too).
    poll_until(lambda: proc.num_fds() <= fds_before, 10,
               f"descriptors back to {fds_before}")
