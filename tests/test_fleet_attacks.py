"""The fleet against an attacker who can publish and subscribe on its NATS: real
nats-server, real graced, the real gracectl fleet (as tests/test_fleet_e2e.py)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Graced
from tests.helpers.nats import NatsServer
from tests.helpers.procs import poll_until
from tests.test_fleet_e2e import Operator, assert_whole, fleet_section, status, wait_caught_up


def _nats(url: str, work: Any) -> Any:
    """Run ``work(nc, js)`` on a connection of the attacker's own."""
    import nats

    async def go() -> Any:
        nc = await nats.connect(url)
        try:
            return await work(nc, nc.jetstream())
        finally:
            await nc.close()

    return asyncio.run(go())


@pytest.mark.slow
def test_guessed_message_ids_a_purge_or_a_deleted_stream_silence_no_host(
        shortdir: Path) -> None:
    """Message ids published ahead under the old guessable form do not make JetStream drop
    the host's events; after a purge (JetStream still remembers the ids) a restarted
    graced is told its events are "duplicates" of messages no longer held: it does not
    count them as sent, it sends them again, and says so in status and integration; a
    stream deleted under it is made again and the journal's history sent again."""
    server = NatsServer(shortdir)
    server.start()
    op = Operator(shortdir, server.url)
    (shortdir / "h").mkdir()
    g = Graced(shortdir / "h", "integration_interval = 0.3\n" + fleet_section(server.url))
    g.start()
    try:
        daemon_id = op.pin(g)
        st = wait_caught_up(g)
        head = st["head_seq"]
        kid = json.loads(g.ctl("tail", "--json", "--no-follow", "--since", "1",
                               check=True).stdout.splitlines()[0])["kid"]

        async def squat(nc: Any, js: Any) -> None:  # any subject takes a stream-wide id
            for seq in range(head + 1, head + 400):
                await js.publish("grace.x.y", b"junk", headers={"Nats-Msg-Id": f"{kid}:{seq}"})

        _nats(server.url, squat)
        assert g.ctl("emit", "user.after", "--count", "50").returncode == 0
        host = assert_whole(op, g, daemon_id)
        assert host["last_seq"] >= head + 50

        async def purge(nc: Any, js: Any) -> None:
            await js.purge_stream("GRACE")

        sent = wait_caught_up(g)["fleet"]["acked_seq"]
        g.stop()
        _nats(server.url, purge)
        g.start()
        host = assert_whole(op, g, daemon_id)  # every event from seq 1 again
        fl = status(g)["fleet"]
        assert fl["refused_duplicates"] >= sent, fl
        assert "did not send" in (fl["alert"] or ""), fl
        poll_until(lambda: status(g)["integration"].get("fleet", {}).get("state")
                   == "failing", 10, "the fleet component failing")

        # The stream deleted under a running graced: it is made again, history resent.
        async def delete(nc: Any, js: Any) -> None:
            await js.delete_stream("GRACE")

        _nats(server.url, delete)
        assert g.ctl("emit", "user.after", "--count", "5").returncode == 0
        assert_whole(op, g, daemon_id)
    finally:
        g.close()
        server.stop()
