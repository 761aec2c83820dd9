"""Against a real graced (attacker review of #18, findings 6 and 8): a client leaving in
the middle of the WebSocket handshake is a routine disconnect, not a traceback in the
log; ``tail --since SEQ`` past the head, following, never prints an event below SEQ."""

from __future__ import annotations

import json
import socket

from tests.conftest import Graced
from tests.helpers.procs import LineCollector

GET = (b"GET / HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
       b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")


def test_clients_leaving_mid_handshake_leave_no_error_in_the_log(graced: Graced) -> None:
    for _ in range(5):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(graced.socket))
            s.sendall(GET)  # and gone, before the answer
    # graced served them all and is still serving: a status answers.
    res = graced.ctl("status", "--json", check=True, timeout=20)
    assert json.loads(res.stdout)["wire"]["connections_total"] >= 6
    log = graced.stderr()
    assert "unexpected error serving" not in log and "Traceback" not in log, log[-3000:]


def test_tail_since_a_seq_past_the_head_prints_nothing_below_it(graced: Graced) -> None:
    head = json.loads(graced.ctl("status", "--json", check=True).stdout)["head_seq"]
    since = head + 4  # a few heartbeats (every 0.5 s) come below it first
    tail = LineCollector(graced.ctl_popen("tail", "--json", "--since", str(since)))
    try:
        assert tail.wait_for(lambda lines: len(lines) >= 2, 30)
        seqs = [e["seq"] for e in tail.events()]
        assert seqs[0] == since and all(s >= since for s in seqs), (since, seqs)
    finally:
        tail.proc.terminate()
        tail.proc.wait(10)
