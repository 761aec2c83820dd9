"""The close codes docs/protocol.md names, read by a raw WebSocket client, and what plain
``gracectl tail`` does with them (gracectl.1): a graceful stop closes with 1001 and tail
waits for graced to come back and resumes with no gap; a connection cut without a close
ends tail with exit 3; a client that stops reading is closed with 1008 and the reason;
SIGINT stops a following tail with exit 130."""

from __future__ import annotations

import json
import signal

import pytest
import trio
import trio_websocket

from graced.protocol import ExitCode
from tests.conftest import Graced
from tests.helpers.procs import LineCollector


async def subscribed(g: Graced, nursery: trio.Nursery,
                     **kw: int) -> trio_websocket.WebSocketConnection:
    """A raw client on graced's socket, subscribed to every topic from the head on."""
    stream = await trio.open_unix_socket(str(g.socket))
    ws = await trio_websocket.wrap_client_stream(nursery, stream, "localhost", "/", **kw)
    await ws.send_message(json.dumps({"id": 1, "nonce": "n-1", "method": "subscribe",
                                      "params": {"patterns": ["*"]}}))
    return ws


async def close_reason(ws: trio_websocket.WebSocketConnection,
                       timeout: float = 30) -> trio_websocket.CloseReason:
    """Read whatever is left until the daemon's close frame; its code and reason."""
    with trio.fail_after(timeout):
        while True:
            try:
                await ws.get_message()
            except trio_websocket.ConnectionClosed as exc:
                assert exc.reason is not None
                return exc.reason


def tail_json(g: Graced) -> LineCollector:
    """Plain gracectl tail (no --verify), following, JSON lines, from the head on."""
    tail = LineCollector(g.ctl_popen("tail", "--json", "-n", "0"))
    assert tail.wait_for(lambda ls: len(ls) >= 1, 15)  # a heartbeat: it is following
    return tail


@pytest.mark.slow
async def test_a_graceful_stop_closes_with_1001_and_tail_resumes_with_no_gap(
        make_graced) -> None:
    g = make_graced()
    tail = tail_json(g)
    async with trio.open_nursery() as nursery:
        ws = await subscribed(g, nursery)
        assert await trio.to_thread.run_sync(g.stop) == 0  # SIGTERM
        reason = await close_reason(ws)
        assert reason.code == 1001, reason
        nursery.cancel_scope.cancel()
    assert tail.wait_for(lambda ls: any('"daemon.stopping"' in x for x in ls), 10)
    stopping = next(e["seq"] for e in tail.events() if e["topic"] == "daemon.stopping")
    g.start()
    # The same tail, still running, resumes at the next seq: the new start's first event.
    assert tail.wait_for(lambda ls: any(json.loads(x)["seq"] > stopping + 1 for x in ls
                                        if x.startswith("{")), 20)
    seqs = [e["seq"] for e in tail.events()]
    assert seqs == list(range(seqs[0], seqs[-1] + 1)), seqs
    assert tail.events()[seqs.index(stopping + 1)]["topic"] in ("crypto.key_loaded",
                                                               "crypto.key_created")
    assert tail.proc.poll() is None
    tail.proc.send_signal(signal.SIGINT)
    assert tail.wait_exit(10) == 130


@pytest.mark.slow
def test_a_connection_cut_without_a_close_ends_tail_with_exit_3(make_graced) -> None:
    g = make_graced()
    tail = tail_json(g)
    g.kill()  # SIGKILL: no daemon.stopping, no close frame
    assert tail.wait_exit(15) == ExitCode.UNREACHABLE
    assert tail.proc.stderr is not None
    assert tail.proc.stderr.read().splitlines()[-1] == "gracectl: connection to graced lost"


@pytest.mark.slow
async def test_a_client_that_stops_reading_is_closed_with_1008_and_why(make_graced) -> None:
    g = make_graced(extra_config="client_queue = 64\nsend_timeout = 60.0\n")
    async with trio.open_nursery() as nursery:
        # message_queue_size=1: once one message waits unread, this client reads no more
        # from the socket, and graced's sends to it block until its queue of 64 is full.
        ws = await subscribed(g, nursery, message_queue_size=1)
        payload = json.dumps({"pad": "x" * 1000})
        with trio.fail_after(60):  # returns once the last event is journaled
            done = await trio.run_process(
                [g.ctl_argv0(), "emit", "user.load", "--count", "3000", "--payload", payload],
                env=g.env, capture_stdout=True, capture_stderr=True, stdin=b"")
        assert done.returncode == 0, done.stderr
        reason = await close_reason(ws)
        assert reason.code == 1008, reason
        assert reason.reason == "slow consumer: send queue full (64 frames)", reason
        nursery.cancel_scope.cancel()
    status = json.loads(g.ctl("status", "--json", check=True).stdout)
    assert status["wire"]["dropped_total"] == 1


def test_sigint_stops_a_following_tail_with_exit_130(graced: Graced) -> None:
    """gracectl.1, SIGNALS: SIGINT stops a following tail (exit 130), no traceback."""
    tail = tail_json(graced)
    tail.proc.send_signal(signal.SIGINT)
    assert tail.wait_exit(10) == 130
    assert tail.proc.stderr is not None and "Traceback" not in tail.proc.stderr.read()
