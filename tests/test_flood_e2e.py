"""500 clients at once: the excess is refused with a reason, and every descriptor comes back."""

from __future__ import annotations

import time

import psutil
import pytest
import trio
import trio_websocket

RESERVED = 3
CLIENTS = 500
LIMIT = 400


async def _client(path: str, results: dict[str, int], release: trio.Event,
                  reasons: set[str], all_in: trio.Event) -> None:
    try:
        await _connect(path, results, release, reasons)
    finally:
        if sum(results.values()) == CLIENTS:
            all_in.set()


async def _connect(path: str, results: dict[str, int], release: trio.Event,
                   reasons: set[str]) -> None:
    try:
        async with trio.open_nursery() as nursery:
            stream = await trio.open_unix_socket(path)
            ws = await trio_websocket.wrap_client_stream(nursery, stream, "localhost", "/")
            try:
                await ws.send_message('{"id": 1, "nonce": "n", "method": "hello"}')
                await ws.get_message()
                results["served"] += 1
                if sum(results.values()) == CLIENTS:
                    release.set()
                await release.wait()
                await ws.aclose()
            except trio_websocket.ConnectionClosed as exc:
                results["refused"] += 1
                if sum(results.values()) == CLIENTS:
                    release.set()
                if exc.reason is not None:
                    reasons.add(f"{exc.reason.code} {exc.reason.reason}")
            nursery.cancel_scope.cancel()
    except (OSError, trio_websocket.HandshakeError, trio_websocket.ConnectionClosed):
        results["failed"] += 1
        if sum(results.values()) == CLIENTS:
            release.set()


async def test_a_flood_of_clients_is_capped_and_leaves_no_descriptor_behind(make_graced) -> None:
    # This test's clients run as graced's own user: they may take the reserved slots too.
    g = make_graced(extra_config=f"max_clients = {LIMIT - RESERVED}\n"
                                 f"reserved_clients = {RESERVED}\n"
                                 # every refusal gets its 1013 and reason, all at once
                                 f"max_handshakes = {CLIENTS}\n")
    daemon = psutil.Process(g.proc.pid)  # type: ignore[union-attr]
    # After a round trip: READY=1 can arrive before graced has closed its notify socket.
    assert g.ctl("status").returncode == 0
    baseline = daemon.num_fds()
    results = {"served": 0, "refused": 0, "failed": 0}
    reasons: set[str] = set()
    release = trio.Event()  # set once every client is served, refused or failed
    all_in = trio.Event()
    with trio.move_on_after(60) as cs:
        async with trio.open_nursery() as nursery:
            for _ in range(CLIENTS):
                nursery.start_soon(_client, str(g.socket), results, release, reasons, all_in)
    assert not cs.cancelled_caught, (results, reasons)
    assert all_in.is_set()
    assert results["failed"] == 0, results
    assert results["served"] == LIMIT and results["refused"] == CLIENTS - LIMIT, results
    assert reasons == {f"1013 too many clients (limit {LIMIT - RESERVED}, {RESERVED} more "
                       "for root, graced's user and approvers)"}
    # The daemon closes its side as each close handshake ends; a descriptor count has no
    # event to wait on, so it is read until it is back (or a deadline passes).
    deadline = time.monotonic() + 20
    while daemon.num_fds() > baseline and time.monotonic() < deadline:  # noqa: ASYNC110
        await trio.sleep(0.1)
    assert daemon.num_fds() == baseline, (daemon.num_fds(), baseline)
    # A slot is given back when its handler ends, a moment after its descriptor closed:
    # status gets in within seconds of the flood (read until it does, as for the count).
    deadline = time.monotonic() + 10
    while (rc := g.ctl("status").returncode) != 0 and time.monotonic() < deadline:  # noqa: ASYNC110
        await trio.sleep(0.1)
    assert rc == 0


@pytest.mark.slow
def test_read_commands_leave_the_descriptor_table_as_it_was(graced) -> None:
    """Each read (missions, status, knowledge, detectors) reuses graced's own
    connections: no descriptor is opened per request and none is left behind."""
    daemon = psutil.Process(graced.proc.pid)  # type: ignore[union-attr]
    assert graced.ctl("status").returncode == 0  # see above: READY=1 before the round trip
    before = sorted(c.path for c in daemon.open_files())
    fds = daemon.num_fds()
    for args in (("missions", "ls"), ("missions", "ls", "--json"), ("status", "--json"),
                 ("knowledge", "stats"), ("knowledge", "ls"), ("detectors",)):
        assert graced.ctl(*args).returncode == 0, args
    # Answered by graced either way: the mission, or "not found" (5) on a quiet host.
    assert graced.ctl("missions", "show", "1").returncode in (0, 5)
    after = sorted(c.path for c in daemon.open_files())
    assert (daemon.num_fds(), after) == (fds, before)
